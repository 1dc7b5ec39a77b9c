"""safetensors files: a checked header reader, whole-file and streaming writers, hashing.

Everything read from a file is checked (header size and schema, names, shapes, dtypes,
finiteness) before use: files come from untrusted stores.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Iterator, Mapping, Optional

import numpy as np
import safetensors
import safetensors.numpy

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

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


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a dict of tensors with :func:`write_streaming` (sorted names, atomic)."""
  specs = {n: (tuple(v.shape), dtype_code(v.dtype)) for n, v in tensors.items()}
  write_streaming(path, specs, ((n, tensors[n]) for n in sorted(specs)))


def header_bytes(specs: Mapping[str, tuple[tuple[int, ...], str]]) -> bytes:
  """The safetensors header :func:`write_streaming` writes for ``specs`` (without the 8-byte
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


def write_streaming(path: str, specs: Mapping[str, tuple[tuple[int, ...], str]],
                    tensors: Iterator[tuple[str, np.ndarray]]) -> None:
  """Writes a safetensors file tensor by tensor, holding one tensor at a time.

  The header is laid out from ``specs`` (names sorted, data contiguous, header padded to 8
  bytes), so the same tensors always give the same bytes. ``tensors`` must yield every name
  of ``specs`` in sorted order with the announced shape and dtype. Written to
  ``path + '.partial'`` and renamed into place when complete.
  """
  names = sorted(specs)
  raw = header_bytes(specs)
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    expected = iter(names)
    for name, value in tensors:
      want = next(expected, None)
      shape, dtype = specs[want] if want else ((), "")
      if name != want or tuple(value.shape) != tuple(shape) or dtype_code(value.dtype) != dtype:
        f.close()
        os.remove(tmp)
        raise ValueError(f"write_streaming: got {name} {value.dtype}{list(value.shape)}, "
                         f"expected {want} {dtype}{list(shape)}")
      f.write(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).data)
    if next(expected, None) is not None:
      f.close()
      os.remove(tmp)
      raise ValueError("write_streaming: fewer tensors than announced")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


class TensorFile:
  """A checked safetensors file whose tensors are read as short-lived memory maps.

  ``tensor(name)`` maps just that tensor's bytes; once the returned array is dropped the
  map is closed, so streaming over names keeps memory at about one tensor.
  """

  def __init__(self, path: str):
    self.path = path
    self.header = read_header(path)
    with open(path, "rb") as f:
      (self._data_start,) = struct.unpack("<Q", f.read(8))
    self._data_start += 8

  def specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (shape, dtype) for n, (dtype, shape, _) in self.header.items() if not _is_buffer(n)}

  def tensor(self, name: str) -> np.ndarray:
    dtype, shape, (begin, end) = self.header[name]
    np_dtype = _DTYPES.get(dtype)
    if np_dtype is None:
      raise UserError(f"{self.path}: tensor {name} has dtype {dtype}, which cannot be read here.")
    if end == begin:
      return np.zeros(shape, dtype=np_dtype)
    return np.memmap(self.path, dtype=np.dtype(np_dtype).newbyteorder("<"), mode="r",
                     offset=self._data_start + begin, shape=shape)


def iter_tensors(path: str, names) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) one at a time from a checked file, through a memory map."""
  with safetensors.safe_open(path, framework="np") as f:
    for name in names:
      yield name, f.get_tensor(name)


def load_checked(path: str, specs, source: str) -> dict[str, np.ndarray]:
  """Loads a whole body file after the header check, then checks values (finite)."""
  check_file_against_specs(path, specs, source)
  tensors = safetensors.numpy.load_file(path)
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
