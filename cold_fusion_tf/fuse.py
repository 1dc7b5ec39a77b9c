"""The fusion job: fuse the latest iteration's contributions and publish the next base.

  python -m cold_fusion_tf.fuse --config=configs/demo.py --store=stores/demo
  python -m cold_fusion_tf.fuse --config=configs/demo.py --store=gs://bucket/run --watch \\
      --config.fusion.min_contributions=8 --config.fusion.max_wait=7200

Once: validates every contribution, fuses the valid ones with ``config.fusion.method`` and
publishes the next base (with ``--config.fusion.max_wait=<seconds>`` it first waits up to that
long for ``--config.fusion.min_contributions``). With ``--watch``: polls the store every
``config.fusion.poll_seconds`` and fuses whenever the quorum is met, iteration after
iteration, until ``config.fusion.watch_iterations`` bases are published (0: forever); each
iteration's wait is bounded by ``max_wait`` (0: no bound). All settings: the fusion section
of cold_fusion_tf/defaults.py.

Exit status: 0 when a base was published (or another fuser published it first), 1 when the
quorum was not met (in time): nothing published, 2 on bad input, 130 when interrupted.
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags()
flags.DEFINE_bool("watch", False, "Keep polling the store and fuse whenever the quorum is met.")
flags.DEFINE_string("logdir", None, "TensorBoard scalars of each published base (default: "
                    "<store>/tensorboard for a local store).")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf import fusion  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    config = cli.require_config()
    settings = fusion.Settings.from_config(config.fusion)
    from cold_fusion_tf.simulation import scalars  # pylint: disable=g-import-not-at-top
    store = store_lib.Store(cli.require_store())
    return fusion.run(store, settings, watch=flags.FLAGS.watch, log=cli.say,
                      published=scalars.fuser_recorder(store, flags.FLAGS.logdir))

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
