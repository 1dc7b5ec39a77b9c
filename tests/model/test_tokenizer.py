"""A base's tokenizer files from an untrusted store: read with limits, never code of the
base's own, never a tokenizer of another family, and a broken file is one UserError."""

from __future__ import annotations

import json
import shutil

import pytest

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import tokenizer as tokenizer_lib
import tiny


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
  """The real MiniLM tokenizer files (a BERT WordPiece vocabulary), without weights."""
  folder = tmp_path_factory.mktemp("tok") / "base"
  shutil.copytree(tiny.minilm_dir(), folder,
                  ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5"))
  return folder


def _damaged(bert_base, tmp_path, name, change):
  folder = tmp_path / "base"
  shutil.copytree(bert_base, folder)
  path = folder / name
  if callable(change):
    settings = json.loads(path.read_text())
    change(settings)
    path.write_text(json.dumps(settings))
  else:
    path.write_text(change)
  (folder / "evil.py").write_text("open('PWNED', 'w').close()\n")
  return folder


@pytest.mark.parametrize("name,change,message", [
    ("tokenizer_config.json", lambda s: s.update(auto_map={"AutoTokenizer": ["evil.T", None]},
                                                 tokenizer_class="EvilTokenizer"),
     "tokenizer_config.json: names code to run (auto_map)"),
    ("tokenizer_config.json", lambda s: s.update(tokenizer_class="XLNetTokenizer"),
     "tokenizer_config.json: tokenizer_class 'XLNetTokenizer' is not a tokenizer of the "
     "supported families"),
    ("tokenizer_config.json", "[" * 10000 + "]" * 10000, "tokenizer_config.json: JSON nested"),
    ("tokenizer.json", "{garbage", "base: cannot load the tokenizer ("),
    ("tokenizer.json", "[" * 1000 + "]" * 1000, "base: cannot load the tokenizer ("),
])
def test_hostile_tokenizer_files_are_one_user_error(bert_base, tmp_path, monkeypatch, name,
                                                    change, message):
  # Prepare
  from cold_fusion_tf.model import bodies  # pylint: disable=g-import-not-at-top
  folder = _damaged(bert_base, tmp_path, name, change)
  monkeypatch.chdir(tmp_path)
  # Execute / Assert: no prompt to run the base's code, no traceback of the Rust parser
  with pytest.raises(UserError) as error:
    bodies.load_tokenizer(str(folder))
  assert message in str(error.value), str(error.value)
  assert not (tmp_path / "PWNED").exists()


def test_the_keras_hub_tokenizer_refuses_them_too(bert_base, tmp_path):
  # Prepare
  folder = _damaged(bert_base, tmp_path, "tokenizer.json", "[" * 1000 + "]" * 1000)
  # Execute / Assert
  with pytest.raises(UserError, match=r"tokenizer\.json: not a valid tokenizer \(invalid type"):
    tokenizer_lib.load(str(folder), "bert")
  # Execute / Assert: the intact files give MiniLM's ids
  assert tokenizer_lib.load(str(bert_base), "bert")(["hello world"])["input_ids"] == [
      [101, 7592, 2088, 102]]


def test_a_tokenizer_with_ids_past_the_embeddings_is_refused(bert_base, tmp_path):
  # Prepare: an added token whose id (30522) the model's 30522 embeddings do not have (the
  # first text holding it stopped training with an InvalidArgumentError)
  from cold_fusion_tf.model import bodies  # pylint: disable=g-import-not-at-top
  folder = _damaged(bert_base, tmp_path, "tokenizer.json", lambda s: s["added_tokens"].append(
      {"id": 30522, "content": "zzqq", "single_word": False, "lstrip": False, "rstrip": False,
       "normalized": True, "special": False}))
  # Execute / Assert: both tokenizers refuse it
  for load in (lambda: bodies.load_tokenizer(str(folder)),
               lambda: tokenizer_lib.load(str(folder), "bert")):
    with pytest.raises(UserError, match=r"the tokenizer gives ids up to 30522 \(token 'zzqq'\), "
                       r"but the model has 30522 token embeddings"):
      load()
