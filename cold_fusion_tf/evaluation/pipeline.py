"""Model recycling over several bases: which models, the results directory, the runs.

Results live in a :class:`cold_fusion_tf.results_dir.ResultsDir` (layout documented there);
a run is identified by (model, task, task_key, mode, recipe_key, seed): an evaluation with
the same base weights, data and recipe reuses it, so asking for more seeds, more tasks or
more bases only runs what is missing, and an interrupted evaluation resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Callable, Mapping, Sequence

from absl import logging

from cold_fusion_tf.training import contributor
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.evaluation.results import ResultsDir, run_id
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.training.trainer import duration_text as _duration
from cold_fusion_tf.errors import UserError

# Recipe fields that do not change what a run computes.
_NOT_IN_RECIPE_KEY = ("seed", "log_every_seconds", "log_every_steps", "checkpoint_every_steps",
                      "eval_batch_size")
# Rough training speed of a MiniLM-L6-sized model (90 MB of float32 weights) on 2 CPU cores,
# used for the first time estimate only; later estimates use the measured run times.
_GUESS_EXAMPLES_PER_SECOND = 30.0
_GUESS_MODEL_BYTES = 90e6


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A model to evaluate: a name for people, a checked local directory, its weights' sha256."""
  name: str
  directory: str
  sha256: str


_STORE_REF = re.compile(r"(.+)@(\d{1,6})")


def resolve_model(spec: str, what: str = "--base") -> ModelRef:
  """``STORE``, ``STORE@N`` (base N of a store; STORE alone: LATEST), a Hugging Face model
  directory, or ``package:<module>/<folder>``."""
  spec = (spec or "").strip()
  if not spec:
    raise UserError(f"{what} is empty: give a store (STORE or STORE@N) or a model directory.")
  match = _STORE_REF.fullmatch(spec)
  location, iteration = (match.group(1), int(match.group(2))) if match else (spec, None)
  if location.startswith("package:"):
    location = models.resolve_source(location)
  is_gcs = location.startswith("gs://")
  if not is_gcs and os.path.isfile(os.path.join(location, "config.json")):
    if iteration is not None:
      raise UserError(f"{what}={spec}: {location} is a model directory, not a store; "
                      "drop the @iteration.")
    path = os.path.join(location, "model.safetensors")
    if not os.path.isfile(path):
      raise UserError(f"{what}={spec}: {location} has no model.safetensors.")
    return ModelRef(spec, location, weights.sha256_file(path))
  if not is_gcs and not os.path.isdir(location):
    raise UserError(f"{what}={spec}: {location} does not exist.")
  store = store_lib.Store(location)
  if not is_gcs and not store.exists():
    raise UserError(f"{what}={spec}: {location} is neither a Hugging Face model directory (no "
                    "config.json) nor a ColD Fusion store (no run.json).")
  latest = store.require_latest()
  if iteration is None:
    iteration = latest
  if iteration > latest:
    raise UserError(f"{what}={spec}: the store's newest base is {latest}.")
  return ModelRef(f"{location}@{iteration}", store.base_dir(iteration),
                  store.base_sha256(iteration))


def default_reference(base_spec: str) -> str | None:
  """``STORE@0`` when ``base_spec`` names a store, else None (a directory needs --reference)."""
  match = _STORE_REF.fullmatch(base_spec.strip())
  location = match.group(1) if match else base_spec.strip()
  if location.startswith("gs://") or os.path.isfile(os.path.join(location, "run.json")):
    return f"{location}@0"
  return None


