"""The programs on datasets of kinds the shipped ones are not: a legitimate one trains and is
scored; one that cannot be read or scored stops with one `error:` line, exit status 2, before
any training and with nothing written."""

import json
import os
import subprocess
import sys

import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--config.recipe.batch_size=4", "--config.recipe.max_steps=2",
         "--config.recipe.probe_epochs=0", "--config.recipe.max_length=32",
         "--config.eval.recipe.batch_size=4", "--config.eval.recipe.max_steps=2",
         "--config.eval.recipe.max_length=32"]


def _program(program, *args, **env):
  return subprocess.run([sys.executable, "-m", f"cold_fusion_tf.{program}", *args, *SMALL],
                        cwd=REPO, env=tiny.env(**env), capture_output=True, text=True,
                        timeout=300)


def _one_error(result) -> str:
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  return errors[0]


def _files(root) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names)


def _write(folder, files) -> str:
  os.makedirs(folder, exist_ok=True)
  for name, text in files.items():
    with open(os.path.join(folder, name), "w", encoding="utf-8", newline="") as f:
      f.write(text)
  return str(folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return tiny.make_store(str(tmp_path_factory.mktemp("datasets") / "store"))


def test_train_on_a_csv_pair_task_of_named_labels_with_a_bom_and_line_breaks(store, tmp_path):
  # Prepare: CSV with a BOM, CR LF rows, a quoted line break, RTL and emoji text, label names
  # as strings; the columns named otherwise than the record fields.
  rows = ['\ufeffpremise,hypothesis,verdict\r\n']
  for i in range(12):
    rows.append(f'"first {i},\r\nstill first \u05e9\u05dc\u05d5\u05dd \U0001f600",'
                f'second {i} \u0645\u0631\u062d\u0628\u0627,{("yes", "no", "maybe")[i % 3]}\r\n')
  folder = _write(tmp_path / "nli_csv", {f"{s}.csv": "".join(rows) for s in ("train", "dev",
                                                                             "test")})
  # Execute
  result = _program("train", "--config=configs/demo.py", f"--store={store}",
                    f"--config.task={folder}", f"--workdir={tmp_path / 'work'}",
                    "--config.data.columns.text=premise",
                    "--config.data.columns.text_pair=hypothesis",
                    "--config.data.columns.label=verdict")
  # Assert
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(store, "contributions", "000000", "nli_csv", "contribution.json")) as f:
    contribution = json.load(f)
  assert contribution["num_examples"] == 12 and contribution["steps"] == 2
  assert 0.0 <= contribution["dev_metrics"]["score"] <= 1.0


def test_train_refuses_a_file_over_the_size_limit_before_any_work(store, tmp_path):
  # Prepare: a train split of 2.0 MiB, the limit at 1 MiB
  line = json.dumps({"text": "x" * 1000, "label": 1}) + "\n"
  folder = _write(tmp_path / "large", {"train.jsonl": line * 2048,
                                       "dev.jsonl": line, "test.jsonl": line})
  before = _files(store)
  # Execute
  result = _program("train", "--config=configs/demo.py", f"--store={store}",
                    f"--config.task={folder}", f"--workdir={tmp_path / 'work'}",
                    "--config.data.max_file_mb=1")
  # Assert
  error = _one_error(result)
  assert "large/train.jsonl: 2.0 MiB, larger than the 1.0 MiB" in error
  assert "config.data.max_file_mb=<MiB>" in error
  assert _files(store) == before and not os.path.exists(tmp_path / "work")


def test_evaluate_refuses_a_regression_test_split_it_cannot_rank(store, tmp_path):
  # Prepare: every test score is 3.0 (Spearman undefined: it was reported as a score of 0)
  scores = "".join(json.dumps({"text": f"t{i}", "label": 0.5 * i}) + "\n" for i in range(8))
  same = "".join(json.dumps({"text": f"t{i}", "label": 3.0}) + "\n" for i in range(8))
  folder = _write(tmp_path / "flat", {"train.jsonl": scores, "dev.jsonl": scores,
                                      "test.jsonl": same, "info.json": '{"task": "regression"}'})
  out = tmp_path / "results"
  # Execute
  result = _program("evaluate", "--config=configs/demo.py", f"--base={store}",
                    f"--tasks={folder}", "--seeds=1", f"--out={out}")
  # Assert
  error = _one_error(result)
  assert "flat: the test split cannot be scored: its 8 scores are all 3" in error
  assert not os.path.exists(out) or _files(out) == []
