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
  if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)
                                or iteration < 0):
    raise UserError(f"iteration={iteration!r}: expected a base number (a whole number from 0), "
                    "or None for the store's latest base.")
  base_dir = refs.resolve(_location(store_or_dir), iteration, what="store_or_dir").directory
  return models.load_body(base_dir), models.load_tokenizer(base_dir)


def _location(store_or_dir) -> str:
  """``store_or_dir`` as a string, checked for what no store or model directory can be."""
  if not isinstance(store_or_dir, (str, os.PathLike)):
    raise UserError(f"store_or_dir={store_or_dir!r}: expected a store (a path or gs:// URI) "
                    "or a model directory, as a string.")
  location = os.fspath(store_or_dir)
  if (os.path.isfile(os.path.join(location, "metadata.json"))
      and not os.path.exists(os.path.join(location, "model.safetensors"))
      and not os.path.exists(os.path.join(location, "run.json"))):
    raise UserError(f"store_or_dir={location}: a keras-hub preset (export --format=keras_hub); "
                    "load it with keras_hub.models.Backbone.from_preset or TextClassifier."
                    "from_preset. load_base and keras_classifier take a store, a base directory "
                    "or an export with --format=hf.")
  return location


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
    texts = [_column(t) for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    if len(texts) == 2:
      with tf.control_dependencies([tf.debugging.assert_equal(
          tf.size(texts[0]), tf.size(texts[1]), message="text and text_pair need the same number "
          "of examples (an empty string for a missing second text)")]):
        texts = [tf.identity(t) for t in texts]
    segments = [self._tokenizer.tokenize(t) for t in texts]
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


def _column(texts):
  """One text per example: a ``(batch,)`` or ``(batch, 1)`` string tensor, as ``(batch,)``."""
  texts = tf.convert_to_tensor(texts)
  if texts.shape.rank is not None and (texts.shape.rank > 2 or (
      texts.shape.rank == 2 and texts.shape[-1] not in (1, None))):
    raise ValueError(f"Expected one text per example, a string tensor of shape (batch,) or "
                     f"(batch, 1); got shape {texts.shape}.")
  if texts.shape.rank == 2:
    texts = tf.squeeze(texts, axis=-1)
  return tf.reshape(texts, [-1])


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


def compile_classifier(model, num_labels: Optional[int] = None,
                       train_steps: Optional[int] = None, recipe=None) -> None:
  """Compiles with the paper's recipe (:class:`~cold_fusion_tf.training.recipe.Recipe`'s defaults updated by ``recipe``).

  ``num_labels`` (default: the model's outputs per example) must match the model's outputs:
  1 is regression (mean squared error), more is classification on logits. With
  ``train_steps`` the learning rate warms up linearly over ``warmup_fraction`` of them and
  decays linearly to 0 at ``train_steps``; without, it stays at the peak. Gradients are
  clipped by their global norm (``clip_norm``) either way, as in the trainer.
  """
  if not isinstance(model, keras.Model):
    raise UserError(f"model={type(model).__name__}: expected a tf-keras model (from "
                    "keras_classifier or load_classifier).")
  try:
    outputs = model.output_shape[-1]
  except (AttributeError, IndexError, TypeError):
    outputs = None  # a subclassed model not built yet: nothing to check against
  if num_labels is None:
    num_labels = outputs
  _check_num_labels(num_labels)
  if outputs is not None and num_labels != outputs:
    raise UserError(f"num_labels={num_labels}, but the model gives {outputs} output(s) per "
                    f"example; pass num_labels={outputs} (or leave it out).")
  settings = _settings(recipe, "compile_classifier")
  _check_steps(train_steps, settings)
  if train_steps is not None:
    # The recipe lives in training.make_optimizer; RecipeAdamW keeps its no-decay list
    # across save and reload.
    optimizer = RecipeAdamW.from_config(
        training.make_optimizer(settings, train_steps).get_config(),
        custom_objects={"LinearWarmupDecay": training.LinearWarmupDecay})
  else:
    optimizer = RecipeAdamW(
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, beta_1=0.9,
        beta_2=0.999, epsilon=settings.adam_epsilon,
        global_clipnorm=settings.clip_norm or None)
  if num_labels == 1:
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError())
  else:
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


