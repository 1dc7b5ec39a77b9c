"""A base's tokenizer from its ``tokenizer.json``, through the ``tokenizers`` library only.

The keras-hub body uses it, so a Keras 3 contributor imports nothing from transformers.
``tokenizer.json`` is the file a Hugging Face fast tokenizer is defined by (normaliser,
pre-tokenizer, vocabulary, special-token template), so the ids are the ones the
transformers-TF body's ``AutoTokenizer`` gives: pairs are truncated longest-first to
``max_length`` with the special tokens counted, as ``truncation=True`` does there.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

# The families whose bodies take segment ids (token_type_ids).
_WITH_SEGMENTS = ("bert", "electra")
_DEFAULT_PAD = {"bert": "[PAD]", "electra": "[PAD]", "distilbert": "[PAD]", "roberta": "<pad>",
                "xlm-roberta": "<pad>"}


class Tokenizer:
  """The call interface of a Hugging Face fast tokenizer that training uses: ids (and
  segment ids) of texts or text pairs, unpadded, truncated to ``max_length``."""

  def __init__(self, backend, pad_token_id: int, segments: bool):
    self.backend_tokenizer = backend
    self.pad_token_id = pad_token_id
    self.segments = segments

  def __len__(self) -> int:
    """The vocabulary size, added tokens included (as ``len()`` of a transformers tokenizer)."""
    return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, *,
               truncation: bool = True, max_length: int | None = None, padding: bool = False,
               return_attention_mask: bool = False) -> dict[str, list[list[int]]]:
    del return_attention_mask  # the trainers build the mask from the lengths
    if padding:
      raise ValueError("Tokenizer returns unpadded ids; batches are padded by the trainer.")
    backend = self.backend_tokenizer
    backend.no_padding()
    if truncation and max_length:
      backend.enable_truncation(max_length, strategy="longest_first")
    else:
      backend.no_truncation()
    batch = list(texts) if pairs is None else list(zip(texts, pairs))
    encodings = backend.encode_batch(batch, add_special_tokens=True)
    out = {"input_ids": [e.ids for e in encodings]}
    if self.segments:
      out["token_type_ids"] = [e.type_ids for e in encodings]
    return out


MAX_SETTINGS_BYTES = 4 << 20
MAX_TOKENIZER_BYTES = 256 << 20
"""The largest tokenizer.json read (multilingual ones are tens of megabytes)."""
# The tokenizer classes of the supported families (``tokenizer_class`` of tokenizer_config.json).
CLASSES = frozenset(f"{family}Tokenizer{fast}" for family in (
    "Bert", "Roberta", "XLMRoberta", "Electra", "DistilBert") for fast in ("", "Fast")) | {
        "PreTrainedTokenizerFast"}


def read_settings(model_dir: str, name: str = "tokenizer_config.json") -> dict:
  """A tokenizer's JSON settings file beside a base (``{}`` when there is none), read with
  limits; a UserError when it names code to run (``auto_map``) or a tokenizer class of
  another family than the supported ones, which this package never loads."""
  path = os.path.join(model_dir, name)
  try:
    data = untrusted.read_regular(path, MAX_SETTINGS_BYTES, follow_links=True)
  except FileNotFoundError:
    return {}
  settings = untrusted.loads(data, path)
  if not isinstance(settings, dict):
    raise UserError(f"{path}: expected a JSON object.")
  if "auto_map" in settings:
    raise UserError(f"{path}: names code to run (auto_map); a base never runs code of its own, "
                    "so this one is refused: use a base without custom code.")
  kind = settings.get("tokenizer_class")
  if kind is not None and kind not in CLASSES:
    raise UserError(f"{path}: tokenizer_class {untrusted.printable(repr(kind), 60)} is not a "
                    f"tokenizer of the supported families ({', '.join(sorted(CLASSES))}).")
  return settings


def check_ids(vocab: dict, model_dir: str) -> None:
  """Raises UserError when a tokenizer's ``vocab`` (token -> id, added tokens included) gives
  ids the embedding table of the base in ``model_dir`` (``vocab_size`` rows) does not have:
  the first text holding such a token would stop training or evaluation."""
  from cold_fusion_tf.model import hf_config  # pylint: disable=g-import-not-at-top
  rows = hf_config.sizes(hf_config.check(*hf_config.read_raw(model_dir)))["vocab_size"]
  highest = max(vocab.values(), default=-1)
  if highest >= rows:
    token = untrusted.printable(repr(max(vocab, key=vocab.get)), 60)
    raise UserError(f"{model_dir}: the tokenizer gives ids up to {highest} (token {token}), but "
                    f"the model has {rows} token embeddings (vocab_size); its tokenizer files do "
                    "not belong to its weights (a damaged or tampered base).")


def load(model_dir: str, model_type: str) -> Tokenizer:
  """The tokenizer saved beside a base (``tokenizer.json``; the pad token from
  ``special_tokens_map.json`` or ``tokenizer_config.json``)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "tokenizer.json")
  settings = read_settings(model_dir)  # refuses custom code and other families' tokenizers
  try:
    data = untrusted.read_regular(path, MAX_TOKENIZER_BYTES, follow_links=True)
  except FileNotFoundError:
    raise UserError(f"{path}: missing; the keras_hub body reads the fast tokenizer's "
                    "tokenizer.json (bases written by this package have one).") from None
  try:
    backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
  except Exception as e:  # the Rust parser's errors are plain Exceptions
    raise UserError(f"{path}: not a valid tokenizer "
                    f"({untrusted.printable(str(e), 200)}).") from None
  check_ids(backend.get_vocab(with_added_tokens=True), model_dir)
  pad = _DEFAULT_PAD.get(model_type, "[PAD]")
  for found in (read_settings(model_dir, "special_tokens_map.json"), settings):
    value = found.get("pad_token")
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str) and value:
      pad = value
      break
  pad_id = backend.token_to_id(pad)
  if pad_id is None:
    raise UserError(f"{path}: the pad token {pad!r} is not in the vocabulary.")
  return Tokenizer(backend, int(pad_id), model_type in _WITH_SEGMENTS)
