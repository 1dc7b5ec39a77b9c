"""Every code block of README.md's "Use a fused model" section runs as written.

Blocks run in order in a fresh working directory, with the README's example store
``stores/demo`` replaced by a real store (a tiny BERT encoder with MiniLM's vocabulary):
``python`` blocks in this process, each in a fresh namespace; ``bash`` blocks with bash.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import published as im

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Use a fused model"


def readme_blocks() -> list[tuple[str, str]]:
  """(language, code) of every fenced block in the section."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index(f"\n{SECTION}\n")
  end = text.find("\n## ", start + 1)
  section = text[start:end if end >= 0 else None]
  return re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.M | re.S)


def test_section_has_the_three_ways():
  # Execute
  blocks = readme_blocks()
  # Assert
  assert [language for language, _ in blocks] == ["python", "bash", "python", "bash", "python"]
  # The example store is named where a store is used: the Keras block and both exports.
  assert ["stores/demo" in code for _, code in blocks] == [True, True, False, True, False]


def test_every_snippet_runs(tmp_path, monkeypatch):
  # Prepare
  store = im.tiny_bert_store()
  monkeypatch.chdir(tmp_path)
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  namespaces = []
  # Execute: each block in turn
  for index, (language, code) in enumerate(readme_blocks()):
    code = code.replace("stores/demo", store)
    if language == "bash":
      result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
      assert result.returncode == 0, f"README block {index}:\n{code}\n{result.stderr[-3000:]}"
      namespaces.append(None)
    else:
      namespace = {"__name__": f"readme_block_{index}"}
      program = compile(code, f"README.md[{SECTION} block {index}]", "exec")
      exec(program, namespace)  # pylint: disable=exec-used
      namespaces.append(namespace)
  # Assert
  keras_block, hf_block, hub_block = namespaces[0], namespaces[2], namespaces[4]
  assert keras_block["hidden"].shape == (1, 5, 32)  # [CLS] a gripping film [SEP]
  assert os.path.exists(tmp_path / "classifier.keras")
  assert keras_block["model"].name == "cold_fusion_bert"  # the reloaded classifier
  assert os.path.exists(tmp_path / "exported" / "demo" / "README.md")
  tf_hidden = hf_block["tf_body"](**hf_block["tokenizer"](["a gripping film"],
                                                          return_tensors="tf")).last_hidden_state
  assert np.abs(tf_hidden.numpy() - hf_block["hidden"].numpy()).max() < 1e-4
  assert type(hub_block["backbone"]).__name__ == "BertBackbone"
  assert np.isfinite(hub_block["classifier"].history.history["loss"][0])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
