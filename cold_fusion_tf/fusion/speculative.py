"""The fusion pass run before the plan is made, kept when the plan fuses what it fused.

Validating a body means hashing every byte of it, which costs more than the rest of the job;
the direction check reads every kept body again, and the fusion pass once more. Run one after
another, they leave cores idle and read every body three or four times. Instead, the fusion
job runs the fusion pass early, over the bodies it expects to fuse:

* while validating (:func:`validate_and_fuse`): the bodies are hashed on one thread pool, a
  whole body per task, while the fusion pass runs on another, a chunk of every body per task,
  fusing all of them and measuring each body's update on the way (per-tensor squared distance
  from the base, the first tensor that is not finite: the validation scan's own measures, in
  its chunks, so both give the same norms) and the terms of the direction check;
* at the direction check, for bodies validated earlier (a fuser that waited for its quorum):
  :func:`fuse_measured` over the bodies the check is about.

The plan is then made from those measures as before. When it fuses exactly the bodies of the
early pass, with the same weights and clipping (every body valid and kept: the usual case),
the file of that pass is the fused base, byte for byte what the planned fusion writes, and no
body is read again; otherwise the file is dropped and the fusion runs as planned. Only bodies
the plan names, made after every check, reach a published base.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import threading
from typing import Optional

import numpy as np

from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import stream
from cold_fusion_tf.fusion import trust
from cold_fusion_tf.fusion.settings import Settings
from cold_fusion_tf.tensors import safetensors_io
from cold_fusion_tf.tensors import streaming

HASH_CHUNK_BYTES = 1 << 20
"""Bytes per read when hashing a body (one buffer per hashing thread)."""
MEASURED_CODES = ("F16", "F32", "F64")
"""Floating dtypes the early pass handles (bodies with others are fused as planned only)."""


@dataclasses.dataclass
class Fused:
  """A fusion made before its plan: what it fused and how, its file and its measures."""

  ids: tuple
  counts: tuple
  clips: dict             # {id: {tensor: factor}} of the clipped bodies
  path: str
  sha256: str
  check: dict             # the fused body's measures for trust.check_fused
  terms: Optional[tuple]  # what streaming.direction_terms gives for ``ids``, or None

  def matches(self, ids, counts, clips: dict) -> bool:
    """Whether this is the fusion of ``ids`` with weights ``counts`` and clip factors
    ``clips`` ({id: {tensor: factor}})."""
    return (tuple(ids) == self.ids and tuple(float(c) for c in counts) == self.counts
            and {i: dict(f) for i, f in clips.items() if f} == self.clips)


def possible(settings: Settings, specs: dict) -> bool:
  """Whether the early pass can make the fusion ``settings`` asks for: an element-wise method
  without a server optimizer, on 16-, 32- or 64-bit floats (other tensors are copied)."""
  return (settings.method in stream.ELEMENTWISE and settings.server_optimizer is None
          and all(code in MEASURED_CODES or code not in safetensors_io.FLOAT_CODES
                  for _, code in specs.values()))


class _Update:
  """One body's update as the pass measures it, in the order of the validation scan."""

  def __init__(self):
    self.total, self.tensors, self.nonfinite = 0.0, {}, None

  def add(self, name: str, part: Optional[float]) -> None:
    if self.nonfinite is not None:
      return
    if part is None:
      self.nonfinite = name
      return
    self.total += part
    self.tensors[name] = self.tensors.get(name, 0.0) + part

  def scan(self, sha256: str) -> streaming.ScanResult:
    if self.nonfinite:
      return streaming.ScanResult(sha256, None, self.nonfinite, {})
    return streaming.ScanResult(sha256, self.total, None, self.tensors)


