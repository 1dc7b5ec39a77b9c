"""The fusion pass: tensor by tensor, in chunks, from the validated files to the fused body."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import server_optimizer
from cold_fusion_tf.fusion.settings import Settings
from cold_fusion_tf.fusion.validation import specs_difference as _specs_difference
from cold_fusion_tf.store import layout
from cold_fusion_tf.tensors import safetensors_io
from cold_fusion_tf.tensors import streaming

CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk for element-wise methods (small enough to stay in the CPU caches)."""
MEAN_CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk for ``mean``, which holds two chunks per thread whatever N is (fewer,
larger reads: the fusion pass of 8 roberta-base bodies is about 30% faster than with
:data:`CHUNK_ELEMENTS`)."""
ELEMENTWISE = frozenset({"mean", "weighted", "trimmed_mean", "median", "task_arithmetic"})
"""Methods whose result at a coordinate depends only on that coordinate: fused in chunks."""

class ClippedBody:
  """A body whose update is scaled: reads ``base + factor * (body - base)`` for the tensors
  of ``factors`` ({name: factor}), the body itself for the others (norm clipping)."""

  def __init__(self, body: safetensors_io.BodyFile, base: safetensors_io.BodyFile, factors: dict):
    self.body, self.base, self.factors = body, base, factors

  def read(self, name: str, start: int = 0, count: Optional[int] = None,
           out: Optional[np.ndarray] = None) -> np.ndarray:
    values = self.body.read(name, start, count, out=out)
    factor = self.factors.get(name)
    if factor is None:
      return values
    ref = self.base.read(name, start, values.size).astype(np.float64)
    clipped = ref + factor * (values.astype(np.float64) - ref)
    values[...] = clipped.astype(values.dtype)
    return values


class Chunks(Sequence):
  """The contributions' versions of one chunk of one tensor, read on access."""

  def __init__(self, bodies, name, start, count, shape):
    self.bodies, self.name, self.start, self.count, self.shape = bodies, name, start, count, shape

  def __len__(self):
    return len(self.bodies)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self.bodies[index].read(self.name, self.start, self.count).reshape(self.shape)


_buffers = threading.local()


def _mean_chunk(bodies, name: str, start: int, count: int, dtype) -> np.ndarray:
  """:func:`fusion_methods.mean` of one chunk, bit for bit, in two buffers per thread."""
  held = getattr(_buffers, "mean", None)
  if held is None or held[0].size < count or held[0].dtype != dtype:
    held = _buffers.mean = (np.empty(max(count, MEAN_CHUNK_ELEMENTS), dtype=dtype),
                            np.empty(max(count, MEAN_CHUNK_ELEMENTS), dtype=np.float64))
  buffer, total = held[0][:count], held[1][:count]
  for i, body in enumerate(bodies):
    add_to_sum(total, body.read(name, start, count, out=buffer), i)
  return mean_of_sum(total, len(bodies), dtype)


def add_to_sum(total: np.ndarray, values: np.ndarray, index: int) -> None:
  """Adds the ``index``-th body's chunk to the float64 sum of a mean, as :func:`fm.mean`
  does: the first as 0 + x (which turns -0 into +0), then one body after another."""
  if index:
    np.add(total, values, out=total)
  else:
    np.add(values, 0.0, out=total, dtype=np.float64)


def mean_of_sum(total: np.ndarray, count: int, dtype) -> np.ndarray:
  """The mean of ``count`` bodies from their sum (:func:`add_to_sum`), in ``dtype``; divides
  ``total`` in place."""
  total /= count
  return total.astype(dtype)


def _tasks(specs: dict, method: str) -> Iterator[tuple[str, int, int]]:
  for name in sorted(specs):
    size = int(np.prod(specs[name][0], dtype=np.int64))
    step = CHUNK_ELEMENTS if method in ELEMENTWISE or specs[name][1] not in \
        safetensors_io.FLOAT_CODES else max(size, 1)
    if method == "mean":
      step = MEAN_CHUNK_ELEMENTS
    for start in range(0, size, step):
      yield name, start, min(step, size - start)


def ordered(pool, fn, items, window: int) -> Iterator:
  """``map(fn, items)`` on a thread pool, in order, with at most ``window`` items in flight."""
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()


def _measure(values: np.ndarray, base_chunk: np.ndarray) -> tuple[float, bool]:
  """(||values - base_chunk||^2 in float64, whether every value is finite)."""
  wide = values.astype(np.float64)
  if not np.isfinite(wide).all():
    return 0.0, False
  wide -= base_chunk
  return streaming.dot64(wide, wide), True


