"""A published base as a tf-keras model: ``load_base``, ``keras_classifier``, ``load_classifier``.

``load_base(store_or_dir, iteration=None)`` gives the TF body (``TFBertModel``,
``TFRobertaModel``, ...) and its tokenizer, from a store (the latest base by default) or from
a model directory. ``keras_classifier(store_or_dir, num_labels)`` gives a compiled functional
tf-keras model: the body's main layer plus a fresh head, optimised with the paper's recipe
(AdamW, linear warm-up over 0.6% of ``train_steps`` then linear decay, weight decay 0.01 off
LayerNorm weights and biases, gradients clipped to norm 1.0). It takes raw strings
(``inputs="text"``: WordPiece vocabularies, tokenized inside the graph with TensorFlow Text,
the same ids as the Hugging Face tokenizer) or token ids (``inputs="ids"``: any model). Saved
with ``model.save("x.keras")`` or ``model.save("dir", save_format="tf")``, it reloads with
:func:`load_classifier` and predicts the same.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras as keras  # pylint: disable=g-import-not-at-top

from cold_fusion_tf.model import bodies as models  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.model import hf_config  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.store import refs  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.training import trainer as training  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.training.recipe import Recipe  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top

PACKAGE = "cold_fusion_tf"


def load_base(store_or_dir: str, iteration: Optional[int] = None):
  """``(body, tokenizer)``: the TF body of a published base and its Hugging Face tokenizer.

  ``store_or_dir`` is a store URI (the latest base unless ``iteration`` is given) or a model
  directory (a base, or the output of ``python -m cold_fusion_tf.export``). Weights are
  checked (names, shapes, dtypes, finiteness; sha256 against the manifest for stores).
  """
  base_dir = refs.resolve(store_or_dir, iteration, what="store_or_dir").directory
  return models.load_body(base_dir), models.load_tokenizer(base_dir)


@keras.utils.register_keras_serializable(package=PACKAGE)
class ClassifierHead(models.TaskHead):
  """The fresh task head (:class:`models.TaskHead`), serialisable with the model."""

  def __init__(self, num_outputs: int, hidden_size: int, dropout: float,
               initializer_range: float = 0.02, **kwargs):
    super().__init__(num_outputs, hidden_size, dropout, initializer_range, **kwargs)
    self._args = {"num_outputs": num_outputs, "hidden_size": hidden_size, "dropout": dropout,
                  "initializer_range": initializer_range}

  def get_config(self):
    return {**super().get_config(), **self._args}


@keras.utils.register_keras_serializable(package=PACKAGE)
class WordPieceEncoder(keras.layers.Layer):
  """Raw strings (one text, or a text and a pair) -> padded ids, as the HF BERT tokenizer.

  ``[CLS] text [SEP]`` or ``[CLS] text [SEP] pair [SEP]`` with segment ids 0/1, truncated to
  ``max_length`` tokens the way ``truncation=True`` (longest first) does, padded to the
  longest example of the batch. Runs in the graph (TensorFlow Text ``FastBertTokenizer``), so
  the model saves and serves without Python tokenizers.
  """

  def __init__(self, vocabulary, lowercase: bool, max_length: int, output_names,
               cls_id: int, sep_id: int, pad_id: int, unknown_token: str = "[UNK]",
               max_bytes_per_word: int = 100, **kwargs):
    kwargs["trainable"] = False
    super().__init__(**kwargs)
    import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
    self.vocabulary = list(vocabulary)
    self.lowercase = bool(lowercase)
    self.max_length = int(max_length)
    self.output_names = tuple(output_names)
    self.cls_id, self.sep_id, self.pad_id = int(cls_id), int(sep_id), int(pad_id)
    self.unknown_token = unknown_token
    self.max_bytes_per_word = int(max_bytes_per_word)
    self._tokenizer = tf_text.FastBertTokenizer(
        vocab=self.vocabulary, token_out_type=tf.int32, unknown_token=unknown_token,
        max_bytes_per_word=self.max_bytes_per_word,
        lower_case_nfd_strip_accents=self.lowercase)
    self._combine = tf_text.combine_segments

  def call(self, inputs):
    texts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    segments = [self._tokenizer.tokenize(tf.reshape(t, [-1])) for t in texts]
    if len(segments) == 1:
      keep = [tf.fill(tf.shape(segments[0].row_lengths()), self.max_length - 2)]
    else:
      keep = _longest_first(segments[0].row_lengths(), segments[1].row_lengths(),
                            self.max_length - 3)
    segments = [_truncate(s, k) for s, k in zip(segments, keep)]
    ids, types = self._combine(segments, self.cls_id, self.sep_id)
    features = {"input_ids": ids.to_tensor(default_value=self.pad_id),
                "attention_mask": tf.ones_like(ids).to_tensor(default_value=0),
                "token_type_ids": tf.cast(types, tf.int32).to_tensor(default_value=0)}
    return {name: features[name] for name in self.output_names}

  def get_config(self):
    return {**super().get_config(), "vocabulary": self.vocabulary, "lowercase": self.lowercase,
            "max_length": self.max_length, "output_names": list(self.output_names),
            "cls_id": self.cls_id, "sep_id": self.sep_id, "pad_id": self.pad_id,
            "unknown_token": self.unknown_token, "max_bytes_per_word": self.max_bytes_per_word}


def _longest_first(n1, n2, budget: int):
  """Tokens kept per segment under Hugging Face's ``longest_first`` pair truncation."""
  n1, n2 = tf.cast(n1, tf.int32), tf.cast(n2, tf.int32)
  short = tf.minimum(n1, n2)
  long_keep = tf.where(short > budget, short, tf.maximum(short, budget - short))
  over = short + long_keep > budget
  short_keep = tf.where(over, budget // 2, short)
  long_keep = tf.where(over, budget // 2 + budget % 2, long_keep)
  swapped = n1 > n2
  return [tf.where(swapped, long_keep, short_keep), tf.where(swapped, short_keep, long_keep)]


def _truncate(ragged, keep):
  """The first ``keep[i]`` tokens of each row ``i``."""
  positions = tf.ragged.range(tf.cast(ragged.row_lengths(), tf.int32))
  return tf.ragged.boolean_mask(ragged, positions < tf.expand_dims(keep, 1))


def wordpiece_settings(tokenizer) -> dict:
  """What :class:`WordPieceEncoder` needs from a Hugging Face WordPiece tokenizer."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None or type(backend.model).__name__ != "WordPiece":
    raise UserError(
        f"inputs='text' needs a WordPiece vocabulary (BERT, ELECTRA, DistilBERT); this base "
        f"has {type(tokenizer).__name__}. Use inputs='ids' with the tokenizer from load_base, "
        "or the keras-hub export for raw strings.")
  vocab = tokenizer.get_vocab()
  ordered = sorted(vocab, key=vocab.get)
  if [vocab[t] for t in ordered] != list(range(len(ordered))):
    raise UserError("The WordPiece vocabulary does not have contiguous ids 0..n-1.")
  lowercase = bool(getattr(tokenizer, "do_lower_case", False))
  strip_accents = tokenizer.init_kwargs.get("strip_accents")
  if strip_accents is not None and bool(strip_accents) != lowercase:
    raise UserError(f"strip_accents={strip_accents} with do_lower_case={lowercase} cannot be "
                    "tokenized in the graph; use inputs='ids'.")
  return {"vocabulary": ordered, "lowercase": lowercase, "cls_id": tokenizer.cls_token_id,
          "sep_id": tokenizer.sep_token_id, "pad_id": tokenizer.pad_token_id,
          "unknown_token": tokenizer.unk_token}


@keras.utils.register_keras_serializable(package=PACKAGE)
class RecipeAdamW(keras.optimizers.AdamW):
  """AdamW without weight decay on LayerNorm weights and biases, also after a reload."""

  def __init__(self, *args, no_decay=training.NO_DECAY, **kwargs):
    super().__init__(*args, **kwargs)
    self.no_decay = list(no_decay)
    self.exclude_from_weight_decay(var_names=self.no_decay)

  def get_config(self):
    return {**super().get_config(), "no_decay": self.no_decay}

  def load_own_variables(self, store):
    """tf-keras skips a saved state when the optimizer is not built yet (as after
    ``load_model``): keep it and assign it in :meth:`build`."""
    if getattr(self, "_built", False):
      super().load_own_variables(store)
      return
    self._saved_state = [np.array(store[str(i)]) for i in range(len(store.keys()))]

  def build(self, var_list):
    super().build(var_list)
    saved, self._saved_state = getattr(self, "_saved_state", None), None
    if saved is None:
      return
    if len(saved) != len(self.variables):
      raise UserError(f"The saved optimizer state has {len(saved)} variables, the model's "
                      f"optimizer {len(self.variables)}; was the model changed after saving?")
    with tf.init_scope():
      for variable, value in zip(self.variables, saved):
        variable.assign(value)


def compile_classifier(model, num_labels: int, train_steps: Optional[int] = None,
                       recipe=None) -> None:
  """Compiles with the paper's recipe (:class:`~cold_fusion_tf.training.recipe.Recipe`'s defaults updated by ``recipe``).

  With ``train_steps`` the learning rate warms up linearly over ``warmup_fraction`` of them
  and decays linearly to 0 at ``train_steps``; without, it stays at the peak.
  """
  settings = _settings(recipe)
  _check_steps(train_steps)
  if train_steps is not None:
    # The recipe lives in training.make_optimizer; RecipeAdamW keeps its no-decay list
    # across save and reload.
    optimizer = RecipeAdamW.from_config(
        training.make_optimizer(settings, train_steps).get_config(),
        custom_objects={"LinearWarmupDecay": training.LinearWarmupDecay})
  else:
    optimizer = RecipeAdamW(
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, beta_1=0.9,
        beta_2=0.999, epsilon=settings.adam_epsilon, clipnorm=settings.clip_norm or None)
  if num_labels == 1:
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError())
  else:
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def _settings(recipe) -> Recipe:
  """:class:`Recipe`'s defaults updated by ``recipe`` (a mapping of its fields), checked."""
  if recipe is not None and not isinstance(recipe, Mapping):
    raise UserError(f"recipe={recipe!r}: expected a mapping of recipe fields, e.g. "
                    '{"learning_rate": 2e-5}.')
  return Recipe.from_config({**Recipe().to_dict(), **dict(recipe or {})}, "recipe")


def _check_steps(train_steps) -> None:
  if train_steps is not None and (not isinstance(train_steps, int) or isinstance(
      train_steps, bool) or train_steps < 1):
    raise UserError(f"train_steps={train_steps!r}: expected a positive integer.")


def keras_classifier(store_or_dir: str, num_labels: int, *, iteration: Optional[int] = None,
                     inputs: str = "text", text_pair: bool = False,
                     max_length: Optional[int] = None, train_steps: Optional[int] = None,
                     recipe=None, seed: Optional[int] = None):
  """A compiled tf-keras classifier: a published base's body plus a fresh head.

  Args:
    store_or_dir: a store URI or a model directory (see :func:`load_base`).
    num_labels: number of classes; 1 makes a regression model (mean squared error).
    iteration: which base of a store (default: the latest).
    inputs: ``"text"``: the model takes raw strings (a string tensor; with ``text_pair`` a
      dict ``{"text": ..., "text_pair": ...}``), WordPiece vocabularies only. ``"ids"``: a
      dict of int32 token-id tensors as the tokenizer returns them (``input_ids``,
      ``attention_mask``, and ``token_type_ids`` for BERT), any model.
    text_pair: with ``inputs="text"``, take sentence pairs.
    max_length: tokens per example for ``inputs="text"`` (default: the recipe's, 128).
    train_steps: optimizer steps the learning-rate schedule spans (epochs x batches per
      epoch); None keeps the learning rate constant at its peak.
    recipe: overrides of :class:`cold_fusion_tf.training.recipe.Recipe`'s fields (``learning_rate``,
      ``warmup_fraction``, ``weight_decay``, ``adam_epsilon``, ``clip_norm``).
    seed: seeds the head's initialisation and dropout.

  Returns:
    A compiled ``tf_keras.Model`` producing logits (or the regression score).
  """
  if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
    raise UserError(f"num_labels={num_labels!r}: expected a positive integer.")
  if inputs not in ("text", "ids"):
    raise UserError(f"inputs={inputs!r}: expected 'text' or 'ids'.")
  _check_steps(train_steps)
  settings = _settings(recipe)
  if max_length is not None:  # checked as the recipe's field is
    settings = Recipe.from_config({**settings.to_dict(), "max_length": max_length},
                                  "keras_classifier")
  if seed is not None:
    models.set_seed(seed)
  body, tokenizer = load_base(store_or_dir, iteration)
  config = body.config
  names = models.body_input_names(body)
  if inputs == "text":
    length = min(settings.max_length, hf_config.max_positions(config))
    if length < 4:
      raise UserError(f"max_length={length}: needs room for the special tokens (at least 4).")
    encoder = WordPieceEncoder(max_length=length, output_names=names, name="tokenize",
                               **wordpiece_settings(tokenizer))
    if text_pair:
      model_inputs = {"text": keras.Input(shape=(), dtype=tf.string, name="text"),
                      "text_pair": keras.Input(shape=(), dtype=tf.string, name="text_pair")}
      features = encoder([model_inputs["text"], model_inputs["text_pair"]])
    else:
      model_inputs = keras.Input(shape=(), dtype=tf.string, name="text")
      features = encoder(model_inputs)
  else:
    model_inputs = {n: keras.Input(shape=(None,), dtype=tf.int32, name=n) for n in names}
    features = model_inputs
  main = _main_layer_without_pooler(body)
  hidden = main(dict(features))[0]
  dropout = getattr(config, "hidden_dropout_prob", None)
  if dropout is None:
    dropout = getattr(config, "dropout", 0.1)
  head = ClassifierHead(num_labels, config.hidden_size, dropout,
                        getattr(config, "initializer_range", 0.02), name="head")
  model = keras.Model(model_inputs, head(hidden), name=f"cold_fusion_{config.model_type}")
  compile_classifier(model, num_labels, train_steps, recipe)
  return model


def _main_layer_without_pooler(body):
  """The body's main layer (``TFBertMainLayer``, ...) without its pooler.

  The head reads the first token's hidden state, so the pooler would only be dead weight
  (and variables without gradients). The layer is rebuilt with ``add_pooling_layer=False``
  (kept in its Keras config, so a reloaded model has the same variables) and the body's
  weights are copied over by name.
  """
  main = getattr(body, body.base_model_prefix)
  if getattr(main, "pooler", None) is None:
    return main
  fresh = type(main)(body.config, add_pooling_layer=False, name=main.name)
  fresh(body.dummy_inputs, training=False)

  def relative(variable):
    return variable.name[variable.name.find(f"{main.name}/"):]

  source = {relative(v): v for v in main.weights if f"{main.name}/pooler/" not in relative(v)}
  for variable in fresh.weights:
    value = source.pop(relative(variable), None)
    if value is None or tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"No matching body weight for {variable.name}.")
    variable.assign(value)
  if source:
    raise ValueError(f"Body weights left unassigned: {sorted(source)[:5]}.")
  return fresh


def load_classifier(path: str, compile: bool = True):  # pylint: disable=redefined-builtin
  """Reloads a model saved from :func:`keras_classifier` (``.keras`` file or SavedModel dir).

  Registers what the saved model refers to (this package's layers and optimizer, the
  Transformers main layers, TensorFlow Text's ops) and, for a ``.keras`` file, restores the
  optimizer state so that training can go on. ``safe_mode`` stays on.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  for model_type in ("bert", "roberta", "xlm_roberta", "electra", "distilbert"):
    # Registers the main layers (``Custom>TFBertMainLayer``, ...) with Keras.
    importlib.import_module(f"transformers.models.{model_type}.modeling_tf_{model_type}")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"{path}: no saved model there.")
  model = keras.models.load_model(
      path, compile=compile,
      custom_objects={"LinearWarmupDecay": training.LinearWarmupDecay,
                      "ClassifierHead": ClassifierHead, "WordPieceEncoder": WordPieceEncoder,
                      "RecipeAdamW": RecipeAdamW})
  if isinstance(getattr(model, "optimizer", None), RecipeAdamW):
    model.optimizer.build(model.trainable_variables)  # restores the saved optimizer state
  return model
