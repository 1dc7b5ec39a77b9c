"""Streaming passes over bodies (read with :class:`~.safetensors_io.BodyFile`), chunk by chunk.

:func:`scan` / :func:`scan_group`
  The single validation pass over a body (or a group of bodies with one layout, sharing the
  reads of the base): the sha256 of every byte, and per tensor chunk the finiteness of the
  values and the squared distance from the base.
:func:`squared_norms`, :func:`direction_terms`, :func:`gram`
  Per-tensor norms, and the dot products the fuser's direction check needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional, Sequence

import numpy as np

from cold_fusion_tf.tensors.safetensors_io import FLOAT_CODES, BodyFile, Specs, numpy_dtype, pread_into
from cold_fusion_tf.errors import UserError

SCAN_CHUNK_BYTES = 1 << 20


def dot64(a: np.ndarray, b: np.ndarray) -> float:
  """The dot product of two 1-D arrays, by numpy's own loops: BLAS threads, woken for every
  call, are far slower for the chunk-sized products here (and on a busy machine)."""
  return float(np.einsum("i,i->", a, b))


@dataclasses.dataclass
class ScanResult:
  sha256: str
  squared_distance: Optional[float]  # sum over tensors of ||body - reference||^2 (None: no ref)
  nonfinite: Optional[str]           # the first tensor holding NaN or inf, else None
  # Per floating tensor: ||body - reference||^2 (without a reference: ||body||^2).
  tensors: dict = dataclasses.field(default_factory=dict)


def _layout(body: BodyFile) -> tuple:
  """The tensors of ``body`` in file order: ((name, dtype code, begin, end), ...)."""
  return tuple((name, code, begin, end) for name, (code, _, (begin, end)) in
               sorted(body.header.items(), key=lambda e: e[1][2]))


def layout_groups(bodies: Sequence[BodyFile], parts: int) -> list[list[int]]:
  """Indices of ``bodies`` split into at most ``parts`` groups of the same data layout (the
  same tensors at the same offsets), as even as possible: the units of :func:`scan_group`."""
  by_layout: dict[tuple, list[int]] = {}
  for i, body in enumerate(bodies):
    by_layout.setdefault(_layout(body), []).append(i)
  groups = []
  share = max(1, parts // max(1, len(by_layout)))
  for members in by_layout.values():
    count = min(share, len(members))
    groups += [members[k::count] for k in range(count)]
  return groups


class _Scanning:
  """One body's running state in :func:`scan_group`."""

  def __init__(self, body: BodyFile, reference: Optional[BodyFile]):
    self.body = body
    self.digest = hashlib.sha256()
    self.total = 0.0 if reference is not None else None
    self.tensors: dict[str, float] = {}
    self.nonfinite: Optional[str] = None
    self.error: Optional[UserError] = None

  def result(self):
    if self.error is not None:
      return self.error
    return ScanResult(self.digest.hexdigest(), None if self.nonfinite else self.total,
                      self.nonfinite, {} if self.nonfinite else self.tensors)


def _squared_distance(values: np.ndarray, ref: Optional[np.ndarray], work: np.ndarray) -> float:
  """sum((values - ref)^2) (or sum(values^2) without ``ref``): a float32 dot product for
  16- and 32-bit floats, float64 for F64; NaN or inf when a value is not finite (or the
  float32 sum overflows)."""
  wide = values.dtype.itemsize > 4
  diff = np.empty(values.size, np.float64) if wide else work[:values.size]
  with np.errstate(over="ignore", invalid="ignore"):
    if ref is None:
      np.copyto(diff, values, casting="unsafe")
    else:
      np.subtract(values, ref, out=diff, dtype=diff.dtype)
    return float(np.dot(diff, diff))


