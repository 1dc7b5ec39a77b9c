"""Create a store: publish base 0 from config.model.source (a HF directory or hub name).

  python -m cold_fusion_tf.init --config=configs/demo.py --store=gs://bucket/run \
      [--config.model.source=roberta-base]
"""


from cold_fusion_tf import cli

cli.define_flags()


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.model import base_zero  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    store = store_lib.Store(cli.require_store())
    base_zero.ensure_store(store, cli.require_config(), log=cli.say)
    cli.say(f"store {store.uri}: LATEST = {store.require_latest()}")

  cli.run_main(body, tensorflow=True)


if __name__ == "__main__":
  cli.run(main)