def resolve_tasks(config, spec: str) -> tuple[list[str], dict[str, list[str]]]:
  """Dataset references from ``--tasks`` (names; ``pool``, ``heldout`` or ``all`` from the
  config) and their groups by dataset id: held-in (config.pool), held-out, other."""
  names: list[str] = []
  for item in (s.strip() for s in (spec or "all").split(",")):
    if not item:
      continue
    expanded = {"pool": list(config.pool), "heldout": list(config.heldout),
                "all": list(config.pool) + list(config.heldout)}.get(item, [item])
    names += [n for n in expanded if n not in names]
  if not names:
    raise UserError(f"--tasks={spec!r} names no dataset (config.pool and config.heldout are "
                    "empty?); list dataset names, or pool / heldout / all.")
  ids = [data_lib.dataset_id(n) for n in names]
  if len(set(ids)) != len(ids):
    raise UserError(f"--tasks={spec!r}: two datasets share a name ({', '.join(ids)}).")
  pool = {data_lib.dataset_id(n) for n in config.pool}
  heldout = {data_lib.dataset_id(n) for n in config.heldout}
  groups = {"held-in": [i for i in ids if i in pool],
            "held-out": [i for i in ids if i in heldout],
            "other": [i for i in ids if i not in pool and i not in heldout]}
  return names, {k: v for k, v in groups.items() if v}


def task_key(task: data_lib.TaskData) -> str:
  """A short hash of a task's data (kind, labels, every split): other data, other runs."""
  h = hashlib.sha256(json.dumps([task.kind, list(task.label_names)]).encode())
  for split in sorted(task.splits):
    s = task.splits[split]
    h.update(split.encode())
    for text in s.texts:
      h.update(text.encode("utf-8", "replace") + b"\0")
    for text in s.pairs or []:
      h.update(text.encode("utf-8", "replace") + b"\0")
    h.update(s.labels.astype("<f8").tobytes())
  return h.hexdigest()[:16]


