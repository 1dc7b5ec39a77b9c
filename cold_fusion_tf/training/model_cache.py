"""Built task models kept for the next fine-tune of the same shapes in this process.

Building a body and head, the optimizer and a copy of the best weights, and tracing the step
functions, costs far more than a short fine-tune's steps (on 2 CPU cores, a minute and more
for MiniLM). The demo and every evaluation run many short fine-tunes in one process, so a
built model is kept here and the next fine-tune that fits it starts from it: its body weights
are assigned, the head is drawn afresh from the run's seed, the optimizer is reset (step 0,
zero moments) and the schedule's variables are set. A fine-tune is then the same computation
whether its model was just built or reused: the head's initial values and the dropout masks
(:mod:`cold_fusion_tf.training.dropout`) depend only on the run's seed.

A model fits when everything its traced functions hold as constants is the same: the body's
architecture and whether it trains, the head's outputs and loss, the strategy, the precision,
XLA, the batch split and the optimizer's decay, epsilon and clipping. Models are kept while
they fit in :data:`BUDGET_BYTES` (weights, optimizer moments, best weights), the most recently
used one always.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import dropout as dropout_lib
from cold_fusion_tf.training import optimizer as optimizer_lib
from cold_fusion_tf.training import steps as steps_lib

PRECISIONS = ("", "float32", "mixed_bfloat16", "mixed_float16")
BUDGET_BYTES = 3 << 30
# Config fields that name or describe a model without changing what is built.
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "torch_dtype", "name_or_path")

_CACHE: "collections.OrderedDict[tuple, Built]" = collections.OrderedDict()


@contextlib.contextmanager
def precision(policy: str):
  """Keras layers built inside use ``policy`` (e.g. ``mixed_bfloat16``); '' keeps float32."""
  if policy not in PRECISIONS:
    raise UserError(f"--config.recipe.mixed_precision={policy!r} is not one of "
                    f"{', '.join(repr(p) for p in PRECISIONS)}.")
  if not policy or policy == "float32":
    yield
    return
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


@dataclasses.dataclass
class BodyWeights:
  """A fine-tune's starting body without a built body: its config, whether it trains, and a
  function that assigns its weights into a built body of that config (e.g. from a file)."""
  config: Any
  assign: Callable[[Any], None]
  trainable: bool = True


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a fine-tune's model and step functions are built for (see the module docstring)."""
  num_outputs: int
  kind: str
  global_batch: int
  accumulation: int
  micro: int


class Built:
  """A task model (body and head), its optimizer, a copy of its best weights and its traced
  step functions, under one strategy."""

  def __init__(self, config, trainable: bool, shapes: Shapes, recipe, strategy):
    self.strategy = strategy
    policy = recipe.mixed_precision
    with precision(policy), strategy.scope():
      self.body = models.build_body(config)
      self.body.trainable = trainable  # a frozen body (linear probing) stays frozen
      self.model = models.TaskModel(self.body, shapes.num_outputs)
      self.model.head(tf.zeros([1, 1, config.hidden_size]))
      self.variables = [v for v in self.model.trainable_variables if "pooler" not in v.name]
      self.schedule = optimizer_lib.LinearWarmupDecay.variable()
      self.optimizer = optimizer_lib.make_optimizer(recipe, 1, self.schedule)
      self.optimizer.build(self.variables)
      self.best_weights = [tf.Variable(v, trainable=False, name="best") for v in self.model.weights]
      self.run_seed = tf.Variable([0, 0], dtype=tf.int32, trainable=False, name="run_seed")
    seeds = dropout_lib.StepSeeds()
    dropout_lib.install(self.model, seeds)
    self.train_chunk = steps_lib.make_train_chunk(
        self.model, self.optimizer, self.variables, strategy, kind=shapes.kind,
        global_batch=shapes.global_batch, accumulation=shapes.accumulation, micro=shapes.micro,
        jit_compile=recipe.jit_compile, seeds=seeds, run_seed=self.run_seed)
    self.predict_step = steps_lib.make_predict_step(self.model, strategy)
    every = list(self.model.weights) + list(self.optimizer.variables) + self.best_weights
    self.bytes = sum(int(np.prod(v.shape)) * v.dtype.size for v in every)
    self.runs = 0  # fine-tunes started on it

  def start(self, body, seed: int, learning_rate: float, warmup: int, total: int,
            head: list | None = None) -> None:
    """Sets the state of a new fine-tune: ``body``'s weights (a TF body or
    :class:`BodyWeights`), a head drawn from ``seed`` (or ``head``'s weights, in the order
    of the head's ``weights``), a reset optimizer and schedule."""
    if isinstance(body, BodyWeights):
      body.assign(self.body)
    else:
      if len(body.weights) != len(self.body.weights):
        raise UserError(f"The body has {len(body.weights)} weights where its config builds "
                        f"{len(self.body.weights)}; was it changed after it was built?")
      for target, source in zip(self.body.weights, body.weights):
        target.assign(source.numpy())
    if head is None:
      draw_head(self.model.head, seed)
    else:
      for target, value in zip(self.model.head.weights, head, strict=True):
        target.assign(value)
    optimizer_lib.reset(self.optimizer)
    self.schedule.set(learning_rate, warmup, total)
    self.run_seed.assign(dropout_lib.run_seed(seed))
    self.runs += 1


def draw_head(head, seed: int) -> None:
  """Fresh head weights from ``seed``: each Dense layer's own initializers, seeded."""
  layers = head._flatten_layers(include_self=False)  # pylint: disable=protected-access
  dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
  for i, layer in enumerate(dense):
    layer_seed = int(np.random.default_rng([seed, i]).integers(2**31 - 1))
    config = layer.kernel_initializer.get_config()
    initializer = type(layer.kernel_initializer).from_config({**config, "seed": layer_seed})
    layer.kernel.assign(initializer(layer.kernel.shape, layer.kernel.dtype))
    if layer.bias is not None:
      layer.bias.assign(layer.bias_initializer(layer.bias.shape, layer.bias.dtype))


def architecture(config) -> str:
  """The fields of a body's config that decide what is built, as text."""
  fields = {k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in _NOT_ARCHITECTURE}
  return json.dumps(fields, sort_keys=True, default=str)


def get(config, trainable: bool, shapes: Shapes, recipe, strategy) -> tuple[Built, bool]:
  """A built model for these settings, and whether it was reused (else just built)."""
  key = (architecture(config), bool(trainable), shapes, recipe.mixed_precision,
         recipe.jit_compile, optimizer_lib.settings_key(recipe), id(strategy))
  built = _CACHE.pop(key, None)
  reused = built is not None and built.strategy is strategy
  if not reused:
    built = Built(config, trainable, shapes, recipe, strategy)
  _CACHE[key] = built
  _evict()
  return built, reused


def _evict() -> None:
  """Drops the least recently used models beyond the budget (never the newest)."""
  dropped = False
  while len(_CACHE) > 1 and sum(b.bytes for b in _CACHE.values()) > BUDGET_BYTES:
    _CACHE.popitem(last=False)
    dropped = True
  if dropped:
    gc.collect()


def clear() -> None:
  """Forgets every kept model (the next fine-tune builds its own)."""
  _CACHE.clear()
  gc.collect()
