"""The whole ColD Fusion loop on one machine (the embedded default).

  python -m cold_fusion_tf.run --config=configs/demo.py --store=stores/demo

Creates the store from config.model.source if needed, then for each iteration up to
config.iterations: samples contributors from config.pool, trains each, fuses, evaluates the
new base on held-in and held-out tasks, and writes report.md/.csv/.png into the store.
Running the same command again resumes from LATEST.
"""


from cold_fusion_tf import cli

cli.define_flags()


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.simulation import loop  # pylint: disable=g-import-not-at-top
    loop.run(cli.require_config(), cli.require_store(), log=cli.say)

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
