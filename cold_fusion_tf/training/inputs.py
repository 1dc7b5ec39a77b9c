"""Tokenize once; batch by length so padding stays small; feed replicas through tf.data.

Each split is tokenized once per process (kept in memory, and cached on disk, local or
``gs://``, when a cache folder is given) into flat id arrays. An epoch is *planned* on the
host from a seed: examples are shuffled, sorted by length within pools of ``pool_batches``
batches, cut into batches (dropping the remainder), and each batch is padded to the smallest
bucket length that fits. The plan fixes the order of every step, so a resumed run skips to
its step index and sees the same data it would have seen.

The batches themselves are built by tf.data (gather and pad in the graph, no Python per
step) and split across replicas with ``distribute_datasets_from_function``: replica ``r`` of
step ``s`` gets rows ``r*P .. (r+1)*P`` of the step's global batch, on one machine or many.
With ``static_shapes`` (TPUs, XLA) there is one dataset per bucket length, each with a fully
static shape, and steps of one length run in groups of up to ``steps_per_execution``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
from typing import Callable, Optional, Sequence
import weakref
import zipfile

import numpy as np
import tensorflow as tf

from cold_fusion_tf.data import Split

CACHE_VERSION = 1
MEMORY_BYTES = 1 << 30  # tokenized splits kept in memory per process (the newest always)
PIPELINE_DEPTH = 2      # batches built in parallel, and batches ready ahead of the step
TOKENIZE_CHUNK = 4096   # examples tokenized per tokenizer call


@dataclasses.dataclass
class Encoded:
  """A tokenized split as flat arrays: ids (and segment ids) of all examples end to end."""
  ids: np.ndarray               # int32 [total tokens]
  types: Optional[np.ndarray]   # int32 [total tokens] or None
  lengths: np.ndarray           # int32 [examples]
  labels: np.ndarray            # int32 class ids or float32 scores [examples]
  pad_id: int

  def __post_init__(self):
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

  def __len__(self) -> int:
    return len(self.lengths)

  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.ids, self.types, self.lengths, self.labels, self.offsets)
               if a is not None)

  def row(self, i: int) -> np.ndarray:
    return self.ids[self.offsets[i]:self.offsets[i + 1]]

  def row_types(self, i: int) -> Optional[np.ndarray]:
    if self.types is None:
      return None
    return self.types[self.offsets[i]:self.offsets[i + 1]]


def token_cache(workdir: str | None) -> str | None:
  """A fine-tune's token cache folder: ``<workdir>/tokens`` (local or ``gs://``), or None."""
  return f"{workdir.rstrip('/')}/tokens" if workdir else None


def encode(tokenizer, split: Split, max_length: int, cache_dir: str | None = None,
           body_type: str = "transformers_tf") -> Encoded:
  """Tokenizes a split once (pairs are truncated longest-first to ``max_length``).

  The result is kept in memory under a key of the body type (``config.model.body``), the
  tokenizer, ``max_length`` and the texts, so the same split is tokenized once per process;
  with ``cache_dir`` (a local or ``gs://`` folder) it is also kept there under that key, and
  reused by later runs.
  """
  key = _cache_key(tokenizer, split, max_length, body_type)
  known = _KEPT.get(key)
  if known is not None:
    _KEPT.move_to_end(key)
    return known
  encoded = _encode(tokenizer, split, max_length, cache_dir, key)
  _KEPT[key] = encoded
  while len(_KEPT) > 1 and sum(e.nbytes() for e in _KEPT.values()) > MEMORY_BYTES:
    _KEPT.popitem(last=False)
  return encoded


def training_targets(encoded: Encoded, kind: str) -> Encoded:
  """A training split's labels as the loss sees them: regression scores standardized over the
  split (zero mean, unit variance; a split whose scores are all equal is only centred), class
  ids as they are.

  A fresh regression head starts near zero: fitted to raw scores (STS-B's 0-5, say), its first
  steps' large errors push the body around, and short fine-tunes land anywhere (Spearman
  0.19-0.54 for MiniLM on 500 STS-B pairs over three seeds; standardized, 0.68-0.70). The
  regression metrics (Spearman, Pearson) do not change under this affine map, so the outputs
  are scored against the labels as given.
  """
  if kind != "regression" or not len(encoded):
    return encoded
  labels = encoded.labels.astype(np.float64)
  scale = labels.std()
  scale = scale if scale > 0 else 1.0
  return dataclasses.replace(encoded, labels=((labels - labels.mean()) / scale).astype(np.float32))


def start_splits(tokenize: Callable[[str], Encoded], kind: str) -> dict[str, Encoded]:
  """The splits a fine-tune starts with, by name: ``train`` with its labels as the loss sees
  them (:func:`training_targets`), and ``dev``; ``tokenize(split)`` tokenizes one."""
  return {"train": training_targets(tokenize("train"), kind), "dev": tokenize("dev")}


