"""Print the lineage of a store: each base, who contributed, dev metrics, rejections, scores.

  python -m cold_fusion_tf.inspect --store=stores/demo [--json]
  python -m cold_fusion_tf.inspect --results=results/demo     # an evaluate results directory

Reads only the store's JSON files (never weights). Run it as a module (``python -m``): the
package uses absolute imports, so this module never stands in for the standard library's
``inspect``.
"""

import json

from absl import flags

from cold_fusion_tf import cli

cli.define_flags()
flags.DEFINE_bool("json", False, "Print the lineage as JSON instead of text.")
flags.DEFINE_string("results", None, "Show a results directory of `evaluate` instead.")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    if flags.FLAGS.results and (flags.FLAGS.store or flags.FLAGS.json):
      raise UserError(f"--results shows a results directory of evaluate; "
                      f"{'--store' if flags.FLAGS.store else '--json'} is for a store's "
                      "lineage: give one of them.")
    if flags.FLAGS.results and "://" in flags.FLAGS.results:
      raise UserError(f"--results={flags.FLAGS.results}: evaluate writes its results to a "
                      "local directory; give that directory.")
    if flags.FLAGS.results:
      from cold_fusion_tf.evaluation import results as results_dir  # pylint: disable=g-import-not-at-top
      print(results_dir.describe(results_dir.ResultsDir(flags.FLAGS.results)))
      return
    from cold_fusion_tf.store import lineage as inspect_store  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    data = inspect_store.lineage(store_lib.Store(cli.require_store()))
    if flags.FLAGS.json:
      print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
      print(inspect_store.format_lineage(data))

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
