"""Config defaults shared by every configs/*.py: the paper's recipe family and the store settings.

Every field is documented here; configs override what differs.
"""

import ml_collections

from cold_fusion_tf.data import DEMO_DATA_DIR
from cold_fusion_tf.training.recipe import Recipe


def recipe(**overrides):
  """The fine-tuning recipe section: :class:`~cold_fusion_tf.training.recipe.Recipe`'s defaults
  (every field documented there) updated by ``overrides``."""
  r = ml_collections.ConfigDict(Recipe().to_dict())
  r.update(overrides)
  return r


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      # Where base 0 comes from: a Hugging Face directory, a hub name (roberta-base), or
      # package:<python package>/<folder> for a model shipped in a Python package.
      source="roberta-base",
      # The body a contributor trains (cold_fusion_tf/model/body.py); contributions are the
      # same Hugging Face-named file either way. "transformers_tf": transformers' TF model
      # on tf-keras (every supported model type). "keras_hub": a keras-hub backbone on
      # Keras 3 (BERT and RoBERTa), on the TensorFlow or JAX backend.
      body="transformers_tf",
      backend="",             # keras_hub only: "tensorflow" or "jax" ("": $KERAS_BACKEND,
                              # else tensorflow)
  ))
  config.data = ml_collections.ConfigDict(dict(
      dirs=(DEMO_DATA_DIR,),  # folders searched for named datasets (a tuple)
      # The column (JSON key) of each record field: --config.data.columns.text=sentence
      columns=dict(text="text", text_pair="text_pair", label="label"),
      max_examples={"train": 0, "dev": 0, "test": 0},  # caps per split (0: all)
      max_file_mb=1024,       # the largest dataset file read, in MiB (splits are read whole)
  ))
  config.recipe = recipe()
  # One contributor (python -m cold_fusion_tf.train).
  config.task = ""            # dataset name, folder, or tfds:<name>
  config.contributor_id = ""  # defaults to the dataset name
  # Private key (PEM file from python -m cold_fusion_tf.keys) that signs contribution.json;
  # required by a store whose owner lists contributors' keys in contributors.json.
  config.signing_key = ""
  config.strategy = "auto"    # auto, tpu, mirrored, multi_worker (TF_CONFIG), one_device, default
  config.tpu = ""             # TPU for strategy tpu/auto: "local" on a TPU VM, or a TPU name
  # Fusion (python -m cold_fusion_tf.fuse).
  config.fusion = ml_collections.ConfigDict(dict(
      method="mean",          # mean (the paper), weighted, trimmed_mean, median, ...
      params={},              # method parameters
      min_contributions=1,    # quorum: fewer valid contributions publish nothing
      # Reject an update whose norm ||body - base|| has a robust z-score above this
      # (median/MAD; needs >= 3 contributions; 0 disables).
      max_update_z=3.5,
      # Bounds on each update, relative to the base's own norm, for any number of
      # contributions (0 disables). Measured on the demo (MiniLM-L6, 62 steps of 16 at lr
      # 5e-5 on trec_coarse, ag_news and rte): ||body - base|| / ||base|| was 0.0031-0.0057,
      # and per tensor (the ratio to the tensor's norm, or for small tensors to their share of
      # the base's norm) at most 0.012. The defaults leave about 35x (whole) and 40x (per
      # tensor) room for longer fine-tunes (the paper's recipe runs up to 10 epochs) and still
      # stop a body that moves the base by a large fraction of its own size.
      max_update_ratio=0.2,         # whole update: ||body - base|| <= this * ||base||
      max_tensor_update_ratio=0.5,  # each tensor: ||body_t - base_t|| <= this * ||base_t||
      clip_updates=False,      # True: scale an update beyond the bounds onto them, not reject it
      # With >= 3 contributions, reject an update whose cosine with the mean of the others' is
      # below this (-1 disables). Honest demo updates: -0.02 to +0.03 (nearly orthogonal).
      min_cosine=-0.5,
      # weighted: each contributor's claimed examples count at most this times the median
      # claim (0: no cap).
      max_weight_ratio=4.0,
      # Never publish a fused base that is not finite or lies farther than this times the
      # parent's norm from the parent (0 disables the distance check).
      max_fused_ratio=1.0,
      # Server optimizer (DiLoCo / FedOpt): SGD with Nesterov momentum on the fused delta,
      # its momentum buffer kept in the store (fusion/<iteration>/momentum.safetensors).
      server_optimizer=ml_collections.ConfigDict(dict(
          enabled=False, lr=0.7, momentum=0.9, nesterov=True)),
      max_wait=0.0,           # seconds to wait for the quorum (0: no waiting; --watch: forever)
      poll_seconds=30.0,      # how often a waiting fuser looks at the store
      watch_iterations=0,     # --watch stops after publishing this many bases (0: never)
      workers=0,              # threads for validation and fusion (0: CPUs, at most 8)
  ))
  # The whole loop (python -m cold_fusion_tf.run).
  config.pool = ()            # datasets contributors are sampled from (held-in)
  config.heldout = ()         # datasets never trained on, only evaluated
  config.iterations = 1       # fusion iterations to reach (LATEST = iterations at the end)
  config.contributors_per_iteration = 2
  config.seed = 0             # sampling of contributors
  config.eval = ml_collections.ConfigDict(dict(
      recipe=recipe(),
      seeds=3,                # fine-tuning seeds per (base, task); 1 gives no standard error
      enabled=True,           # run: evaluate bases (evaluations/<i>.json, report.*)
      every=1,                # run: evaluate every N-th base (0: only base 0 and the last)
      tasks="all",            # run: which tasks: pool (held-in), pool:N, heldout, all
      max_train_examples=0,   # training examples per evaluation fine-tune (0: the split)
      probe_learning_rate=1e-3,  # evaluate --mode=probe: frozen body, head only, this lr
  ))
  return config