def recipe_key(recipe, mode: str) -> str:
  """A short hash of everything in a run's recipe that changes its result (not the seed)."""
  fields = {k: v for k, v in recipe.to_dict().items() if k not in _NOT_IN_RECIPE_KEY}
  text = json.dumps({"mode": mode, "recipe": fields}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Job:
  """What to evaluate: models (reference first), tasks by id, seeds, mode, eval config."""
  models: list[ModelRef]
  tasks: dict[str, data_lib.TaskData]
  eval_config: object
  seeds: int
  mode: str = "finetune"

  def __post_init__(self):
    evaluation.check_mode(self.mode)
    if self.seeds < 1:
      raise UserError(f"--seeds={self.seeds}: at least one seed is needed.")
    self.task_keys = {t: task_key(task) for t, task in self.tasks.items()}
    recipe = evaluation.recipe_for(self.eval_config, self.mode)
    self.recipe_key = recipe_key(recipe, self.mode)
    self.seed_values = [int(self.eval_config.recipe.seed) + i for i in range(self.seeds)]

  def runs(self) -> list[tuple[ModelRef, str, int]]:
    """Every (model, task, seed index), ordered so paired comparisons complete early."""
    return [(m, t, s) for t in self.tasks for s in range(self.seeds) for m in self.models]

  @staticmethod
  def key_of(record: Mapping) -> tuple:
    return run_id(record)

  def key(self, model: ModelRef, task: str, seed_index: int) -> tuple:
    return (model.sha256, task, self.task_keys[task], self.mode, self.recipe_key,
            self.seed_values[seed_index])

  def estimate_seconds(self, model: ModelRef, task: str) -> float:
    """A rough wall time for one run (training examples plus dev and test passes)."""
    recipe = evaluation.recipe_for(self.eval_config, self.mode)
    splits = self.tasks[task].splits
    steps = int(recipe.epochs * (len(splits["train"]) // max(1, recipe.batch_size)))
    if recipe.max_steps:
      steps = min(steps, recipe.max_steps)
    size = os.path.getsize(os.path.join(model.directory, "model.safetensors"))
    rate = _GUESS_EXAMPLES_PER_SECOND * _GUESS_MODEL_BYTES / max(size, 1)
    train = max(steps, 1) * recipe.batch_size / (rate * (3.0 if self.mode == "probe" else 1.0))
    evals = max(1.0, recipe.epochs)
    forward = (evals * len(splits["dev"]) + len(splits["test"])) / (4.0 * rate)
    return train + forward + 5.0


def load_tasks(config, names: Sequence[str]) -> dict[str, data_lib.TaskData]:
  """{dataset id: task}, every dataset loaded and checked before any training."""
  return {data_lib.dataset_id(n): contributor.load_task(config, n) for n in names}


def run(job: Job, results: ResultsDir, log: Callable[[str], None] = logging.info) -> list[dict]:
  """Runs the job's missing runs (appending each to ``results``); returns the job's records."""
  finished = {run_id(r): r for r in results.records(log)}
  todo, planned = [], set(finished)
  for r in job.runs():  # a model given twice (same weights) runs once
    if job.key(*r) not in planned:
      planned.add(job.key(*r))
      todo.append(r)
  total = len(job.runs())
  already = sum(job.key(*r) in finished for r in job.runs())
  guess = sum(job.estimate_seconds(m, t) for m, t, _ in todo)
  log(f"{total} runs ({len(job.models)} model(s) x {len(job.tasks)} task(s) x {job.seeds} "
      f"seed(s), mode {job.mode}); {already} already in {results.path}, "
      f"{len(todo)} to run: about {_duration(guess)} (a rough guess; refined as runs finish)")
  tokenizers = {}
  spent, estimated = 0.0, 0.0
  for i, (model, task, seed) in enumerate(todo):
    if model.sha256 not in tokenizers:
      tokenizers[model.sha256] = models.load_tokenizer(model.directory)
    start = time.time()
    result = evaluation.finetune_once(
        model.directory, tokenizers[model.sha256], job.tasks[task], job.eval_config, seed,
        job.mode, log=log, label=f"[{model.name} {task} seed {seed}] ")
    seconds = time.time() - start
    key = job.key(model, task, seed)
    record = {"model": model.sha256, "name": model.name, "task": task, "task_key": key[2],
              "mode": job.mode, "recipe_key": job.recipe_key, "seed": key[5],
              "score": float(result.test["score"]),
              "test": {k: float(v) for k, v in result.test.items()},
              "dev": {k: float(v) for k, v in (result.dev or {}).items()},
              "steps": int(result.steps), "best_step": int(result.best_step),
              "seconds": round(seconds, 1)}
    results.append(record)
    finished[run_id(record)] = record
    spent += seconds
    estimated += job.estimate_seconds(model, task)
    left = sum(job.estimate_seconds(m, t) for m, t, _ in todo[i + 1:]) * spent / estimated
    log(f"run {i + 1}/{len(todo)}: {model.name} {task} seed {seed}: score "
        f"{record['score']:.4f} ({_duration(seconds)}); about {_duration(left)} left")
  return [finished[job.key(*r)] for r in job.runs()]


def evaluate(config, bases: Sequence[str], reference: str | None = None, tasks: str = "all",
             seeds: int | None = None, mode: str = "finetune", out: str = "",
             log: Callable[[str], None] = logging.info) -> dict:
  """Evaluates ``bases`` against ``reference`` on ``tasks`` into the results directory ``out``.

  Models, tasks and the results directory are all checked before any training; runs already
  in ``out`` are reused. Writes the summary files and returns the summary.
  """
  from cold_fusion_tf.evaluation import summary as recycling_report  # pylint: disable=g-import-not-at-top
  results = ResultsDir(out)
  bases = [b.strip() for b in bases if b.strip()]
  if not bases:
    raise UserError("--base is required: STORE, STORE@N, or a Hugging Face model directory.")
  reference = reference or default_reference(bases[0])
  if not reference:
    raise UserError(f"--reference is required when --base={bases[0]} is not a store: the "
                    "original model directory (or STORE@0) to compare against.")
  refs = [resolve_model(reference, "--reference")] + [resolve_model(b) for b in bases]
  unique = []
  for model in refs:  # the same model named twice is evaluated once
    if model.name not in [u.name for u in unique]:
      unique.append(model)
  names, groups = resolve_tasks(config, tasks)
  job = Job(unique, load_tasks(config, names), config.eval,
            int(seeds if seeds is not None else config.eval.seeds), evaluation.check_mode(mode))
  records = run(job, results, log)
  summary = recycling_report.summarize(job, records, groups)
  files = recycling_report.write(results, summary)
  log("\n" + recycling_report.markdown(summary))
  log("wrote " + ", ".join(files))
  return summary