_KEPT: "collections.OrderedDict[str, Encoded]" = collections.OrderedDict()
_SPECS: dict[int, tuple[weakref.ref, int, bytes]] = {}  # id(tokenizer): its spec for keys


def _encode(tokenizer, split: Split, max_length: int, cache_dir: str | None,
            key: str) -> Encoded:
  path = None
  if cache_dir:
    path = f"{cache_dir.rstrip('/')}/{key}.npz"
    cached = _read_cache(path)
    if cached is not None and len(cached) == len(split):
      return cached
  parts = [_tokenize_chunk(tokenizer, split, start, max_length)
           for start in range(0, len(split), TOKENIZE_CHUNK)] or [_tokenize_chunk(
               tokenizer, split, 0, max_length)]
  typed = all(p[1] is not None for p in parts)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  encoded = Encoded(np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]) if typed else None,
                    np.concatenate([p[2] for p in parts]), np.asarray(split.labels), int(pad))
  if path:
    _write_cache(path, encoded)
  return encoded


def _tokenize_chunk(tokenizer, split: Split, start: int, max_length: int):
  """(ids, segment ids or None, lengths) of ``TOKENIZE_CHUNK`` examples from ``start``, flat:
  a tokenizer's per-token objects for a whole large split would take many times its ids."""
  stop = start + TOKENIZE_CHUNK
  enc = tokenizer(split.texts[start:stop], split.pairs[start:stop] if split.pairs else None,
                  truncation=True, max_length=max_length, padding=False,
                  return_attention_mask=False)
  lengths = np.asarray([len(x) for x in enc["input_ids"]], dtype=np.int32)
  flat = lambda key: np.fromiter((t for x in enc[key] for t in x), dtype=np.int32,  # noqa: E731
                                 count=int(lengths.sum()))
  return flat("input_ids"), flat("token_type_ids") if "token_type_ids" in enc else None, lengths


def _cache_key(tokenizer, split: Split, max_length: int, body_type: str) -> str:
  h = hashlib.sha256()
  backend = getattr(tokenizer, "backend_tokenizer", None)
  h.update(json.dumps([CACHE_VERSION, body_type, type(tokenizer).__name__, max_length,
                       tokenizer.pad_token_id]).encode())
  if backend is not None:
    h.update(_backend_spec(tokenizer, backend))
  else:
    h.update(repr(tokenizer).encode())
  for text in split.texts:
    h.update(text.encode("utf-8", "surrogatepass") + b"\0")
  for text in split.pairs or ():
    h.update(text.encode("utf-8", "surrogatepass") + b"\1")
  h.update(np.ascontiguousarray(split.labels).tobytes())
  return h.hexdigest()[:32]


def _backend_spec(tokenizer, backend) -> bytes:
  """The tokenizer's JSON without the call-time truncation/padding settings (worked out once
  per tokenizer: it is large)."""
  size = len(tokenizer)
  known = _SPECS.get(id(tokenizer))
  if known is not None and known[0]() is tokenizer and known[1] == size:
    return known[2]
  spec = json.loads(backend.to_str())
  spec.pop("truncation", None)
  spec.pop("padding", None)
  text = json.dumps(spec, sort_keys=True).encode()
  for dead in [k for k, v in _SPECS.items() if v[0]() is None]:
    del _SPECS[dead]
  _SPECS[id(tokenizer)] = (weakref.ref(tokenizer), size, text)
  return text


def _read_cache(path: str) -> Encoded | None:
  try:
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path, "rb") as f:
      data = np.load(io.BytesIO(f.read()), allow_pickle=False)
      types = data["types"] if data["has_types"] else None
      return Encoded(data["ids"], types, data["lengths"], data["labels"], int(data["pad_id"]))
  except (tf.errors.OpError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # a damaged cache (e.g. truncated: not a zip file) is rebuilt


def _write_cache(path: str, encoded: Encoded) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, ids=encoded.ids, types=encoded.types if encoded.types is not None else
           np.zeros(0, np.int32), has_types=encoded.types is not None,
           lengths=encoded.lengths, labels=encoded.labels, pad_id=encoded.pad_id)
  try:
    tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except (tf.errors.OpError, OSError):
    pass  # the cache is an optimisation only


