"""A contributor: fine-tune the store's latest base on one dataset and upload the body.

  python -m cold_fusion_tf.train --config=configs/demo.py --store=stores/demo \\
      --config.task=sst2 [--config.contributor_id=alice-sst2] [--workdir=DIR]

Only the encoder body leaves the machine (contributions/<iteration>/<id>/); the task head
never does. The same program runs on a laptop, a multi-GPU machine, a multi-worker cluster
(TF_CONFIG) or a Cloud TPU VM: --config.strategy=auto|tpu|mirrored|multi_worker|one_device|
default (auto picks what is attached) and --config.tpu=local|<TPU name>. Training state is
checkpointed to --workdir (local or gs://; default <tmp>/cold_fusion/<store>/<iteration>/<id>)
every --config.recipe.checkpoint_every_steps steps: after a preemption, run the same command
again and it resumes. TensorBoard logs go to <workdir>/tensorboard.
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags(workdir=True)


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.training import contributor  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    config = cli.require_config()
    if not config.task:
      raise UserError("--config.task is required: a dataset name, folder, or tfds:<name>.")
    store = store_lib.Store(cli.require_store())
    contributor.contribute(store, config, config.task, config.contributor_id, log=cli.say,
                           workdir=flags.FLAGS.workdir)

  cli.run_main(body, tensorflow=True)


if __name__ == "__main__":
  cli.run(main)
