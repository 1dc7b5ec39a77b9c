"""The body a contributor trains, behind one small interface (``config.model.body``).

* ``transformers_tf`` (the default): a transformers TF model (``TFBertModel``,
  ``TFRobertaModel``, ...) on tf-keras, trained by :mod:`cold_fusion_tf.training.trainer`.
  Every model type in :data:`~cold_fusion_tf.model.hf_config.SUPPORTED_MODEL_TYPES`.
* ``keras_hub``: a keras-hub backbone on Keras 3 (:mod:`cold_fusion_tf.model.keras_hub_body`),
  trained with Keras ``fit`` (:mod:`cold_fusion_tf.training.keras_trainer`) on the TensorFlow
  or the JAX backend (``config.model.backend``). BERT and RoBERTa.

Whichever body trains, a contribution is the same Hugging Face-named ``body.safetensors``: a
body is built from a base directory, gives its tensors out in Hugging Face names and layouts
(:meth:`Body.hf_tensors`) and takes them in the same way (:meth:`Body.assign_hf_tensors`).

Keras 3 reads its backend from ``KERAS_BACKEND`` once, when ``keras`` is first imported:
:func:`select_backend` sets it before that happens (or says how, when it is too late).
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

from cold_fusion_tf.errors import UserError

BODY_TYPES = ("transformers_tf", "keras_hub")
BACKENDS = ("tensorflow", "jax")


class Body(Protocol):
  """What a contributor needs of a body."""

  body_type: str        # one of BODY_TYPES
  backend: str          # the framework it runs on: tensorflow or jax
  model_type: str       # bert, roberta, ...
  input_names: tuple[str, ...]  # the tokenizer outputs it takes

  def hf_tensors(self) -> dict:
    """Its weights as numpy arrays under Hugging Face names, in Hugging Face layouts."""

  def assign_hf_tensors(self, tensors, source: str) -> None:
    """Sets its weights from Hugging Face-named tensors, after checking them all."""

  def finetune(self, tokenizer, task, recipe, **kwargs):
    """Fine-tunes it in place with a fresh head; a ``FinetuneResult``."""


def settings(config) -> tuple[str, str]:
  """(body type, backend) of a config's ``model`` section, checked."""
  body_type = config.model.get("body", "transformers_tf")
  backend = config.model.get("backend", "") or ""
  if body_type not in BODY_TYPES:
    raise UserError(f"--config.model.body={body_type!r} is not one of {', '.join(BODY_TYPES)}.")
  if body_type == "transformers_tf":
    if backend not in ("", "tensorflow"):
      raise UserError(f"--config.model.backend={backend!r}: the transformers_tf body runs on "
                      "TensorFlow only; use --config.model.body=keras_hub for JAX.")
    return body_type, "tensorflow"
  backend = backend or os.environ.get("KERAS_BACKEND", "") or "tensorflow"
  if backend not in BACKENDS:
    raise UserError(f"--config.model.backend={backend!r} is not one of {', '.join(BACKENDS)}.")
  return body_type, backend


def select_backend(backend: str) -> None:
  """Makes ``backend`` Keras 3's backend in this process; an error if Keras 3 is already
  loaded with another one. On JAX, TensorFlow (which still runs the input pipeline) is
  kept off the GPUs, so that JAX has their memory."""
  loaded = sys.modules.get("keras")
  if loaded is not None and getattr(loaded, "__version__", "3").startswith("3"):
    current = loaded.backend.backend()
    if current != backend:
      raise UserError(f"Keras 3 is already running on {current} in this process; start the "
                      f"program with KERAS_BACKEND={backend} in its environment.")
  else:
    os.environ["KERAS_BACKEND"] = backend
  if backend == "jax":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already placed something; it keeps its devices
      pass


def make_strategy(config, body_type: str, backend: str):
  """Where training runs: a ``tf.distribute`` strategy for ``config.strategy`` on
  TensorFlow, a :class:`~cold_fusion_tf.training.keras_distribution.KerasDistribution` on JAX."""
  if backend == "jax":
    from cold_fusion_tf.training import keras_distribution  # pylint: disable=g-import-not-at-top
    return keras_distribution.make_distribution(config.get("strategy", "auto"))
  from cold_fusion_tf.training import distribute  # pylint: disable=g-import-not-at-top
  return distribute.make(config.get("strategy", "auto"), config.get("tpu", ""))


def check_batch(recipe, strategy) -> None:
  """Fails unless the batch divides over the replicas and accumulation steps."""
  from cold_fusion_tf.training import keras_distribution  # pylint: disable=g-import-not-at-top
  if isinstance(strategy, keras_distribution.KerasDistribution):
    keras_distribution.batch_split(recipe, strategy)
    return
  from cold_fusion_tf.training import distribute  # pylint: disable=g-import-not-at-top
  distribute.check_recipe_batch(recipe, strategy)


def load(base_dir: str, body_type: str, recipe, strategy, source: str | None = None):
  """(body, tokenizer) of a base directory, the body's variables made in ``strategy``'s
  scope with the recipe's precision."""
  if body_type == "keras_hub":
    from cold_fusion_tf.model import keras_hub_body  # pylint: disable=g-import-not-at-top
    body = keras_hub_body.load(base_dir, dtype=recipe.mixed_precision or None,
                               scope=strategy.scope(), source=source)
    return body, keras_hub_body.load_tokenizer(base_dir)
  return TransformersTFBody.load(base_dir, recipe, strategy, source)


def set_seed(seed: int, body_type: str) -> None:
  """Seeds Python, numpy and the body's framework.

  The transformers-TF trainer draws the head and dropout from the recipe's seed itself, so
  TensorFlow's global seed is left alone there: setting it clears TensorFlow's kernel caches,
  and a model kept from an earlier fine-tune in the process would compile its step functions
  again (:mod:`cold_fusion_tf.training.model_cache`).
  """
  if body_type == "keras_hub":
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(seed)
  else:
    import random  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    random.seed(seed)
    np.random.seed(seed)


class TransformersTFBody:
  """A transformers TF model (``model``) as a :class:`Body`."""

  body_type = "transformers_tf"
  backend = "tensorflow"

  def __init__(self, model):
    self.model = model
    self.model_type = model.config.model_type
    from cold_fusion_tf.model import bodies  # pylint: disable=g-import-not-at-top
    self.input_names = bodies.body_input_names(model)

  @classmethod
  def load(cls, base_dir: str, recipe, strategy, source: str | None = None):
    # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.model import bodies
    from cold_fusion_tf.training import trainer
    # pylint: enable=g-import-not-at-top
    with trainer.precision(recipe.mixed_precision), strategy.scope():
      model = bodies.load_body(base_dir, source)
    return cls(model), bodies.load_tokenizer(base_dir)

  def hf_tensors(self) -> dict:
    from cold_fusion_tf.model import hf_names  # pylint: disable=g-import-not-at-top
    return hf_names.body_tensors(self.model)

  def assign_hf_tensors(self, tensors, source: str) -> None:
    from cold_fusion_tf.model import hf_names  # pylint: disable=g-import-not-at-top
    hf_names.assign_body_tensors(self.model, tensors, source)

  def finetune(self, tokenizer, task, recipe, **kwargs):
    from cold_fusion_tf.training import trainer  # pylint: disable=g-import-not-at-top
    return trainer.finetune(self.model, tokenizer, task, recipe, **kwargs)
