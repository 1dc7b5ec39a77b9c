"""Withdraw published bases: move LATEST back to an earlier base of its lineage.

  python -m cold_fusion_tf.rollback --store=gs://bucket/run --to=3 --reason="base 4 diverged"

Records who and why in ``<store>/rollbacks/<withdrawn LATEST>.json``, then moves LATEST by
compare-and-swap (a fuser publishing at the same moment makes it fail cleanly: run again).
The next fusion fuses the contributions to base ``--to`` into a new base numbered after every
withdrawn one; contributions made for a withdrawn base are rejected as stale. Published
bases are never rewritten or deleted.

Exit status: 0 when LATEST was moved, 2 on bad input or when LATEST moved meanwhile.
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags(default_config=None)
flags.DEFINE_integer("to", None, "The base to go back to (an earlier base of LATEST's lineage).")
flags.DEFINE_string("reason", "", "Why the bases are withdrawn (recorded in the store).")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.store import rollbacks  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.store.untrusted import printable  # pylint: disable=g-import-not-at-top
    if flags.FLAGS.to is None:
      raise UserError("--to is required: the base to go back to.")
    store = store_lib.Store(cli.require_store())
    record = rollbacks.rollback(store, flags.FLAGS.to, flags.FLAGS.reason)
    cli.say(f"LATEST moved back from base {record['from']} to base {record['to']}; withdrawn: "
            f"{', '.join(map(str, record['withdrawn']))} (by {printable(record['by'])}: "
            f"{printable(record['reason'], 300)}). The next fusion fuses the contributions to "
            f"base {record['to']}.")

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
