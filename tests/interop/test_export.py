"""python -m cold_fusion_tf.export: self-contained model directories with a model card.

The store went through one real fusion (two contributions) and holds evaluations of bases 0
and 1 in the loop's format (tests/published.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import transformers
import yaml

from cold_fusion_tf.interop import export
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
import published as im

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fused_store():
  return im.fused_tiny_bert_store()


def _run(*args):
  return subprocess.run([sys.executable, "-m", "cold_fusion_tf.export", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _card(path):
  text = open(os.path.join(path, "README.md"), encoding="utf-8").read()
  assert text.startswith("---\n")
  front, body = text[4:].split("\n---\n", 1)
  return yaml.safe_load(front), body


def test_hf_export_is_self_contained_with_a_model_card(fused_store, tmp_path):
  # Prepare
  out = tmp_path / "exported"
  # Execute
  result = _run(f"--store={fused_store}", f"--out={out}", "--license=mit")
  # Assert
  assert result.returncode == 0, result.stderr
  assert f"exported base 1 of {fused_store} (hf) to {out}" in result.stdout
  store = store_lib.Store(fused_store)
  manifest = store.manifest(1)
  assert sorted(os.listdir(out)) == sorted(set(manifest["files"])
                                           | {"README.md", "cold_fusion_lineage.json"})
  for name in manifest["files"]:
    with open(out / name, "rb") as a, open(os.path.join(store.base_dir(1), name), "rb") as b:
      assert a.read() == b.read(), name
  front, body = _card(out)
  assert front["language"] == "en" and front["license"] == "mit"
  assert front["library_name"] == "transformers"
  assert front["base_model"] == "prajjwal1/bert-tiny"
  assert "cold-fusion" in front["tags"] and "bert" in front["tags"]
  assert front["datasets"] == ["sst2", "trec_coarse"]
  assert "# ColD Fusion bert, iteration 1" in body
  assert "- Fusion iterations: 1, 2 fused contribution(s) from 2 dataset(s)" in body
  assert f"sha256: `{manifest['files']['model.safetensors']['sha256']}`" in body
  assert "| 1 | mean | sst2: 48, trec_coarse: 40 | - |" in body
  assert "| rte | no | 55.0 | 58.0 | +3.0 |" in body
  assert "| sst2 | yes | 80.0 | 84.0 | +4.0 |" in body
  assert "| mean gain, seen | | | | +4.0 |" in body and "| mean gain, unseen | | | | +3.0 |" in body
  lineage = json.load(open(out / "cold_fusion_lineage.json"))
  assert lineage["iteration"] == 1 and lineage["datasets"] == ["sst2", "trec_coarse"]
  assert lineage["model_sha256"] == manifest["files"]["model.safetensors"]["sha256"]
  # A Hugging Face directory: Transformers reads its config and tokenizer as they are.
  assert transformers.AutoConfig.from_pretrained(str(out)).model_type == "bert"
  assert transformers.AutoTokenizer.from_pretrained(str(out))("a b")["input_ids"] == [
      101, 1037, 1038, 102]


def test_base_zero_and_bad_arguments(fused_store, tmp_path):
  # Execute
  out = export.export_model(fused_store, str(tmp_path / "zero"), iteration=0, log=lambda _: None)
  # Assert
  front, body = _card(out)
  assert "datasets" not in front
  assert "This is base 0: the source model as published in the store" in body
  assert "It is the source model as the run published it, before any fusion." in body
  assert "| task | base 0 |" in body and "| sst2 | 80.0 |" in body
  # Execute / Assert: bad arguments
  with pytest.raises(UserError, match=r"base 2 is not published; .* holds bases 0\.\.1"):
    export.export_model(fused_store, str(tmp_path / "two"), iteration=2)
  with pytest.raises(UserError, match="--format='onnx'"):
    export.export_model(fused_store, str(tmp_path / "onnx"), fmt="onnx")
  assert not os.path.exists(tmp_path / "two") and not os.path.exists(tmp_path / "onnx")
  # Execute
  # A non-empty --out is refused with one error line and exit status 2; nothing is touched.
  result = _run(f"--store={fused_store}", f"--out={out}")
  # Assert
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --out={out}: exists and is not an empty directory; choose a new one.")
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "zero"))
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_keras_hub_export_carries_the_card(fused_store, tmp_path):
  # Prepare
  keras_hub = pytest.importorskip("keras_hub")
  # Execute
  out = export.export_model(fused_store, str(tmp_path / "hub"), fmt="keras_hub",
                            sequence_length=32, log=lambda _: None)
  # Assert
  front, body = _card(out)
  assert front["library_name"] == "keras-hub" and "keras-hub" in front["tags"]
  assert "keras_hub.models.TextClassifier.from_preset(model_dir, num_classes=2)" in body
  assert {"config.json", "model.weights.h5", "preprocessor.json", "tokenizer.json",
          "cold_fusion_lineage.json"} <= set(os.listdir(out))
  backbone = keras_hub.models.Backbone.from_preset(out)
  assert type(backbone).__name__ == "BertBackbone" and backbone.num_layers == 2


def test_an_out_that_cannot_be_written_is_one_user_error(fused_store, tmp_path, monkeypatch):
  # Execute / Assert: a folder that cannot be made is found before the store is read
  with pytest.raises(UserError, match=r"^--out=/proc/nope/x: cannot create files there \(No "
                     r"such file or directory: /proc/nope\)"):
    export.export_model(str(tmp_path / "no_store"), "/proc/nope/x", log=lambda _: None)
  # Prepare: the disk fills up while the model directory is written
  def full(store, iteration, out_dir):
    raise OSError(28, "No space left on device", os.path.join(out_dir, "model.safetensors"))

  monkeypatch.setattr(store_lib.Store, "copy_base", full)
  out = tmp_path / "exported"
  # Execute / Assert
  with pytest.raises(UserError, match=rf"^--out={out}: cannot write the model directory \(No "
                     r"space left on device: .*\); nothing was left behind"):
    export.export_model(fused_store, str(out), log=lambda _: None)
  # Assert: nothing half-written
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_base_that_names_code_to_run_is_not_exported(tmp_path, name):
  # Prepare: a store whose base names a module of its own to run (auto_map), with the manifest
  # rewritten to match (anyone who may write the store can)
  import synthetic  # pylint: disable=g-import-not-at-top
  store = synthetic.new_store(tmp_path)
  folder = store.storage.local_path("bases/000000")
  path = os.path.join(folder, name)
  settings = json.load(open(path)) if os.path.exists(path) else {}
  settings["auto_map"] = {"AutoModel": "evil.Model", "AutoTokenizer": ["evil.Tok", None]}
  with open(path, "w") as f:
    json.dump(settings, f)
  with open(os.path.join(folder, "evil.py"), "w") as f:
    f.write("import os\nos.system('touch PWNED')\n")
  manifest = store.manifest(0)
  for file in (name, "evil.py"):
    with open(os.path.join(folder, file), "rb") as f:
      data = f.read()
    manifest["files"][file] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
  store.storage.write_bytes("bases/000000/manifest.json", json.dumps(manifest).encode())
  out = tmp_path / "exported"
  # Execute / Assert: refused, naming the store's file; nothing exported
  with pytest.raises(UserError, match=rf"^{store.uri}/bases/000000/{name}: names code to run "
                     r"\(auto_map\)"):
    export.export_model(store.uri, str(out), log=lambda _: None)
  assert not out.exists() and sorted(os.listdir(tmp_path)) == ["store", "store-base0"]
