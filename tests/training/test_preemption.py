"""Preemption for real: SIGKILL a contributor mid-run, run the same command again, and check
that it resumes from its checkpoint (not from step 0) and still writes one contribution."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import tiny

TOTAL = 40  # 640 examples / batch 16


def _run_until_checkpoint(cmd, stderr_path, at_least: int) -> tuple[int, str]:
  """Starts ``cmd``, SIGKILLs it once it reports a checkpoint at step >= ``at_least``."""
  lines = []
  with open(stderr_path, "w", encoding="utf-8") as err:
    proc = subprocess.Popen(cmd, env=tiny.env(), stdout=subprocess.PIPE, stderr=err,
                            text=True, bufsize=1)
    try:
      deadline = time.time() + 240
      for line in proc.stdout:
        lines.append(line)
        found = re.search(r"saved checkpoint at step (\d+)", line)
        if found and int(found.group(1)) >= at_least:
          proc.send_signal(signal.SIGKILL)
          break
        assert time.time() < deadline, "no checkpoint reported in time"
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return proc.returncode, "".join(lines)


def _steps(log: str) -> list[int]:
  """The fine-tune's reported steps (a probe phase's lines, ``probe: ...``, left out)."""
  return [int(s) for line in log.splitlines() if "probe: " not in line
          for s in re.findall(rf"step (\d+)/{TOTAL}", line)]


def test_killed_contributor_resumes_and_finishes(tmp_path):
  # Prepare
  store = tiny.make_store(str(tmp_path / "store"), layers=2)
  config = tiny.write_config(str(tmp_path / "config.py"), train=640,
                             checkpoint_every_steps=5, log_every_steps=1,
                             eval_every_steps=20, steps_per_execution=1)
  workdir = str(tmp_path / "workdir")
  cmd = tiny.train_command(config, store, workdir)

  # Execute: killed after a checkpoint
  code, first = _run_until_checkpoint(cmd, tmp_path / "first.err", at_least=10)
  # Assert
  assert code == -signal.SIGKILL, first[-2000:]
  first_steps = _steps(first)
  assert first_steps and max(first_steps) < TOTAL
  contributions = os.path.join(store, "contributions", "000000")
  assert not os.path.exists(os.path.join(contributions, "trec_coarse", "contribution.json"))
  assert os.listdir(os.path.join(workdir, "checkpoints"))

  # Execute: run again
  second = subprocess.run(cmd, env=tiny.env(), capture_output=True, text=True,
                          timeout=300, check=False)
  # Assert
  assert second.returncode == 0, second.stderr[-3000:]
  resumed = re.search(r"resuming from step (\d+)", second.stdout)
  assert resumed, second.stdout[-2000:]
  start = int(resumed.group(1))
  assert 10 <= start < TOTAL and start % 5 == 0
  second_steps = _steps(second.stdout)
  assert min(second_steps) == start + 1 and max(second_steps) == TOTAL  # continued, not restarted
  assert len(second_steps) == TOTAL - start < TOTAL

  with open(os.path.join(contributions, "trec_coarse", "contribution.json"),
            encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["steps"] == TOTAL and meta["examples_seen"] == TOTAL * 16
  assert meta["best_step"] in (20, 40)
  assert os.listdir(contributions) == ["trec_coarse"]
  # The checkpoints are removed once the contribution is in the store; the logs stay.
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))