def fuse_files(base: safetensors_io.BodyFile, bodies: list, counts: np.ndarray, specs: dict,
               settings: Settings, out_path: str, state_path: Optional[str] = None,
               previous_state: Optional[safetensors_io.BodyFile] = None,
               fsync: bool = True, check: Optional[dict] = None) -> tuple[str, Optional[str]]:
  """Writes the fusion of ``bodies`` (and the new server momentum buffer) tensor by tensor:
  (the sha256 of the fused file, of the momentum buffer file or None).

  Floating tensors are fused with ``settings.method``; others are copied from the base.
  Element-wise methods work in chunks of :data:`CHUNK_ELEMENTS` (``mean``:
  :data:`MEAN_CHUNK_ELEMENTS`) on ``settings.threads()``
  threads; ``ties`` and ``dare`` on whole tensors, one at a time. ``fsync=False`` for files
  that are only staged for an upload. ``check``: filled with the fused body's
  ``squared_distance`` from the base and its first ``nonfinite`` tensor (the momentum
  buffer's too), for :func:`trust.check_fused`.
  """
  fn = fm.get_method(settings.method)
  server = settings.server_optimizer
  fast_mean = settings.method == "mean"
  state_specs = {n: (shape, "F64" if code == "F64" else "F32") for n, (shape, code) in
                 specs.items() if code in safetensors_io.FLOAT_CODES}

  def compute(task):
    name, start, count = task
    shape, code = specs[name]
    if code not in safetensors_io.FLOAT_CODES:
      return name, base.read(name, start, count), None
    dtype = safetensors_io.numpy_dtype(code)
    whole = settings.method not in ELEMENTWISE
    chunk_shape = shape if whole else (count,)
    base_chunk = None
    if fast_mean and code in ("F16", "F32", "F64"):
      fused = _mean_chunk(bodies, name, start, count, dtype)
    else:
      base_chunk = base.read(name, start, count).reshape(chunk_shape)
      fused = fn(base_chunk, Chunks(bodies, name, start, count, chunk_shape), counts,
                 name=name, **settings.params)
    fused = fused.reshape(-1)
    if base_chunk is None:
      base_chunk = base.read(name, start, count)
    base_chunk = base_chunk.reshape(-1)
    buffer = None
    if server is not None:
      previous = previous_state.read(name, start, count) if previous_state else None
      with np.errstate(over="ignore", invalid="ignore"):
        fused, buffer = server_optimizer.server_momentum_step(
            base_chunk, fused.astype(np.float64) - base_chunk, previous, **server)
    squared, finite = _measure(fused, base_chunk.astype(np.float64))
    if buffer is not None and finite:
      finite = _measure(buffer, np.zeros(1))[1]
    return name, fused, buffer, squared, finite

  threads = settings.threads() if settings.method in ELEMENTWISE else 1
  writer = safetensors_io.ChunkWriter(out_path, specs, fsync)
  state_writer = safetensors_io.ChunkWriter(state_path, state_specs, fsync) if server else None
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
      for item in ordered(pool, compute, _tasks(specs, settings.method), 2 * threads):
        name, fused, buffer = item[:3]
        if check is not None and len(item) > 3:
          check["squared_distance"] = check.get("squared_distance", 0.0) + item[3]
          if not item[4] and check.get("nonfinite") is None:
            check["nonfinite"] = name
        writer.write(name, fused)
        if state_writer is not None and buffer is not None:
          state_writer.write(name, buffer)
    writer.close()
    if state_writer is not None:
      state_writer.close()
    return writer.sha256, (state_writer.sha256 if state_writer is not None else None)
  except BaseException:
    writer.abort()
    if state_writer is not None:
      state_writer.abort()
    raise


def previous_state(store, iteration: int, manifest: dict, specs: dict, workdir: str, log):
  """The server momentum buffer saved with base ``iteration``: (BodyFile, sha256) or None."""
  info = (manifest.get("fusion") or {}).get("server_optimizer") or {}
  state = info.get("state") if isinstance(info, dict) else None
  if not state:
    log(f"server optimizer: no momentum buffer stored with base {iteration}; starting from zero")
    return None, None
  name = layout.state_name(iteration)
  where = f"{store.uri}/{name}"
  if not isinstance(state, dict) or state.get("name") != name:
    raise UserError(f"{store.uri}: the manifest of base {iteration} names the momentum buffer "
                    f"{state!r}; expected {name}.")
  sha = store_lib.check_sha(state.get("sha256"), f"{where}: sha256")
  path = store.fetch_state(iteration, workdir)
  if path is None:
    raise UserError(f"{where}: missing, but the manifest of base {iteration} lists it; restore "
                    "it, or disable config.fusion.server_optimizer to start from zero.")
  body = safetensors_io.BodyFile(path, source=where)
  want = {n: (shape, "F64" if code == "F64" else "F32") for n, (shape, code) in specs.items()
          if code in safetensors_io.FLOAT_CODES}
  try:
    problem = _specs_difference(body.specs(), want)
    if problem:
      raise UserError(f"{where}: {problem}")
    result = streaming.scan(body, want)
    if result.sha256 != sha:
      raise UserError(f"{where}: sha256 does not match the manifest of base {iteration}.")
    if result.nonfinite:
      raise UserError(f"{where}: tensor {result.nonfinite} holds NaN or infinite values.")
  except BaseException:
    body.close()
    raise
  return body, sha
