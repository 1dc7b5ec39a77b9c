"""The fine-tuning recipe as typed settings: every field, its default and its valid range, once.

A config's ``recipe`` section (and ``eval.recipe``) is turned into a :class:`Recipe` once, at
the edge (:meth:`Recipe.from_config`); libraries take the Recipe, never the ConfigDict. The
defaults are the paper's recipe family: AdamW, a linear schedule with 0.6% warm-up, weight
decay 0.01 (not on LayerNorm weights and biases).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from cold_fusion_tf.errors import UserError

PRECISIONS = ("", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one fine-tune trains (a contributor's, or an evaluation run's)."""

  learning_rate: float = 5e-5      # peak learning rate (the paper: 5e-5 RoBERTa, 2e-5 BERT)
  warmup_fraction: float = 0.006   # share of steps of linear warm-up
  weight_decay: float = 0.01       # AdamW decay; not on LayerNorm weights and biases
  adam_epsilon: float = 1e-8
  clip_norm: float = 1.0           # global gradient clipping (0 disables)
  batch_size: int = 32             # global batch (over all replicas and accumulation steps)
  grad_accum_steps: int = 1        # micro-batches per optimizer step (gradient accumulation)
  max_replica_batch: int = 0       # if > 0: accumulate so a replica's micro-batch is at most this
  eval_batch_size: int = 64
  epochs: float = 1.0              # passes over the training data (the paper: at most 10)
  probe_epochs: float = 0.0        # head-only passes, body frozen, before the full fine-tune
  probe_learning_rate: float = 1e-3  # ... their peak learning rate (LP-FT; 0 epochs: off)
  max_steps: int = 0               # cap on optimizer steps (0: no cap)
  max_length: int = 128            # tokens per example (pairs are truncated longest-first)
  eval_every_steps: int = 0        # dev evaluation period in steps (0: once per epoch)
  eval_every_examples: int = 0     # ... in training examples; overrides eval_every_steps if > 0
  patience_evals: int = 0          # early stop after this many evaluations without gain (0: off)
  patience_examples: int = 0       # ... after this many examples without gain; overrides if > 0
  seed: int = 0
  jit_compile: bool = False        # XLA-compile the gradient computation
  mixed_precision: str = ""        # "" (float32) or "mixed_bfloat16" (TPU) / "mixed_float16"
  steps_per_execution: int = 8     # optimizer steps per tf.function call (no Python in between)
  static_shapes: bool = False      # one static shape per length bucket (always on for TPUs)
  length_buckets: int = 0          # padded lengths: 0 = any (x8 on GPU/TPU); N = N quantiles
  checkpoint_every_steps: int = 200  # training-state checkpoints in the workdir (0: none)
  log_every_seconds: float = 30.0  # progress line (examples/s, ETA) at most this often
  log_every_steps: int = 0         # ... and every this many steps (0: time only)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      object.__setattr__(self, field.name, _checked(field.name, field.type, value))

  @classmethod
  def from_config(cls, section: Any, where: str = "config.recipe") -> "Recipe":
    """From a config's recipe section (a ConfigDict, a mapping, or a Recipe)."""
    if isinstance(section, cls):
      return section
    values = section.to_dict() if hasattr(section, "to_dict") else section
    if not isinstance(values, Mapping):
      raise UserError(f"{where} must be a section of recipe fields, got {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
      raise UserError(f"{where} has no field(s) {', '.join(unknown)}; its fields are: "
                      f"{', '.join(sorted(known))}.")
    try:
      return cls(**values)
    except UserError as e:
      raise UserError(f"{where}.{e}") from None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> "Recipe":
    return dataclasses.replace(self, **changes)


_RANGES = {  # field: (lowest valid value, whether the lowest is excluded)
    "learning_rate": (0.0, True), "warmup_fraction": (0.0, False), "weight_decay": (0.0, False),
    "adam_epsilon": (0.0, True), "clip_norm": (0.0, False), "batch_size": (1, False),
    "grad_accum_steps": (1, False), "max_replica_batch": (0, False),
    "eval_batch_size": (1, False), "epochs": (0.0, True), "probe_epochs": (0.0, False),
    "probe_learning_rate": (0.0, True), "max_steps": (0, False),
    "max_length": (2, False), "eval_every_steps": (0, False), "eval_every_examples": (0, False),
    "patience_evals": (0, False), "patience_examples": (0, False), "seed": (0, False),
    "steps_per_execution": (1, False), "length_buckets": (0, False),
    "checkpoint_every_steps": (0, False), "log_every_seconds": (0.0, True),
    "log_every_steps": (0, False),
}


def _checked(name: str, kind: str, value: Any) -> Any:
  """``value`` as the field's type, or a UserError saying what is wrong."""
  if kind == "bool":
    if not isinstance(value, bool):
      raise UserError(f"{name}={value!r} is invalid: expected True or False.")
    return value
  if kind == "str":
    if value not in PRECISIONS:
      raise UserError(f"{name}={value!r} is invalid: expected one of {PRECISIONS}.")
    return value
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not math.isfinite(value) or (kind == "int" and not float(value).is_integer()):
    expected = "an integer" if kind == "int" else "a finite number"
    raise UserError(f"{name}={value!r} is invalid: expected {expected}.")
  low, open_low = _RANGES[name]
  if value < low or (open_low and value == low):
    raise UserError(f"{name}={value!r} is out of range: expected {'>' if open_low else '>='} "
                    f"{low}.")
  if name == "warmup_fraction" and value > 1:
    raise UserError(f"{name}={value!r} is out of range: expected a fraction in [0, 1].")
  return int(value) if kind == "int" else float(value)
