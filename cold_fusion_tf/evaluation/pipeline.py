"""Model recycling, the one pipeline of the evaluate program and the loop: which models,
which tasks, the runs and where they are kept.

A run is identified by (model weights, task, task data, mode, recipe, seed): an evaluation
with the same base weights, data and recipe reuses it, so asking for more seeds, more tasks
or more bases only runs what is missing, and an interrupted evaluation resumes. Runs are kept
in a local results directory (:class:`~cold_fusion_tf.evaluation.results.ResultsDir`, the
evaluate program) or in the store's ``evaluations/<i>.json`` (:class:`StoreRuns`, the loop).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Mapping, Sequence

from absl import logging

from cold_fusion_tf.training import contributor
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf.evaluation import report
from cold_fusion_tf.evaluation import summary as summary_lib
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.evaluation.results import ResultsDir, run_id
from cold_fusion_tf.store import refs
from cold_fusion_tf.store import layout
from cold_fusion_tf.training.trainer import duration_text as _duration
from cold_fusion_tf.errors import UserError

NOT_COMPUTING = ("log_every_seconds", "log_every_steps", "checkpoint_every_steps",
                 "eval_batch_size")
"""Recipe fields that do not change what a fine-tune computes."""
# A run's seed is part of its key apart from the recipe.
_NOT_IN_RECIPE_KEY = ("seed",) + NOT_COMPUTING
# Rough training speed of a MiniLM-L6-sized model (90 MB of float32 weights) on 2 CPU cores,
# used for the first time estimate only; later estimates use the measured run times.
_GUESS_EXAMPLES_PER_SECOND = 30.0
_GUESS_MODEL_BYTES = 90e6


def resolve_tasks(config, spec: str) -> tuple[list[str], dict[str, list[str]]]:
  """Dataset references from ``--tasks`` (names; ``pool``, ``pool:N`` for the pool's first N,
  ``heldout`` or ``all`` from the config) and their groups by dataset id: held-in
  (config.pool), held-out, other."""
  pool = {data_lib.dataset_id(n) for n in config.pool}
  heldout = {data_lib.dataset_id(n) for n in config.heldout}
  if pool & heldout:
    raise UserError(f"dataset(s) {', '.join(sorted(pool & heldout))} both in config.pool and in "
                    "config.heldout: a task is either trained on (held-in) or held out; remove "
                    "it from one of them.")
  names: list[str] = []
  for item in (s.strip() for s in (spec or "all").split(",")):
    if not item:
      continue
    expanded = {"pool": list(config.pool), "heldout": list(config.heldout),
                "all": list(config.pool) + list(config.heldout)}.get(item, [item])
    if item.startswith("pool:"):
      count = item[len("pool:"):]
      if not (count.isascii() and count.isdigit() and 0 < int(count) <= len(config.pool)):
        raise UserError(f"--tasks={spec!r}: {item!r} needs a whole number from 1 to "
                        f"{len(config.pool)} (the pool's size): pool:N is its first N tasks.")
      expanded = list(config.pool)[:int(count)]
    names += [n for n in expanded if n not in names]
  if not names:
    raise UserError(f"--tasks={spec!r} names no dataset (config.pool and config.heldout are "
                    "empty?); list dataset names, or pool / heldout / all.")
  ids = [data_lib.dataset_id(n) for n in names]
  if len(set(ids)) != len(ids):
    raise UserError(f"--tasks={spec!r}: two datasets share a name ({', '.join(ids)}).")
  groups = {"held-in": [i for i in ids if i in pool],
            "held-out": [i for i in ids if i in heldout],
            "other": [i for i in ids if i not in pool and i not in heldout]}
  return names, {k: v for k, v in groups.items() if v}


def task_key(task: data_lib.TaskData) -> str:
  """A short hash of a task's data (kind, labels, every split): other data, other runs.
  Regression tasks carry a mark, so runs made before their scores were standardized for
  training (:func:`~cold_fusion_tf.training.inputs.training_targets`) are not reused."""
  spec = [task.kind, list(task.label_names)]
  if task.kind == "regression":
    spec.append("standardized targets")
  h = hashlib.sha256(json.dumps(spec).encode())
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
  if not fields.get("probe_epochs"):  # no probe phase: the key of a recipe without one
    fields.pop("probe_epochs", None)
    fields.pop("probe_learning_rate", None)
  text = json.dumps({"mode": mode, "recipe": fields}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Job:
  """What to evaluate: models (reference first), tasks by id, seeds, mode, eval config
  (``task_keys``: the tasks' :func:`task_key`, computed when not given)."""
  models: list[refs.BaseRef]
  tasks: dict[str, data_lib.TaskData]
  eval_config: object
  seeds: int
  mode: str = "finetune"
  task_keys: dict[str, str] | None = None

  def __post_init__(self):
    evaluation.check_mode(self.mode)
    if self.seeds < 1:
      raise UserError(f"--seeds={self.seeds}: at least one seed is needed.")
    if self.task_keys is None:
      self.task_keys = {t: task_key(task) for t, task in self.tasks.items()}
    recipe = evaluation.recipe_for(self.eval_config, self.mode)
    self.recipe_key = recipe_key(recipe, self.mode)
    self.seed_values = [int(self.eval_config.recipe.seed) + i for i in range(self.seeds)]

  def runs(self) -> list[tuple[refs.BaseRef, str, int]]:
    """Every (model, task, seed index), ordered so paired comparisons complete early."""
    return [(m, t, s) for t in self.tasks for s in range(self.seeds) for m in self.models]

  @staticmethod
  def key_of(record: Mapping) -> tuple:
    return run_id(record)

  def key(self, model: refs.BaseRef, task: str, seed_index: int) -> tuple:
    return (model.sha256, task, self.task_keys[task], self.mode, self.recipe_key,
            self.seed_values[seed_index])

  def estimate_seconds(self, model: refs.BaseRef, task: str) -> float:
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
  """{dataset id: task} for evaluation (:func:`eval_task`), every dataset loaded and checked
  before any training."""
  return {data_lib.dataset_id(n): eval_task(config, contributor.load_task(config, n))
          for n in names}


def eval_task(config, task: data_lib.TaskData) -> data_lib.TaskData:
  """``task`` with its training split cut to ``config.eval.max_train_examples`` (0: all), a
  seeded random sample: the evaluation fine-tunes' data."""
  cap = int(config.eval.max_train_examples)
  if cap < 0:
    raise UserError(f"config.eval.max_train_examples={cap}: expected 0 (all) or more.")
  train = data_lib.sample_split(task.splits["train"], cap, "eval/train")
  return dataclasses.replace(task, splits={**task.splits, "train": train})


class StoreRuns:
  """The runs of one base kept in the store's ``evaluations/<i>.json`` (built and checked by
  :mod:`cold_fusion_tf.store.layout`): the loop's counterpart of a results directory."""

  def __init__(self, store, iteration: int, contributors: Sequence[str]):
    self.store, self.iteration, self.contributors = store, iteration, list(contributors)
    self.name = layout.evaluation_name(iteration)
    self.path = f"{store.uri}/{self.name}"
    saved = store.read_json(self.name)
    self.runs = [] if saved is None else layout.check_evaluation(saved, self.path)["runs"]

  def records(self, log: Callable[[str], None] = lambda message: None) -> list[dict]:
    del log
    return list(self.runs)

  def append(self, record: dict) -> None:
    """Adds one finished run and rewrites the file (a crash loses at most that run)."""
    self.runs.append(record)
    self.store.write_json(self.name, layout.evaluation_document(
        self.iteration, self.store.base_sha256(self.iteration), self.contributors, self.runs))


def run(job: Job, results, log: Callable[[str], None] = logging.info) -> list[dict]:
  """Runs the job's missing runs, appending each to ``results`` (a :class:`ResultsDir` or
  :class:`StoreRuns`); returns the job's records."""
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

  Models, tasks and the results directory are all checked before any training (the results
  directory by creating a file in it); runs already in ``out`` are reused. Writes the summary
  files and returns the summary.
  """
  results = ResultsDir(out)
  results.check_writable()
  bases = [b.strip() for b in bases if b.strip()]
  if not bases:
    raise UserError("--base is required: STORE, STORE@N, or a Hugging Face model directory.")
  for base in bases:  # what is wrong with a --base, before asking for a --reference
    refs.check(base)
  if reference:
    refs.check(reference, what="--reference")
  reference = reference or refs.default_reference(bases[0])
  if not reference:
    raise UserError(f"--reference is required when --base={bases[0]} is not a store: the "
                    "original model directory (or STORE@0) to compare against.")
  resolved = [refs.resolve(reference, what="--reference")] + [refs.resolve(b) for b in bases]
  unique = []
  for model in resolved:  # the same model named twice is evaluated once
    if model.name not in [u.name for u in unique]:
      unique.append(model)
  names, groups = resolve_tasks(config, tasks)
  job = Job(unique, load_tasks(config, names), config.eval,
            int(seeds if seeds is not None else config.eval.seeds), evaluation.check_mode(mode))
  records = run(job, results, log)
  summary = summary_lib.summarize(job, records, groups)
  files = report.write(results, summary)
  log("\n" + report.markdown(summary))
  log("wrote " + ", ".join(files))
  return summary
