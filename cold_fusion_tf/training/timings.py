"""Where a fine-tune's wall time goes: seconds by phase, and the line that shows them.

Phases (any may be 0):

* ``tokenize``: tokenizing the splits (0 once a dataset's tokens are known in the process);
* ``build``: building the model, optimizer and step functions, or preparing a kept one;
* ``first_call``: the first training call (tracing and compiling the step function the first
  time a model is built; then it is close to a steady call) and its input pipeline;
* ``steps``: the other training calls (``steady_steps`` optimizer steps);
* ``input``: making each epoch's input pipeline;
* ``dev``, ``test``: predicting on the splits and scoring;
* ``checkpoints``: restoring and saving training checkpoints;
* ``other``: the rest (logs, TensorBoard, copying weights back).
"""

from __future__ import annotations

import contextlib
import time

PHASES = ("tokenize", "build", "first_call", "steps", "input", "dev", "test", "checkpoints",
          "other")


class Timings:
  """Seconds by phase of one fine-tune; :meth:`finish` fills ``other`` and ``total``."""

  def __init__(self):
    self.start = time.perf_counter()
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.first_steps = 0     # optimizer steps in the first training call
    self.steady_steps = 0    # optimizer steps in the others
    self.reused = False      # whether the model was kept from an earlier fine-tune

  @contextlib.contextmanager
  def phase(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start

  def train_call(self, seconds: float, steps: int) -> None:
    """Books one training call: the first of the fine-tune, or a steady one."""
    if self.first_steps == 0:
      self.seconds["first_call"] += seconds
      self.first_steps = steps
    else:
      self.seconds["steps"] += seconds
      self.steady_steps += steps

  def finish(self) -> dict:
    """The breakdown: seconds by phase, ``total``, step counts and ``reused``."""
    total = time.perf_counter() - self.start
    known = sum(v for k, v in self.seconds.items() if k != "other")
    self.seconds["other"] = max(0.0, total - known)
    return {**self.seconds, "total": total, "first_steps": self.first_steps,
            "steady_steps": self.steady_steps, "reused": self.reused}


def step_seconds(timings: dict) -> float:
  """Seconds per steady training step (0 when there was none)."""
  return timings["steps"] / timings["steady_steps"] if timings["steady_steps"] else 0.0


def describe(timings: dict) -> str:
  """``62 steps in 41.0s: tokenize 0.0s, build 0.4s (reused), first call 1.1s, ...``."""
  steps = timings["first_steps"] + timings["steady_steps"]
  parts = []
  for name in PHASES:
    value = timings[name]
    if name not in ("build", "steps", "other") and value < 0.05:
      continue
    text = f"{name.replace('_', ' ')} {value:.1f}s"
    if name == "build":
      text += " (reused)" if timings["reused"] else " (built)"
    if name == "steps" and timings["steady_steps"]:
      text += f" ({step_seconds(timings) * 1000:.0f} ms/step)"
    parts.append(text)
  return f"{steps} steps in {timings['total']:.1f}s: {', '.join(parts)}"
