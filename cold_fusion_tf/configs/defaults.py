"""Config defaults shared by every configs/*.py: the paper's recipe family and the store settings.

Every field is documented here; configs override what differs.
"""

import ml_collections

from cold_fusion_tf.data import DEMO_DATA_DIR


def recipe(**overrides):
  """Fine-tuning recipe (ColD Fusion: AdamW, linear schedule, 0.6% warm-up, decay 0.01)."""
  r = ml_collections.ConfigDict(dict(
      learning_rate=5e-5,       # peak learning rate (the paper: 5e-5 RoBERTa, 2e-5 BERT)
      warmup_fraction=0.006,    # share of steps of linear warm-up
      weight_decay=0.01,        # AdamW decay; not on LayerNorm weights and biases
      adam_epsilon=1e-8,
      clip_norm=1.0,            # global gradient clipping (0 disables)
      batch_size=32,            # global batch size (over all replicas and accumulation steps)
      grad_accum_steps=1,       # micro-batches per optimizer step (gradient accumulation)
      max_replica_batch=0,      # if > 0: accumulate so a replica's micro-batch is at most this
      eval_batch_size=64,
      epochs=1.0,               # passes over the training data (the paper: at most 10)
      max_steps=0,              # cap on optimizer steps (0: no cap)
      max_length=128,           # tokens per example (pairs are truncated longest-first)
      eval_every_steps=0,       # dev evaluation period in steps (0: once per epoch)
      eval_every_examples=0,    # ... in training examples; overrides eval_every_steps if > 0
      patience_evals=0,         # early stop after this many evaluations without gain (0: off)
      patience_examples=0,      # ... after this many examples without gain; overrides if > 0
      seed=0,
      jit_compile=False,        # XLA-compile the gradient computation
      mixed_precision="",       # "" (float32) or "mixed_bfloat16" (TPU) / "mixed_float16"
      steps_per_execution=8,    # optimizer steps per tf.function call (no Python in between)
      static_shapes=False,      # one static shape per length bucket (always on for TPUs)
      length_buckets=0,         # padded lengths: 0 = any (x8 on GPU/TPU); N = N quantiles
      checkpoint_every_steps=200,  # training-state checkpoints in the workdir (0: none)
      log_every_seconds=30.0,   # progress line (examples/s, ETA) at most this often
      log_every_steps=0,        # ... and every this many steps (0: time only)
  ))
  r.update(overrides)
  return r


def get_config():
  config = ml_collections.ConfigDict()
  # Where base 0 comes from: a Hugging Face directory, a hub name (roberta-base), or
  # package:<python package>/<folder> for a model shipped in a Python package.
  config.model = ml_collections.ConfigDict(dict(source="roberta-base"))
  config.data = ml_collections.ConfigDict(dict(
      dirs=(DEMO_DATA_DIR,),  # folders searched for named datasets (a tuple)
      columns={},             # CSV/TSV column names, e.g. {"text": "sentence", "label": "y"}
      max_examples={"train": 0, "dev": 0, "test": 0},  # caps per split (0: all)
  ))
  config.recipe = recipe()
  # One contributor (python -m cold_fusion_tf.train).
  config.task = ""            # dataset name, folder, or tfds:<name>
  config.contributor_id = ""  # defaults to the dataset name
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
      seeds=1,                # fine-tuning seeds per (base, task)
      enabled=True,
      probe_learning_rate=1e-3,  # evaluate --mode=probe: frozen body, head only, this lr
  ))
  return config
