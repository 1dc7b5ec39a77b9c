"""Tokenize once; batch by length so padding stays small; feed tf.data.

Each split is tokenized once into ragged id lists. Batches are formed from examples of
similar length (sorted within shuffled pools of ``pool_batches`` batches) and padded to the
smallest of a few bucket lengths that fits, so the model sees a small, fixed set of shapes
(``bucket_lengths``) and very little padding.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from cold_fusion_tf.data import Split


@dataclasses.dataclass
class Encoded:
  """A tokenized split: ragged ids (and segment ids), labels, lengths."""
  input_ids: list[np.ndarray]
  token_type_ids: Optional[list[np.ndarray]]
  labels: np.ndarray
  lengths: np.ndarray
  pad_id: int

  def __len__(self) -> int:
    return len(self.input_ids)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
  """Tokenizes a split once (truncating pairs longest-first to ``max_length``)."""
  enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length,
                  padding=False, return_attention_mask=False)
  ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
  types = None
  if "token_type_ids" in enc:
    types = [np.asarray(x, dtype=np.int32) for x in enc["token_type_ids"]]
  lengths = np.asarray([len(x) for x in ids], dtype=np.int32)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return Encoded(ids, types, split.labels, lengths, int(pad))


def bucket_lengths(max_length: int, smallest: int = 16) -> list[int]:
  """Powers of two from ``smallest`` up to ``max_length`` (which is always the last)."""
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  out.append(max_length)
  return out


def plan_batches(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                 pool_batches: int = 50, drop_remainder: bool = False) -> list[np.ndarray]:
  """Index arrays, one per batch, grouping examples of similar length.

  With ``shuffle``, examples are permuted, cut into pools of ``pool_batches`` batches,
  sorted by length within each pool, batched, and the batches permuted again.
  """
  n = len(lengths)
  if shuffle:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    pool = batch_size * pool_batches
    chunks = [order[i:i + pool] for i in range(0, n, pool)]
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks]) if n else order
  else:
    rng = None
    order = np.argsort(lengths, kind="stable")
  batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
  if drop_remainder and batches and len(batches[-1]) < batch_size:
    batches = batches[:-1]
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def pad_batch(encoded: Encoded, index: np.ndarray, buckets: Sequence[int],
              input_names: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads one batch to the smallest bucket that fits its longest example."""
  longest = int(encoded.lengths[index].max())
  width = next(b for b in buckets if b >= longest)
  ids = np.full((len(index), width), encoded.pad_id, dtype=np.int32)
  mask = np.zeros((len(index), width), dtype=np.int32)
  types = np.zeros((len(index), width), dtype=np.int32)
  for row, i in enumerate(index):
    length = encoded.lengths[i]
    ids[row, :length] = encoded.input_ids[i]
    mask[row, :length] = 1
    if encoded.token_type_ids is not None:
      types[row, :length] = encoded.token_type_ids[i]
  features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  return {k: features[k] for k in input_names}, encoded.labels[index]


def padding_fraction(encoded: Encoded, batches, buckets) -> float:
  """Share of padded positions in the planned batches (for progress logs and benchmarks)."""
  real = padded = 0
  for index in batches:
    longest = int(encoded.lengths[index].max())
    width = next(b for b in buckets if b >= longest)
    real += int(encoded.lengths[index].sum())
    padded += width * len(index)
  return 1.0 - real / max(padded, 1)


def make_dataset(encoded: Encoded, batches: list[np.ndarray], buckets: Sequence[int],
                 input_names: Sequence[str], label_dtype) -> tf.data.Dataset:
  """A prefetching tf.data pipeline over planned batches (variable batch length)."""

  def generate() -> Iterator:
    for index in batches:
      yield pad_batch(encoded, index, buckets, input_names)

  spec = ({k: tf.TensorSpec([None, None], tf.int32) for k in input_names},
          tf.TensorSpec([None], label_dtype))
  return tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(4)
