"""The fusion job: fuse the latest iteration's contributions and publish the next base.

  python -m cold_fusion_tf.fuse --config=configs/demo.py --store=stores/demo

Exit status 0 when a base was published (or another fuser published it first), 1 when too
few valid contributions were there (nothing published), 2 on bad input.
"""

from absl import app

from cold_fusion_tf import cli

cli.define_flags()


def main(argv):
  del argv

  def body():
    from cold_fusion_tf import fusion  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    config = cli.require_config()
    store = store_lib.Store(cli.require_store())
    outcome = fusion.fuse(store, config.fusion.method, dict(config.fusion.params),
                          config.fusion.min_contributions, log=cli.say)
    lost_race = outcome.published is None and outcome.fused
    return 0 if outcome.published is not None or lost_race else 1

  cli.run_main(body)


if __name__ == "__main__":
  app.run(main)
