"""Reading and writing safetensors files for the fuser: checked, chunked, without memory maps.

:class:`BodyFile`
  A safetensors file whose header has been checked, kept open through one file descriptor
  and read with ``pread`` into numpy arrays, a chunk of a tensor at a time. The fuser reads
  exactly the bytes it validated: a file replaced in the store afterwards (every store write
  is a rename) is not seen. No memory maps, so the resident memory is what was asked for.
:func:`scan`
  The single validation pass over a body: the sha256 of every byte, and per tensor chunk the
  finiteness of the values and the squared distance from the base.
:class:`ChunkWriter`
  Writes a safetensors file chunk by chunk: the same bytes as :func:`weights.write_streaming`,
  and their sha256 on the way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import struct
from typing import Mapping, Optional, Sequence

import numpy as np

from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

# Bytes read per step of a validation pass (a multiple of every item size).
SCAN_CHUNK_BYTES = 1 << 20
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_NUMPY = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}

Specs = Mapping[str, tuple[tuple[int, ...], str]]


@functools.lru_cache(maxsize=None)
def numpy_dtype(code: str) -> np.dtype:
  """The numpy dtype of a safetensors dtype code (BF16 through ml_dtypes when installed)."""
  if code == "BF16":
    try:
      import ml_dtypes  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError("bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes).") \
          from None
    return np.dtype(ml_dtypes.bfloat16)
  if code not in _NUMPY:
    raise UserError(f"Unsupported tensor dtype {code}.")
  return np.dtype(_NUMPY[code])


def dot64(a: np.ndarray, b: np.ndarray) -> float:
  """The dot product of two 1-D arrays, by numpy's own loops: BLAS threads, woken for every
  call, are far slower for the chunk-sized products here (and on a busy machine)."""
  return float(np.einsum("i,i->", a, b))


def _pread_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
  """Fills ``buffer`` from ``fd`` at ``offset``; a short file is a UserError."""
  done = 0
  while done < len(buffer):
    if hasattr(os, "preadv"):
      count = os.preadv(fd, [buffer[done:]], offset + done)
    else:  # pragma: no cover (platforms without preadv)
      data = os.pread(fd, len(buffer) - done, offset + done)
      buffer[done:done + len(data)] = data
      count = len(data)
    if count == 0:
      raise UserError(f"{path}: ended early (truncated while being read?).")
    done += count


class BodyFile:
  """A header-checked safetensors file, kept open and read chunk by chunk with pread.

  Beyond :func:`weights.read_header`'s checks, the data section must be exactly the tensors,
  back to back, as the safetensors format requires (no gaps, no trailing bytes). Only a
  regular file is opened (a FIFO or device is refused without blocking); ``max_bytes``,
  ``max_header_bytes`` and ``max_tensors`` bound what an untrusted file may cost (see
  :func:`limits_for`).
  """

  def __init__(self, path: str, source: Optional[str] = None, *,
               max_bytes: Optional[int] = None, max_header_bytes: Optional[int] = None,
               max_tensors: Optional[int] = None):
    self.path = path
    self.source = source or path
    try:
      self.fd = untrusted.open_regular(path, self.source)
    except FileNotFoundError:
      raise UserError(f"{self.source}: missing.") from None
    try:
      opened = os.fstat(self.fd)
      if max_bytes is not None and opened.st_size > max_bytes:
        raise UserError(f"{self.source}: {opened.st_size} bytes, more than the {max_bytes} a "
                        "body of the base's layout can have.")
      self.header = weights.read_header_fd(self.fd, self.source, max_header_bytes, max_tensors)
      self.size = opened.st_size
      prefix = os.pread(self.fd, 8, 0)
      if len(prefix) != 8:
        raise UserError(f"{self.source}: not a safetensors file (shorter than 8 bytes).")
      self.data_start = 8 + struct.unpack("<Q", prefix)[0]
      position = 0
      for _, _, (begin, end) in sorted(self.header.values(), key=lambda e: e[2]):
        if begin != position:
          raise UserError(f"{self.source}: the data section has a gap or overlap at byte "
                          f"{self.data_start + position}; not a valid safetensors file.")
        position = end
      if self.data_start + position != self.size:
        raise UserError(f"{self.source}: {self.size - self.data_start - position} bytes after "
                        "the last tensor; not a valid safetensors file.")
    except BaseException:
      os.close(self.fd)
      raise

  def limits(self) -> dict:
    """Bounds for a file that must have this one's layout (keyword arguments of
    :class:`BodyFile`): its size, and at most twice its header plus 64 KiB (room for other
    metadata and number formats) and 16 more tensors (buffers a body may or may not hold)."""
    header = self.data_start - 8
    return {"max_header_bytes": 2 * header + (64 << 10), "max_tensors": len(self.header) + 16,
            "max_bytes": self.size + header + (64 << 10) + (1 << 20)}

  def specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype code), buffers (``*.position_ids``) left out."""
    return {n: (shape, dtype) for n, (dtype, shape, _) in self.header.items()
            if not n.endswith("position_ids")}

  def numel(self, name: str) -> int:
    return int(np.prod(self.header[name][1], dtype=np.int64))

  def read(self, name: str, start: int = 0, count: Optional[int] = None,
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """Elements ``start .. start + count`` of tensor ``name`` (flattened), as a new array
    (or in ``out``, a contiguous array of the tensor's dtype and at least ``count`` items)."""
    code, _, (begin, _) = self.header[name]
    dtype = numpy_dtype(code)
    if count is None:
      count = self.numel(name) - start
    if not 0 <= start <= start + count <= self.numel(name):
      raise ValueError(f"{name}: elements {start}..{start + count} out of range")
    if out is not None and (out.dtype != dtype or out.size < count or out.ndim != 1
                            or not out.flags.c_contiguous):
      raise ValueError(f"{name}: out must be a contiguous 1-D {dtype} array of >= {count} items")
    array = np.empty(count, dtype=dtype) if out is None else out[:count]
    if count:
      _pread_into(self.fd, memoryview(array.view(np.uint8)),
                  self.data_start + begin + start * dtype.itemsize, self.source)
    return array

  def read_tensor(self, name: str) -> np.ndarray:
    """The whole tensor in its shape."""
    return self.read(name).reshape(self.header[name][1])

  def close(self) -> None:
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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
      _pread_into(state.body.fd, memoryview(head), 0, state.body.source)
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
          _pread_into(state.body.fd, view[:size], state.body.data_start + offset,
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


def scan(body: BodyFile, specs: Specs, reference: Optional[BodyFile] = None,
         chunk_bytes: int = SCAN_CHUNK_BYTES) -> ScanResult:
  """:func:`scan_group` of one body; a read error is raised."""
  result = scan_group([body], specs, reference, chunk_bytes)[0]
  if isinstance(result, UserError):
    raise result
  return result


class ChunkWriter:
  """Writes a safetensors file for ``specs`` chunk by chunk, in sorted name order.

  The header is :func:`weights.header_bytes`, so the result is byte-identical to
  :func:`weights.write_streaming` of the same tensors. Written to ``path + '.partial'``,
  fsynced (unless ``fsync=False``) and renamed into place by :meth:`close`, which sets
  :attr:`sha256` (the file's, computed from the bytes as they were written); :meth:`abort`
  removes it.
  """

  def __init__(self, path: str, specs: Specs, fsync: bool = True):
    self.path, self.specs, self.fsync = path, specs, fsync
    self._names = iter(sorted(specs))
    self._name, self._left = None, 0
    self.sha256: Optional[str] = None
    self._digest = hashlib.sha256()
    self._file = open(path + ".partial", "wb")
    raw = weights.header_bytes(specs)
    self._put(struct.pack("<Q", len(raw)) + raw)

  def _put(self, data) -> None:
    self._digest.update(data)
    self._file.write(data)

  def write(self, name: str, values: np.ndarray) -> None:
    """Appends the next ``values.size`` elements (flattened) of tensor ``name``."""
    if values.size == 0:
      return
    while self._left == 0:
      self._name = next(self._names, None)
      if self._name is None:
        raise ValueError(f"ChunkWriter: {name} is past the last tensor")
      self._left = int(np.prod(self.specs[self._name][0], dtype=np.int64))
    shape, code = self.specs[self._name]
    dtype = numpy_dtype(code)
    if name != self._name or values.dtype != dtype or values.size > self._left:
      raise ValueError(f"ChunkWriter: got {name} {values.dtype}[{values.size}], expected "
                       f"{self._name} {code} (at most {self._left} elements)")
    self._put(np.ascontiguousarray(values, dtype=dtype).view(np.uint8).data)
    self._left -= values.size

  def close(self) -> None:
    """Checks every element was written, fsyncs and renames the file into place."""
    if self._left or any(int(np.prod(self.specs[n][0], dtype=np.int64)) for n in self._names):
      self.abort()
      raise ValueError("ChunkWriter: fewer elements than announced")
    self._file.flush()
    if self.fsync:
      os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self.path + ".partial", self.path)
    self.sha256 = self._digest.hexdigest()

  def abort(self) -> None:
    """Drops the partial file."""
    if not self._file.closed:
      self._file.close()
    try:
      os.remove(self.path + ".partial")
    except FileNotFoundError:
      pass