OPTIMIZER_FIELDS = ("learning_rate", "warmup_fraction", "weight_decay", "adam_epsilon",
                    "clip_norm")
"""The recipe fields the compiled optimizer uses (``keras_classifier`` also ``max_length``)."""


def _settings(recipe, caller: str, used=OPTIMIZER_FIELDS) -> Recipe:
  """:class:`Recipe`'s defaults updated by ``recipe`` (a mapping of its fields), checked.

  A field that would have no effect here (``batch_size``, ``epochs``, ...) is refused, not
  ignored. A :class:`Recipe` (or a config's recipe section) is taken whole.
  """
  if recipe is None or isinstance(recipe, Recipe):
    return recipe or Recipe()
  if not isinstance(recipe, Mapping) and callable(getattr(recipe, "to_dict", None)):
    return Recipe.from_config(recipe, "recipe")  # a ConfigDict section, taken whole
  if not isinstance(recipe, Mapping):
    raise UserError(f"recipe={recipe!r}: expected a mapping of recipe fields, e.g. "
                    '{"learning_rate": 2e-5}.')
  settings = Recipe.from_config({**Recipe().to_dict(), **dict(recipe)}, "recipe")
  unused = sorted(str(k) for k in recipe if k not in used)
  if unused:
    raise UserError(f"recipe: {', '.join(unused)} would have no effect in {caller}, which "
                    f"uses only {', '.join(used)}. Give the batch size and epochs to "
                    "model.fit, the schedule's length as train_steps=, the seed as seed=.")
  return settings


def _check_num_labels(num_labels) -> None:
  if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
    raise UserError(f"num_labels={num_labels!r}: expected a positive integer (1 for "
                    "regression, the number of classes for classification).")


def _check_steps(train_steps, settings: Recipe) -> None:
  if train_steps is not None and (not isinstance(train_steps, int) or isinstance(
      train_steps, bool) or not 1 <= train_steps < 2**63):
    raise UserError(f"train_steps={train_steps!r}: expected a positive integer (epochs x "
                    "batches per epoch, below 2**63: the step counter is int64), or None for a "
                    "constant learning rate.")
  if train_steps == 1 and settings.warmup_fraction > 0:
    raise UserError("train_steps=1: the warm-up (at least one step) would give the only step a "
                    "learning rate of 0; train longer, pass recipe={'warmup_fraction': 0.0}, "
                    "or None for a constant learning rate.")


