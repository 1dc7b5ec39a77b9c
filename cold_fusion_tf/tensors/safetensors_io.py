"""safetensors files: the one reader, the one writer, and hashing.

:class:`BodyFile`
  The reader: a safetensors file whose header has been checked (size and schema, names,
  shapes, dtypes, offsets, bounded by what the caller expects), kept open through one file
  descriptor and read with ``pread`` into numpy arrays, a chunk of a tensor at a time. A
  reader sees exactly the bytes it checked: a file replaced in the store afterwards (every
  store write is a rename) is not seen, and a file others may write in place is copied first
  (see the fusion's validation). No memory maps, so the resident memory is what was asked
  for.
:class:`ChunkWriter`
  The writer: chunk by chunk in sorted name order, one byte layout for the same tensors, the
  sha256 computed on the way, written to a ``.partial`` file renamed into place.
:func:`save_safetensors`, :func:`load_checked`
  Whole-file helpers on top of them; loaded values are checked (finite) before use.

Files come from untrusted stores: everything read is checked before use.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import json
import math
import os
import struct
from typing import Mapping, Optional

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

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

# Largest header we accept from an untrusted safetensors file (the format's own cap is 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bounds on one header entry: dimensions, and elements per dimension.
_MAX_DIMS = 8
_MAX_DIM = 1 << 48
_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}

def check_tensors(tensors: Mapping[str, np.ndarray], specs, source: str) -> None:
  """Names, shapes, dtypes and finiteness of ``tensors`` against ``specs``."""
  names = {n for n in tensors if not _is_buffer(n)}
  missing = sorted(set(specs) - names)
  extra = sorted(names - set(specs))
  if missing or extra:
    raise UserError(f"{source}: tensor names do not match the model "
                    f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}). "
                    "Is it a body of the same architecture as the store's base?")
  for name, (shape, dtype) in specs.items():
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise UserError(f"{source}: tensor {name} has shape {tuple(value.shape)}, expected {shape}.")
    if dtype_code(value.dtype) != dtype:
      raise UserError(f"{source}: tensor {name} has dtype {value.dtype}, expected {dtype}.")
    if not np.all(np.isfinite(value)):
      raise UserError(f"{source}: tensor {name} holds NaN or infinite values.")


def _is_buffer(name: str) -> bool:
  return name.endswith("position_ids")


def dtype_code(dtype) -> str:
  dtype = np.dtype(dtype)
  for code, np_dtype in _DTYPES.items():
    if np_dtype is not None and np.dtype(np_dtype) == dtype:
      return code
  raise UserError(f"Unsupported tensor dtype {dtype}.")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> str:
  """Writes a dict of tensors with :class:`ChunkWriter` (sorted names, atomic); its sha256."""
  specs = {n: (tuple(v.shape), dtype_code(v.dtype)) for n, v in tensors.items()}
  writer = ChunkWriter(path, specs)
  try:
    for name in sorted(specs):
      writer.write(name, np.asarray(tensors[name]).reshape(-1))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return writer.sha256


def header_bytes(specs: Mapping[str, tuple[tuple[int, ...], str]]) -> bytes:
  """The safetensors header :class:`ChunkWriter` writes for ``specs`` (without the 8-byte
  length): names sorted, data contiguous in that order, padded with spaces to 8 bytes."""
  header, offset = {}, 0
  for name in sorted(specs):
    shape, dtype = specs[name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
  return raw + b" " * (-len(raw) % 8)


Header = dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]


def read_header(path: str, max_header_bytes: Optional[int] = None,
                max_tensors: Optional[int] = None, source: Optional[str] = None) -> Header:
  """Parses and checks a safetensors header without reading the tensors.

  Returns name -> (dtype code, shape, (begin, end) byte offsets in the data section).
  Rejects anything but a regular file, truncated files, headers over ``max_header_bytes``
  (or the format's 100 MB) or with more than ``max_tensors`` entries, malformed or deeply
  nested headers, huge numbers, and overlapping ranges.
  """
  try:
    fd = untrusted.open_regular(path, source or path)
  except FileNotFoundError as e:
    raise UserError(f"{source or path}: cannot read ({e.strerror}).") from None
  try:
    return read_header_fd(fd, source or path, max_header_bytes, max_tensors)
  finally:
    os.close(fd)


def _pread_exactly(fd: int, count: int, offset: int, where: str) -> bytes:
  data = bytearray()
  while len(data) < count:
    chunk = os.pread(fd, min(count - len(data), 8 << 20), offset + len(data))
    if not chunk:
      raise UserError(f"{where}: ended early (truncated while being read?).")
    data += chunk
  return bytes(data)


def read_header_fd(fd: int, path: str, max_header_bytes: Optional[int] = None,
                   max_tensors: Optional[int] = None) -> Header:
  """:func:`read_header` of an open regular file (``path`` names it in messages)."""
  size = os.fstat(fd).st_size
  raw = os.pread(fd, 8, 0)
  if len(raw) < 8:
    raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes).")
  (header_len,) = struct.unpack("<Q", raw)
  limit = _MAX_HEADER_BYTES if max_header_bytes is None else min(max_header_bytes,
                                                                 _MAX_HEADER_BYTES)
  if header_len > limit:
    raise UserError(f"{path}: safetensors header of {header_len} bytes, more than the {limit} "
                    "a body of the base's layout needs (or not a safetensors file).")
  if header_len > size - 8:
    raise UserError(f"{path}: not a safetensors file or truncated (header length {header_len}, "
                    f"file size {size}).")
  header = untrusted.loads(_pread_exactly(fd, header_len, 8, path),
                           f"{path}: safetensors header", max_depth=4)
  if not isinstance(header, dict):
    raise UserError(f"{path}: safetensors header is not a JSON object.")
  count = len(header) - ("__metadata__" in header)
  if max_tensors is not None and count > max_tensors:
    raise UserError(f"{path}: {count} tensors in the header, more than the "
                    f"{max_tensors} of the base's layout.")
  data_size = size - 8 - header_len
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    entry = _header_entry(info)
    if entry is None:
      raise UserError(f"{path}: malformed header entry for tensor "
                      f"{untrusted.printable(name, 80)!r}.")
    dtype, shape, (begin, end) = entry
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype] or end > data_size:
      raise UserError(f"{path}: tensor {untrusted.printable(name, 80)!r} data is out of range "
                      f"or truncated (file size {size} bytes).")
    entries[name] = entry
  spans = sorted(span for _, _, span in entries.values())
  for (_, end_a), (begin_b, _) in zip(spans, spans[1:]):
    if begin_b < end_a:
      raise UserError(f"{path}: tensors overlap in the data section.")
  return entries


def _header_entry(info) -> Optional[tuple[str, tuple[int, ...], tuple[int, int]]]:
  """One header entry checked for types and sizes: (dtype, shape, (begin, end)) or None."""
  if not isinstance(info, dict):
    return None
  dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if not (isinstance(dtype, str) and dtype in _ITEMSIZE and isinstance(shape, list)
          and len(shape) <= _MAX_DIMS and isinstance(offsets, list) and len(offsets) == 2):
    return None
  numbers = shape + offsets
  if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM << 8
             for d in numbers) or any(d > _MAX_DIM for d in shape):
    return None
  begin, end = offsets
  if begin > end:
    return None
  return dtype, tuple(shape), (begin, end)


def check_file_against_specs(path: str, specs, source: str) -> None:
  """Header-level check of a body file (names, shapes, dtypes, bounds); no data read."""
  header = read_header(path)
  names = {n for n in header if not _is_buffer(n)}
  if names != set(specs):
    missing, extra = sorted(set(specs) - names), sorted(names - set(specs))
    raise UserError(f"{source}: tensor names do not match the base (missing {missing[:5]}, "
                    f"unexpected {extra[:5]}).")
  for name, (shape, dtype) in specs.items():
    got_dtype, got_shape, _ = header[name]
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
      raise UserError(f"{source}: tensor {name} is {got_dtype}{list(got_shape)}, expected "
                      f"{dtype}{list(shape)}.")


def specs_of_file(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF name -> (shape, dtype code) of a checked safetensors file (buffers left out)."""
  return {n: (shape, dtype) for n, (dtype, shape, _) in read_header(path).items()
          if not _is_buffer(n)}


def load_checked(path: str, specs, source: str) -> dict[str, np.ndarray]:
  """Loads a whole body file after the header check, then checks values (finite)."""
  check_file_against_specs(path, specs, source)
  with BodyFile(path, source) as body:
    tensors = {name: body.read_tensor(name) for name in body.header}
  check_tensors(tensors, specs, source)
  return tensors


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
  """Hex sha256 of a file, streamed."""
  with open(path, "rb") as f:
    return sha256_stream(f, chunk)


def sha256_stream(f, chunk: int = 8 << 20) -> str:
  """Hex sha256 of what is left of an open binary file, streamed."""
  digest = hashlib.sha256()
  while block := f.read(chunk):
    digest.update(block)
  return digest.hexdigest()


def pread_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
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

  Beyond :func:`read_header`'s checks, the data section must be exactly the tensors,
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
      self.header = read_header_fd(self.fd, self.source, max_header_bytes, max_tensors)
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
      pread_into(self.fd, memoryview(array.view(np.uint8)),
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


WRITEBACK_BYTES = 64 << 20
"""A file being written is handed to the disk in steps of this many bytes (see
:func:`start_writeback`)."""


@functools.cache
def _sync_file_range():
  """Linux's ``sync_file_range`` from the C library, or None where there is none."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).sync_file_range
  except (OSError, AttributeError, TypeError):  # no such call, or no C library to ask
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
  """Asks the kernel to start writing ``length`` bytes of ``fd`` at ``offset`` to disk,
  without waiting (``SYNC_FILE_RANGE_WRITE``), so that a later fsync of a large file finds
  little left to write; where the call does not exist or fails, nothing happens (the fsync
  writes it all)."""
  fn = _sync_file_range()
  if fn is not None:
    fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves it to the fsync


class ChunkWriter:
  """Writes a safetensors file for ``specs`` chunk by chunk, in sorted name order.

  The header is :func:`header_bytes` (names sorted, data contiguous, padded to 8 bytes), so
  the same tensors always give the same bytes. Written to ``path + '.partial'``, handed to
  the disk as it grows (:func:`start_writeback`, every :data:`WRITEBACK_BYTES`), fsynced
  (unless ``fsync=False``: the caller, or the store that takes the file, syncs it) and renamed
  into place by :meth:`close`, which sets :attr:`sha256` (the file's, computed from the bytes
  as they were written); :meth:`abort` removes it.
  """

  def __init__(self, path: str, specs: Specs, fsync: bool = True):
    self.path, self.specs, self.fsync = path, specs, fsync
    self._names = iter(sorted(specs))
    self._name, self._left = None, 0
    self.sha256: Optional[str] = None
    self._digest = hashlib.sha256()
    self._file = open(path + ".partial", "wb")
    self._written = self._handed = 0
    self._handing = None  # a thread of its own, so that the writer never waits for the disk
    raw = header_bytes(specs)
    self._put(struct.pack("<Q", len(raw)) + raw)

  def _put(self, data) -> None:
    self._digest.update(data)
    self._file.write(data)
    self._written += len(data)
    if self._written - self._handed >= WRITEBACK_BYTES:
      self._file.flush()
      if self._handing is None:
        self._handing = concurrent.futures.ThreadPoolExecutor(max_workers=1)
      self._handing.submit(start_writeback, self._file.fileno(), self._handed,
                           self._written - self._handed)
      self._handed = self._written

  def _handed_over(self) -> None:
    """Waits for the writeback requests made so far (before the file is synced or closed)."""
    if self._handing is not None:
      self._handing.shutdown(wait=True)
      self._handing = None

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
    self._handed_over()
    if self.fsync:
      os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self.path + ".partial", self.path)
    self.sha256 = self._digest.hexdigest()

  def abort(self) -> None:
    """Drops the partial file."""
    self._handed_over()
    if not self._file.closed:
      self._file.close()
    try:
      os.remove(self.path + ".partial")
    except FileNotFoundError:
      pass
