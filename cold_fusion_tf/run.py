"""The whole ColD Fusion loop on one machine (the embedded default).

  python -m cold_fusion_tf.run --config=configs/demo.py --store=stores/demo

Creates the store from config.model.source if needed, then for each iteration up to
config.iterations: samples contributors from config.pool, trains each and fuses. Base 0, the
last base and every config.eval.every-th are evaluated on held-in and held-out tasks
(config.eval: seeds, tasks, recipe) by the evaluate program's pipeline, into
evaluations/<i>.json, and report.md/.csv/.png in the store show per task the gain over base 0
± its standard error, flagged losses, and the verdict.
Running the same command again resumes from LATEST.
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags()
flags.DEFINE_string("logdir", None, "TensorBoard scalars of the run, per base (default: "
                    "<store>/tensorboard for a local store).")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.simulation import loop  # pylint: disable=g-import-not-at-top
    loop.run(cli.require_config(), cli.require_store(), log=cli.say, logdir=flags.FLAGS.logdir)

  cli.run_main(body, tensorflow=True)


if __name__ == "__main__":
  cli.run(main)