def keras_classifier(store_or_dir: str, num_labels: int, *, iteration: Optional[int] = None,
                     inputs: str = "text", text_pair: bool = False,
                     max_length: Optional[int] = None, train_steps: Optional[int] = None,
                     recipe=None, seed: Optional[int] = None):
  """A compiled tf-keras classifier: a published base's body plus a fresh head.

  Args:
    store_or_dir: a store URI or a model directory (see :func:`load_base`).
    num_labels: number of classes; 1 makes a regression model (mean squared error).
      ``num_labels=2`` is binary classification with two logits (labels 0 and 1).
    iteration: which base of a store (default: the latest).
    inputs: ``"text"``: the model takes raw strings (a string tensor; with ``text_pair`` a
      dict ``{"text": ..., "text_pair": ...}``), WordPiece vocabularies only. ``"ids"``: a
      dict of int32 token-id tensors as the tokenizer returns them (``input_ids``,
      ``attention_mask``, and ``token_type_ids`` for BERT), any model.
    text_pair: with ``inputs="text"``, take sentence pairs.
    max_length: tokens per example for ``inputs="text"`` (default: the recipe's, 128, or the
      model's positions if fewer); above the model's positions it is refused.
    train_steps: optimizer steps the learning-rate schedule spans (epochs x batches per
      epoch); None keeps the learning rate constant at its peak.
    recipe: overrides of :class:`cold_fusion_tf.training.recipe.Recipe`'s fields (``learning_rate``,
      ``warmup_fraction``, ``weight_decay``, ``adam_epsilon``, ``clip_norm``, and
      ``max_length`` for ``inputs="text"``); a field with no effect here is refused.
    seed: seeds the head's initialisation and dropout.

  Returns:
    A compiled ``tf_keras.Model`` producing logits (or the regression score).
  """
  _check_num_labels(num_labels)
  if inputs not in ("text", "ids"):
    raise UserError(f"inputs={inputs!r}: expected 'text' or 'ids'.")
  if not isinstance(text_pair, bool):
    raise UserError(f"text_pair={text_pair!r}: expected True or False.")
  if inputs == "ids" and (text_pair or max_length is not None):
    raise UserError(f"{'text_pair=True' if text_pair else f'max_length={max_length!r}'} applies "
                    "to inputs='text'. With inputs='ids' the tokenizer makes pairs and "
                    "truncates: dict(tokenizer(texts, pairs, truncation=True, max_length=N, "
                    "padding=True, return_tensors='tf')).")
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                           or not 0 <= seed < 2**32):
    raise UserError(f"seed={seed!r}: expected an integer from 0 to 2**32 - 1, or None.")
  used = OPTIMIZER_FIELDS + (("max_length",) if inputs == "text" else ())
  settings = _settings(recipe, "keras_classifier", used)
  _check_steps(train_steps, settings)
  if max_length is not None:  # checked as the recipe's field is
    settings = Recipe.from_config({**settings.to_dict(), "max_length": max_length},
                                  "keras_classifier")
  asked = max_length if max_length is not None else (
      recipe.get("max_length") if isinstance(recipe, Mapping) else None)
  if seed is not None:
    models.set_seed(seed)
  body, tokenizer = load_base(store_or_dir, iteration)
  config = body.config
  if num_labels * config.hidden_size >= 2**31:
    raise UserError(f"num_labels={num_labels}: a head of {num_labels} x {config.hidden_size} "
                    "weights is more than TensorFlow holds in one tensor (2**31 values); "
                    "give the number of classes of your task.")
  names = models.body_input_names(body)
  if inputs == "text":
    longest = hf_config.max_positions(config)
    if asked is not None and asked > longest:
      default = min(Recipe().max_length, longest)
      raise UserError(f"max_length={asked}: above the {longest} positions this model takes; "
                      f"give at most {longest}, or leave it out ({default}).")
    length = min(settings.max_length, longest)
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
  try:
    logits = head(hidden)
  except tf.errors.ResourceExhaustedError:
    raise UserError(f"num_labels={num_labels}: not enough memory for a head of {num_labels} x "
                    f"{config.hidden_size} weights; give the number of classes of your task."
                    ) from None
  model = keras.Model(model_inputs, logits, name=f"cold_fusion_{config.model_type}")
  compile_classifier(model, num_labels, train_steps, settings)
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
  Transformers main layers, TensorFlow Text's ops) and restores the optimizer state (its step
  and moments; ``.keras`` file or SavedModel), so that training goes on where it stopped.
  ``safe_mode`` stays on.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  for model_type in ("bert", "roberta", "xlm_roberta", "electra", "distilbert"):
    # Registers the main layers (``Custom>TFBertMainLayer``, ...) with Keras.
    importlib.import_module(f"transformers.models.{model_type}.modeling_tf_{model_type}")
  if not isinstance(path, (str, os.PathLike)):
    raise UserError(f"path={path!r}: expected the .keras file or SavedModel directory that "
                    "model.save wrote.")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"{path}: no saved model there.")
  try:
    model = keras.models.load_model(
        path, compile=compile,
        custom_objects={"LinearWarmupDecay": training.LinearWarmupDecay,
                        "ClassifierHead": ClassifierHead, "WordPieceEncoder": WordPieceEncoder,
                        "RecipeAdamW": RecipeAdamW})
  except (OSError, ValueError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    raise UserError(f"{path}: not a model saved from keras_classifier ({reason[:300]}); give "
                    "the .keras file or SavedModel directory that model.save wrote.") from None
  if isinstance(getattr(model, "optimizer", None), RecipeAdamW):
    model.optimizer.build(model.trainable_variables)  # restores the saved optimizer state
    checkpoint = os.path.join(path, "variables", "variables")
    if os.path.isdir(path) and tf.io.gfile.exists(checkpoint + ".index"):
      # A SavedModel holds the optimizer's state in its checkpoint, which load_model leaves
      # unread: read it, so that training goes on where it stopped (step, moments).
      tf.train.Checkpoint(root=model).read(checkpoint).expect_partial()
  return model