def _squared_part(values: np.ndarray, ref: np.ndarray, work: np.ndarray) -> Optional[float]:
  """||values - ref||^2 as the validation scan computes it, or None when a value is not
  finite."""
  part = streaming._squared_distance(values, ref, work)  # pylint: disable=protected-access
  if math.isfinite(part):
    return part
  if not np.isfinite(values).all():
    return None
  wide = values.astype(np.float64) - ref.astype(np.float64)
  return streaming.dot64(wide, wide)


def _tasks(specs: dict):
  """(tensor, first element, elements) in name order, floating tensors in the validation
  scan's chunks (:data:`streaming.SCAN_CHUNK_BYTES`)."""
  for name in sorted(specs):
    shape, code = specs[name]
    size = math.prod(shape)
    step = max(size, 1)
    if code in safetensors_io.FLOAT_CODES:
      step = streaming.SCAN_CHUNK_BYTES // safetensors_io.numpy_dtype(code).itemsize
    for start in range(0, size, step):
      yield name, start, min(step, size - start)


_buffers = threading.local()


def _held(count: int, dtype: np.dtype) -> dict:
  """This thread's buffers for a chunk of ``count`` elements of ``dtype``."""
  held = getattr(_buffers, "held", None)
  if held is None or held["values"].size < count or held["values"].dtype != dtype:
    size = max(count, streaming.SCAN_CHUNK_BYTES // dtype.itemsize)
    narrow = np.float32 if dtype.itemsize <= 4 else np.float64
    held = _buffers.held = {
        "values": np.empty(size, dtype), "ref": np.empty(size, dtype),
        "work": np.empty(size, narrow), "sum": np.empty(size, narrow),
        "total": np.empty(size, np.float64), "wide": np.empty(size, np.float64)}
  return {key: array[:count] for key, array in held.items()}


def fuse_measured(base: safetensors_io.BodyFile, bodies: list, counts, specs: dict,
                  settings: Settings, out_path: str, directions: bool):
  """Writes the fusion of ``bodies`` (``settings.method``, element-wise) to ``out_path``
  (not synced: staged) and measures every body's update on the way.

  Returns (the fused file's sha256, its measures for :func:`trust.check_fused`, an
  :class:`_Update` per body, and with ``directions`` the terms of
  :func:`streaming.direction_terms` for these bodies, else None). Per chunk each body is
  read once, or twice with ``directions`` (once the chunk's sum of updates is known); the
  mean is :func:`stream.fuse_files`'s, bit for bit.
  """
  fn, count_bodies = fm.get_method(settings.method), len(bodies)
  mean = settings.method == "mean"

  def compute(task):
    name, start, count = task
    code = specs[name][1]
    if code not in safetensors_io.FLOAT_CODES:
      return name, base.read(name, start, count), None
    dtype = safetensors_io.numpy_dtype(code)
    held = _held(count, dtype)
    ref, total, wide = base.read(name, start, count, out=held["ref"]), held["total"], held["wide"]
    parts = []
    for i, body in enumerate(bodies):
      values = body.read(name, start, count, out=held["values"])
      parts.append(_squared_part(values, ref, held["work"]))
      if mean or directions:
        stream.add_to_sum(total, values, i)
    dots, summed_sq = None, 0.0
    if directions:  # the sum of the updates, then each update's dot product with it
      np.multiply(ref, float(count_bodies), out=wide, dtype=np.float64)
      np.subtract(total, wide, out=wide)
      summed_sq = streaming.dot64(wide, wide)
      summed, work, dots = held["sum"], held["work"], []
      np.copyto(summed, wide, casting="same_kind")
      for body in bodies:
        values = body.read(name, start, count, out=held["values"])
        np.subtract(values, ref, out=work, dtype=work.dtype)
        dots.append(float(np.dot(work, summed)))
    if mean:
      fused = stream.mean_of_sum(total, count_bodies, dtype)
    else:
      fused = fn(ref, stream.Chunks(bodies, name, start, count, (count,)), counts, name=name,
                 **settings.params).reshape(-1)
    np.subtract(fused, ref, out=wide, dtype=np.float64)
    squared = streaming.dot64(wide, wide)
    finite = math.isfinite(squared) or bool(np.isfinite(wide).all())
    return name, fused, (parts, dots, summed_sq, squared if finite else 0.0, finite)

  updates = [_Update() for _ in bodies]
  dots, summed_sq, check = np.zeros(count_bodies), 0.0, {"squared_distance": 0.0}
  threads = settings.threads()
  writer = safetensors_io.ChunkWriter(out_path, specs, fsync=False)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
      for name, fused, measures in stream.ordered(pool, compute, _tasks(specs), 2 * threads):
        writer.write(name, fused)
        if measures is None:
          continue
        parts, chunk_dots, chunk_summed_sq, squared, finite = measures
        for update, part in zip(updates, parts):
          update.add(name, part)
        if directions:
          dots += chunk_dots
          summed_sq += chunk_summed_sq
        check["squared_distance"] += squared
        if not finite and check.get("nonfinite") is None:
          check["nonfinite"] = name
    writer.close()
  except BaseException:
    writer.abort()
    raise
  terms = (dots, np.array([u.total for u in updates]), summed_sq) if directions else None
  return writer.sha256, check, updates, terms


def _sha256(body: safetensors_io.BodyFile) -> str:
  """The sha256 of a body's file, every byte (what the validation scan computes)."""
  digest, buffer = hashlib.sha256(), bytearray(HASH_CHUNK_BYTES)
  view = memoryview(buffer)
  for offset in range(0, body.size, HASH_CHUNK_BYTES):
    part = view[:min(HASH_CHUNK_BYTES, body.size - offset)]
    safetensors_io.pread_into(body.fd, part, offset, body.source)
    digest.update(part)
  return digest.hexdigest()


def fuse(base, contributions: list, bodies: list, specs: dict, settings: Settings,
         out_path: str, clips: Optional[dict] = None, directions: bool = True):
  """:func:`fuse_measured` of ``bodies`` (of ``contributions``, in id order), weighted as the
  plan would weight them all: (the :class:`Fused`, the :class:`_Update` of each body)."""
  ids = tuple(c.contributor_id for c in contributions)
  counts = trust.capped_weights([c.meta["num_examples"] for c in contributions],
                                settings.max_weight_ratio)
  sha, check, updates, terms = fuse_measured(base, bodies, np.asarray(counts), specs, settings,
                                             out_path, directions)
  clips = {i: dict(f) for i, f in (clips or {}).items() if f}
  return Fused(ids, tuple(counts), clips, out_path, sha, check, terms), updates


def validate_and_fuse(opened: list, base, specs: dict, settings: Settings, out_path: str):
  """Validation's measures of the ``opened`` bodies ([(Contribution, BodyFile)]), with their
  fusion on the way: (per body a ScanResult or the error that rejects it, the
  :class:`Fused`); (None, None) when a body broke the pass (cut short while being read): the
  validation scan then tells which."""
  if not opened:
    return [], None
  order = sorted(range(len(opened)), key=lambda i: opened[i][0].contributor_id)
  contributions = [opened[i][0] for i in order]
  bodies = [opened[i][1] for i in order]
  directions = len(bodies) >= 3 and settings.min_cosine > -1
  hashing = concurrent.futures.ThreadPoolExecutor(max_workers=settings.threads())
  try:
    hashes = [hashing.submit(_sha256, body) for body in bodies]
    try:
      fused, updates = fuse(base, contributions, bodies, specs, settings, out_path,
                            directions=directions)
    except Exception:  # pylint: disable=broad-except  (one body's problem: the scan finds it)
      for future in hashes:
        future.cancel()
      return None, None
    results = [None] * len(opened)
    for i, future, update in zip(order, hashes, updates):
      try:
        results[i] = update.scan(future.result())
      except Exception as e:  # pylint: disable=broad-except  (that body's rejection)
        results[i] = e
  finally:
    hashing.shutdown(wait=True)
  return results, fused