def scan_group(bodies: Sequence[BodyFile], specs: Specs, reference: Optional[BodyFile] = None,
               chunk_bytes: int = SCAN_CHUNK_BYTES) -> list:
  """One pass over every byte of each body in ``bodies`` (which share a data layout, see
  :func:`layout_groups`), in file order, a chunk of all of them at a time, so that each chunk
  of ``reference`` is read once for the group.

  For each body: the sha256 of the file; for each floating tensor of ``specs``, whether every
  value is finite and, with ``reference``, the sum over tensors of the squared distance to the
  reference's tensor of the same name (float32 differences in chunk dot products, added in
  float64; a sum that is not finite is redone in float64 to tell overflow from NaN/inf).
  Other tensors (buffers, integers) are only hashed. Bodies must already match ``specs``.

  Returns, per body, a :class:`ScanResult`, or the UserError that ended its scan (a file cut
  short while being read); one body's error does not stop the others.
  """
  states = [_Scanning(body, reference) for body in bodies]
  if not states:
    return []
  for state in states:
    head = bytearray(state.body.data_start)
    try:
      pread_into(state.body.fd, memoryview(head), 0, state.body.source)
    except UserError as e:
      state.error = e
    state.digest.update(head)
  buffer = np.empty(chunk_bytes, dtype=np.uint8)
  view = memoryview(buffer)
  work = np.empty(chunk_bytes // 2, dtype=np.float32)  # room for float16 chunks as float32
  ref_buffer = np.empty(chunk_bytes, dtype=np.uint8) if reference is not None else None
  for name, code, begin, end in _layout(bodies[0]):
    floating = name in specs and code in FLOAT_CODES
    dtype = numpy_dtype(code) if floating else None
    step = chunk_bytes - chunk_bytes % (dtype.itemsize if dtype else 1)
    for offset in range(begin, end, step):
      size = min(step, end - offset)
      ref = None
      for state in states:
        if state.error is not None:
          continue
        try:
          pread_into(state.body.fd, view[:size], state.body.data_start + offset,
                      state.body.source)
        except UserError as e:
          state.error = e
          continue
        state.digest.update(view[:size])
        if not floating or state.nonfinite is not None:
          continue
        values = buffer[:size].view(dtype)
        if reference is not None and ref is None:
          ref = reference.read(name, (offset - begin) // dtype.itemsize, values.size,
                               out=ref_buffer[:size].view(dtype))
        part = _squared_distance(values, ref, work)
        if not math.isfinite(part):
          if not np.isfinite(values).all():
            state.nonfinite = name
            continue
          wide = values.astype(np.float64) - (ref.astype(np.float64) if ref is not None else 0.0)
          part = dot64(wide, wide)
        if state.total is not None:
          state.total += part
        state.tensors[name] = state.tensors.get(name, 0.0) + part
  return [state.result() for state in states]


def squared_norms(body: BodyFile, specs: Specs, chunk_elements: int = 1 << 18) -> dict:
  """{floating tensor of ``specs``: ||tensor||^2 in float64} of a checked file."""
  out = {}
  for name in sorted(specs):
    shape, code = specs[name]
    if code in FLOAT_CODES:
      size, total = math.prod(shape), 0.0
      for start in range(0, size, chunk_elements):
        values = body.read(name, start, min(chunk_elements, size - start)).astype(np.float64)
        total += dot64(values, values)
      out[name] = total
  return out


def direction_terms(bodies: Sequence, specs: Specs, reference: BodyFile,
                    factors: Optional[Sequence[dict]] = None,
                    chunk_elements: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, float]:
  """What the direction of each update is measured with, in float64: for the updates
  ``d_i = f_i * (body_i - reference)`` (``factors[i]``: {tensor: f}, default 1) and their sum
  ``S``, the arrays ``d_i . S`` and ``||d_i||^2``, and ``||S||^2``. Memory stays at a few
  chunks whatever the number of bodies (each chunk of each body is read twice)."""
  count = len(bodies)
  factors = factors or [{}] * count
  dots, own, total = np.zeros(count), np.zeros(count), 0.0
  for name in sorted(specs):
    shape, code = specs[name]
    if code not in FLOAT_CODES:
      continue
    size = math.prod(shape)
    scale = [f.get(name, 1.0) for f in factors]
    for start in range(0, size, chunk_elements):
      length = min(chunk_elements, size - start)
      ref = reference.read(name, start, length).astype(np.float64)

      def delta(i):
        return (bodies[i].read(name, start, length).astype(np.float64) - ref) * scale[i]

      summed = np.zeros(length)
      for i in range(count):
        d = delta(i)
        summed += d
        own[i] += dot64(d, d)
      for i in range(count):
        dots[i] += dot64(delta(i), summed)
      total += dot64(summed, summed)
  return dots, own, total


GRAM_BYTES = 32 << 20
"""Memory for one chunk of every update in :func:`gram`."""


def gram(bodies: Sequence, specs: Specs, reference: BodyFile,
         factors: Optional[Sequence[dict]] = None) -> np.ndarray:
  """The matrix of dot products ``d_i . d_j`` of the updates ``d_i = f_i * (body_i -
  reference)`` (``factors`` as in :func:`direction_terms`), in float64, in one pass: each
  chunk of each body is read once; a chunk of every update is held at a time (at most
  :data:`GRAM_BYTES`)."""
  count = len(bodies)
  factors = factors or [{}] * count
  out = np.zeros((count, count))
  chunk = max(1024, GRAM_BYTES // (8 * max(1, count)))
  held = np.empty((count, chunk))
  for name in sorted(specs):
    shape, code = specs[name]
    if code not in FLOAT_CODES:
      continue
    size = math.prod(shape)
    for start in range(0, size, chunk):
      length = min(chunk, size - start)
      ref = reference.read(name, start, length).astype(np.float64)
      rows = held[:, :length]
      for i, body in enumerate(bodies):
        np.subtract(body.read(name, start, length), ref, out=rows[i], dtype=np.float64)
        rows[i] *= factors[i].get(name, 1.0)
      out += rows @ rows.T
  return out


def scan(body: BodyFile, specs: Specs, reference: Optional[BodyFile] = None,
         chunk_bytes: int = SCAN_CHUNK_BYTES) -> ScanResult:
  """:func:`scan_group` of one body; a read error is raised."""
  result = scan_group([body], specs, reference, chunk_bytes)[0]
  if isinstance(result, UserError):
    raise result
  return result
