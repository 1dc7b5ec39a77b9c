"""Create a store: publish base 0 from config.model.source (a HF directory or hub name).

  python -m cold_fusion_tf.init --config=configs/demo.py --store=gs://bucket/run \\
      [--config.model.source=roberta-base]
"""


from cold_fusion_tf import cli
from cold_fusion_tf import quiet

cli.define_flags()


def main(argv):
  del argv

  def body():
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    store = store_lib.Store(cli.require_store())
    config = cli.require_config()
    if store.latest() is None:  # base 0 is to be published: is the store's folder writable?
      store.check_writable()  # before TensorFlow and the model are loaded
    quiet.init_devices()
    from cold_fusion_tf.model import base_zero  # pylint: disable=g-import-not-at-top
    base_zero.ensure_store(store, config, log=cli.say)
    cli.say(f"store {store.uri}: LATEST = {store.require_latest()}")

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
