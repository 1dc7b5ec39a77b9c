"""A contributor: fine-tune the store's latest base on one dataset and upload the body.

  python -m cold_fusion_tf.train --config=configs/demo.py --store=stores/demo \
      --config.task=sst2 [--config.contributor_id=alice-sst2]

Only the encoder body leaves the machine (contributions/<iteration>/<id>/); the task head
never does.
"""

from absl import app

from cold_fusion_tf import cli

cli.define_flags(workdir=True)


def main(argv):
  del argv

  def body():
    from cold_fusion_tf import contributor  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    config = cli.require_config()
    if not config.task:
      raise UserError("--config.task is required: a dataset name, folder, or tfds:<name>.")
    store = store_lib.Store(cli.require_store())
    contributor.contribute(store, config, config.task, config.contributor_id, log=cli.say)

  cli.run_main(body)


if __name__ == "__main__":
  app.run(main)