def bucket_lengths(max_length: int, lengths: Sequence[int] | None = None, num_buckets: int = 0,
                   multiple: int = 8) -> list[int]:
  """The padded lengths batches may have, ascending; the last is always ``max_length``.

  ``num_buckets`` = 0: every multiple of ``multiple`` (fine-grained, for dynamic shapes).
  Otherwise at most ``num_buckets`` lengths at quantiles of ``lengths`` (the training
  lengths), rounded up to ``multiple``: few static shapes with little padding (TPUs, XLA).
  """
  if num_buckets <= 0 or lengths is None or len(lengths) == 0:
    out = list(range(multiple, max_length, multiple))
  else:
    quantiles = np.quantile(np.asarray(lengths), np.arange(1, num_buckets + 1) / num_buckets)
    out = sorted({min(max_length, int(-(-q // multiple) * multiple)) for q in quantiles})
  out = [b for b in out if b < max_length]
  return out + [max_length]


def width_of(longest: int, buckets: Sequence[int]) -> int:
  return next(b for b in buckets if b >= longest)


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
    if n:
      order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
  else:
    rng = None
    order = np.argsort(lengths, kind="stable")
  batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
  if drop_remainder and batches and len(batches[-1]) < batch_size:
    batches = batches[:-1]
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


@dataclasses.dataclass
class EpochPlan:
  """The steps of one epoch: the examples of each step, its padded width and its group.

  Steps of one group share one dataset (and, with static shapes, one compiled program);
  ``runs`` are maximal stretches of consecutive steps of one group.
  """
  batches: np.ndarray   # int32 [steps, global batch] example indices
  widths: np.ndarray    # int32 [steps] padded length of each step
  groups: np.ndarray    # int32 [steps] the width when shapes are static, else 0

  def __len__(self) -> int:
    return len(self.batches)

  def run_end(self, step: int) -> int:
    """The first step after ``step`` that belongs to another group (or the epoch's end)."""
    end = step + 1
    while end < len(self.groups) and self.groups[end] == self.groups[step]:
      end += 1
    return end


def plan_epoch(lengths: np.ndarray, batch_size: int, buckets: Sequence[int], *, seed: int,
               static_shapes: bool, steps_per_execution: int = 1) -> EpochPlan:
  """Plans one epoch of full batches (see the module docstring).

  With ``static_shapes``, batches of one width are gathered into runs of up to
  ``steps_per_execution`` steps and the runs are shuffled, so one compiled program per width
  can execute a whole run on the accelerator.
  """
  batches = plan_batches(lengths, batch_size, shuffle=True, seed=seed, drop_remainder=True)
  widths = np.asarray([width_of(int(lengths[b].max()), buckets) for b in batches], np.int32)
  order = np.arange(len(batches))
  if static_shapes and steps_per_execution > 1 and len(batches):
    runs = []
    for width in np.unique(widths):
      same = order[widths == width]
      runs += [same[i:i + steps_per_execution] for i in range(0, len(same), steps_per_execution)]
    rng = np.random.default_rng([seed, 1])
    order = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
  stacked = (np.stack([batches[i] for i in order]).astype(np.int32) if len(batches)
             else np.zeros((0, batch_size), np.int32))
  widths = widths[order]
  groups = widths if static_shapes else np.zeros_like(widths)
  return EpochPlan(stacked, widths, groups)


def eval_plan(lengths: np.ndarray, batch_size: int, buckets: Sequence[int],
              static_shapes: bool) -> EpochPlan:
  """Batches covering every example once, sorted by length; the last batch of each width is
  filled with index -1 (padding rows whose outputs are dropped)."""
  order = np.argsort(lengths, kind="stable")
  widths_of_examples = np.asarray([width_of(int(n), buckets) for n in lengths[order]], np.int32)
  batches, widths = [], []
  for width in np.unique(widths_of_examples):
    same = order[widths_of_examples == width]
    for i in range(0, len(same), batch_size):
      rows = np.full(batch_size, -1, np.int64)
      part = same[i:i + batch_size]
      rows[:len(part)] = part
      batches.append(rows)
      widths.append(width)
  if not static_shapes:  # fewer, fuller batches: one width per batch is not needed
    batches = [np.pad(order[i:i + batch_size], (0, max(0, i + batch_size - len(order))),
                      constant_values=-1) for i in range(0, len(order), batch_size)]
    widths = [width_of(int(lengths[b[b >= 0]].max()), buckets) for b in batches]
  stacked = (np.stack(batches).astype(np.int32) if batches
             else np.zeros((0, batch_size), np.int32))
  widths = np.asarray(widths, np.int32)
  return EpochPlan(stacked, widths, widths if static_shapes else np.zeros_like(widths))


def _replica_rows(batches: np.ndarray, context: tf.distribute.InputContext) -> np.ndarray:
  """The rows of ``batches`` [steps, global] this input pipeline feeds, in the order its
  replicas take them: for each step, the slices of its local replicas one after another."""
  replicas = context.num_replicas_in_sync
  local = replicas // context.num_input_pipelines
  first = context.input_pipeline_id * local
  steps, global_batch = batches.shape
  per_replica = global_batch // replicas
  view = batches.reshape(steps, replicas, per_replica)[:, first:first + local]
  return view.reshape(steps * local, per_replica)


def make_features_fn(encoded: Encoded, input_names: Sequence[str], label_dtype,
                     width: int | None, with_index: bool) -> Callable:
  """A tf.data map function: example indices [P] -> padded features (and labels).

  ``width`` fixes the padded length (static shape); ``None`` pads to the widest bucket in
  the batch given by the ``widths`` argument at run time.
  """
  values = {"input_ids": encoded.ids}
  if "token_type_ids" in input_names:
    values["token_type_ids"] = (encoded.types if encoded.types is not None
                                else np.zeros_like(encoded.ids))
  # Row n is an empty example: index -1 (a padding row) reads it.
  n = len(encoded)
  row_lengths = np.append(encoded.lengths, 0).astype(np.int32)
  ragged = {k: tf.RaggedTensor.from_row_lengths(tf.constant(v), tf.constant(row_lengths))
            for k, v in values.items()}
  lengths = tf.constant(row_lengths)
  labels = tf.constant(np.append(encoded.labels, 0), dtype=label_dtype)
  fill = {"input_ids": encoded.pad_id, "token_type_ids": 0}

  def fn(index, batch_width):
    safe = tf.where(index < 0, n, index)
    size = width if width is not None else batch_width
    out = {}
    for key, table in ragged.items():
      if width is not None:
        out[key] = tf.gather(table, safe).to_tensor(default_value=fill[key],
                                                    shape=[index.shape[0], width])
      else:
        dense = tf.gather(table, safe).to_tensor(default_value=fill[key])
        out[key] = tf.pad(dense, [[0, 0], [0, batch_width - tf.shape(dense)[1]]],
                          constant_values=fill[key])
    out["attention_mask"] = tf.sequence_mask(tf.gather(lengths, safe), size, tf.int32)
    features = {k: out[k] for k in input_names}
    if with_index:
      features["index"] = index
    return features, tf.gather(labels, safe)

  return tf.autograph.experimental.do_not_convert(fn)  # plain Python: nothing to convert


def replica_dataset_fn(encoded: Encoded, plan: EpochPlan, steps: np.ndarray,
                       input_names: Sequence[str], label_dtype, *, width: int | None,
                       with_index: bool = False) -> Callable:
  """A ``distribute_datasets_from_function`` argument feeding the steps ``steps`` of ``plan``
  (all padded to ``width``, or each to its planned width when ``width`` is None)."""
  features_fn = make_features_fn(encoded, input_names, label_dtype, width, with_index)
  batches = plan.batches[steps]
  widths = plan.widths[steps]

  def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
    rows = _replica_rows(batches, context)
    local = len(rows) // max(len(batches), 1)
    row_widths = np.repeat(widths, local).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((rows, row_widths))
    ds = ds.map(features_fn, num_parallel_calls=PIPELINE_DEPTH, deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # A batch takes far less to gather and pad than a step takes to run, so a fixed small
    # depth keeps the device fed. Autotuning would add a thread that takes CPU from the step
    # and holds up deleting the iterator for seconds after the dataset is used up.
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(PIPELINE_DEPTH)

  return dataset_fn


def pad_batch(encoded: Encoded, index: np.ndarray, buckets: Sequence[int],
              input_names: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads one batch on the host to the smallest bucket that fits its longest example."""
  width = width_of(int(encoded.lengths[index].max()), buckets)
  ids = np.full((len(index), width), encoded.pad_id, dtype=np.int32)
  mask = np.zeros((len(index), width), dtype=np.int32)
  types = np.zeros((len(index), width), dtype=np.int32)
  for row, i in enumerate(index):
    length = encoded.lengths[i]
    ids[row, :length] = encoded.row(i)
    mask[row, :length] = 1
    if encoded.types is not None:
      types[row, :length] = encoded.row_types(i)
  features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  return {k: features[k] for k in input_names}, encoded.labels[index]


def padding_fraction(encoded, batches, buckets: Sequence[int] | None = None) -> float:
  """Share of padded positions: of an :class:`EpochPlan` (index -1 rows count as padding),
  or of a list of index arrays each padded to its bucket in ``buckets``.

  ``encoded`` is an :class:`Encoded` split or its array of lengths.
  """
  lengths = encoded.lengths if isinstance(encoded, Encoded) else np.asarray(encoded)
  if isinstance(batches, EpochPlan):
    pairs = zip(batches.batches, batches.widths)
  else:
    pairs = ((b, width_of(int(lengths[b].max()), buckets)) for b in batches)
  real = padded = 0
  for index, width in pairs:
    real += int(lengths[index[index >= 0]].sum())
    padded += int(width) * len(index)
  return 1.0 - real / max(padded, 1)
