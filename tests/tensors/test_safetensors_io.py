"""TF body <-> Hugging Face safetensors: exact round trips, interop with transformers and
PyTorch, and rejection of damaged files."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file
import tensorflow as tf
import transformers

from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.errors import UserError
import tiny


@pytest.fixture(scope="module")
def minilm_base(tmp_path_factory):
  """Base 0 as this package writes it, from the real MiniLM-L6 encoder."""
  out = str(tmp_path_factory.mktemp("minilm") / "base")
  body, tokenizer = models.load_source_model(tiny.minilm_dir())
  models.write_base_dir(body, tokenizer, out)
  return out


def _sentences(n=8):
  with open(os.path.join(tiny.DATA, "sst2", "dev.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_round_trip_tf_safetensors_tf_is_exact(tmp_path, family):
  # Prepare
  source = tiny.write_tiny_base(str(tmp_path / "base"), family, seed=3)
  body = models.load_body(source)
  # Execute: body -> safetensors -> a fresh body
  path = str(tmp_path / "again.safetensors")
  weights.save_safetensors(hf_names.body_tensors(body), path)
  fresh = models.build_body(body.config)
  hf_names.assign_body_tensors(fresh, load_file(path), path)
  # Assert
  assert len(body.weights) == len(fresh.weights) > 10
  for a, b in zip(body.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_base_zero_keeps_the_source_tensors_exactly(minilm_base):
  # Prepare
  source = load_file(os.path.join(tiny.minilm_dir(), "model.safetensors"))
  ours = load_file(os.path.join(minilm_base, "model.safetensors"))
  # Assert
  assert set(ours) == set(source) - {"embeddings.position_ids"}
  for name, value in ours.items():
    np.testing.assert_array_equal(value, source[name], err_msg=name)
  # PyTorch layout: a Dense kernel is stored as (out, in).
  assert ours["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)


def test_published_base_loads_in_transformers_tf_and_pytorch(minilm_base):
  # Prepare
  import torch  # pylint: disable=g-import-not-at-top
  tokenizer = models.load_tokenizer(minilm_base)
  ours = models.load_body(minilm_base)
  hf_tf = transformers.TFAutoModel.from_pretrained(minilm_base)
  pt = transformers.AutoModel.from_pretrained(minilm_base).eval()
  texts = _sentences()
  tf_inputs = tokenizer(texts, padding=True, return_tensors="tf")
  pt_inputs = tokenizer(texts, padding=True, return_tensors="pt")
  # Execute
  ours_h = ours(**tf_inputs, training=False).last_hidden_state.numpy()
  hf_h = hf_tf(**tf_inputs, training=False).last_hidden_state.numpy()
  with torch.no_grad():
    pt_h = pt(**pt_inputs).last_hidden_state.numpy()
  # Assert
  mask = tf_inputs["attention_mask"].numpy().astype(bool)
  np.testing.assert_array_equal(ours_h, hf_h)
  assert np.abs(ours_h[mask] - pt_h[mask]).max() < 1e-4


def test_the_writer_is_deterministic_and_readable(tmp_path):
  # Prepare
  rng = np.random.default_rng(0)
  tensors = {"b.weight": rng.normal(size=(3, 4)).astype(np.float32),
             "a.bias": rng.normal(size=(5,)).astype(np.float16)}
  p1, p2 = str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors")
  # Execute
  weights.save_safetensors(tensors, p1)
  weights.save_safetensors(dict(reversed(list(tensors.items()))), p2)
  # Assert
  assert weights.sha256_file(p1) == weights.sha256_file(p2)
  loaded = load_file(p1)
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name], value)
  assert not os.path.exists(p1 + ".partial")


def _write_raw(path, header, data=b""):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_damaged_files_are_rejected_with_the_reason(tmp_path):
  # Prepare: a good file and a truncated copy
  good = str(tmp_path / "good.safetensors")
  weights.save_safetensors({"w": np.ones((4, 4), np.float32)}, good)
  data = open(good, "rb").read()
  truncated = str(tmp_path / "truncated.safetensors")
  open(truncated, "wb").write(data[:-10])
  # Execute / Assert
  with pytest.raises(UserError, match="truncated"):
    weights.read_header(truncated)
  # Prepare: a file too short for a header
  tiny_file = str(tmp_path / "tiny.safetensors")
  open(tiny_file, "wb").write(b"abc")
  # Execute / Assert
  with pytest.raises(UserError, match="not a safetensors file"):
    weights.read_header(tiny_file)
  # Prepare: a header that is not JSON
  bad_json = str(tmp_path / "badjson.safetensors")
  open(bad_json, "wb").write(struct.pack("<Q", 5) + b"{nope")
  # Execute / Assert
  with pytest.raises(UserError, match="not valid JSON"):
    weights.read_header(bad_json)
  # Prepare: two tensors whose bytes overlap
  overlap = str(tmp_path / "overlap.safetensors")
  _write_raw(overlap, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
  # Execute / Assert
  with pytest.raises(UserError, match="overlap"):
    weights.read_header(overlap)


def test_wrong_shapes_names_and_nan_are_rejected(tmp_path):
  # Prepare
  source = tiny.write_tiny_base(str(tmp_path / "base"), "bert")
  body = models.load_body(source)
  tensors = hf_names.body_tensors(body)
  specs = hf_names.expected_specs(body)
  name = "encoder.layer.0.attention.self.query.weight"
  bad = dict(tensors, **{name: tensors[name][:, :-1]})
  # Execute / Assert: a wrong shape, a missing or unexpected name, a NaN, a wrong dtype
  with pytest.raises(UserError, match=r"query.weight has shape \(32, 31\)"):
    weights.check_tensors(bad, specs, "x")
  bad = dict(tensors)
  del bad[name]
  with pytest.raises(UserError, match="missing"):
    weights.check_tensors(bad, specs, "x")
  bad = dict(tensors, **{"classifier.weight": np.zeros((2, 32), np.float32)})
  with pytest.raises(UserError, match="unexpected"):
    weights.check_tensors(bad, specs, "x")
  nan = tensors[name].copy()
  nan[0, 0] = np.nan
  with pytest.raises(UserError, match="NaN"):
    weights.check_tensors(dict(tensors, **{name: nan}), specs, "x")
  f64 = dict(tensors, **{name: tensors[name].astype(np.float64)})
  with pytest.raises(UserError, match="dtype float64"):
    weights.check_tensors(f64, specs, "x")


def test_the_reader_reads_whole_tensors_and_chunks(tmp_path):
  # Prepare
  path = str(tmp_path / "m.safetensors")
  values = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(2, np.float16)}
  weights.save_safetensors(values, path)
  # Execute
  f = weights.BodyFile(path)
  # Assert
  assert f.specs() == {"x": ((3, 4), "F32"), "y": ((2,), "F16")}
  np.testing.assert_array_equal(f.read_tensor("x"), values["x"])
  np.testing.assert_array_equal(f.read("x", 5, 3), [5, 6, 7])
  assert tf.constant(f.read_tensor("y")).dtype == tf.float16


def test_chunk_writer_hands_the_file_to_the_disk_as_it_grows(tmp_path, monkeypatch):
  # Prepare: writeback every 1000 bytes, each request recorded, then passed on to the kernel.
  monkeypatch.setattr(weights, "WRITEBACK_BYTES", 1000)
  handed, start = [], weights.start_writeback

  def record(fd, offset, length):  # on the writer's writeback thread
    handed.append((offset, length, os.fstat(fd).st_size))
    start(fd, offset, length)

  monkeypatch.setattr(weights, "start_writeback", record)
  values = np.arange(1500, dtype=np.float32)
  path = str(tmp_path / "x.safetensors")
  writer = weights.ChunkWriter(path, {"a": ((1500,), "F32")}, fsync=False)
  # Execute
  for part in np.split(values, 6):
    writer.write("a", part)
  writer.close()
  # Assert: contiguous requests of at least 1000 bytes from the start, covering all but the
  # tail; the file is the tensor, hashed as written.
  assert [o for o, _, _ in handed] == [0] + list(np.cumsum([n for _, n, _ in handed])[:-1])
  assert all(n >= 1000 for _, n, _ in handed) and len(handed) >= 5  # 6,000 bytes of data
  assert all(size >= o + n for o, n, size in handed)  # what is handed over is in the file
  assert os.path.getsize(path) - sum(n for _, n, _ in handed) < 1000
  assert np.array_equal(load_file(path)["a"], values)
  assert writer.sha256 == weights.sha256_file(path)
