"""A base's tokenizer from its ``tokenizer.json``, through the ``tokenizers`` library only.

The keras-hub body uses it, so a Keras 3 contributor imports nothing from transformers.
``tokenizer.json`` is the file a Hugging Face fast tokenizer is defined by (normaliser,
pre-tokenizer, vocabulary, special-token template), so the ids are the ones the
transformers-TF body's ``AutoTokenizer`` gives: pairs are truncated longest-first to
``max_length`` with the special tokens counted, as ``truncation=True`` does there.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from cold_fusion_tf.errors import UserError

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


def load(model_dir: str, model_type: str) -> Tokenizer:
  """The tokenizer saved beside a base (``tokenizer.json``; the pad token from
  ``special_tokens_map.json`` or ``tokenizer_config.json``)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "tokenizer.json")
  try:
    backend = tokenizers.Tokenizer.from_file(path)
  except FileNotFoundError:
    raise UserError(f"{path}: missing; the keras_hub body reads the fast tokenizer's "
                    "tokenizer.json (bases written by this package have one).") from None
  except Exception as e:  # the Rust parser's errors are plain Exceptions
    raise UserError(f"{path}: not a valid tokenizer ({e}).") from e
  pad = _DEFAULT_PAD.get(model_type, "[PAD]")
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    try:
      with open(os.path.join(model_dir, name), encoding="utf-8") as f:
        value = json.load(f).get("pad_token")
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str) and value:
      pad = value
      break
  pad_id = backend.token_to_id(pad)
  if pad_id is None:
    raise UserError(f"{path}: the pad token {pad!r} is not in the vocabulary.")
  return Tokenizer(backend, int(pad_id), model_type in _WITH_SEGMENTS)
