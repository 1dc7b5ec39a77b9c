"""Model recycling (``python -m cold_fusion_tf.evaluate``): real fine-tunes of tiny encoders,
the results directory and its reuse, paired gains and standard errors, the linear probe."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import synthetic as h
from cold_fusion_tf.store import refs
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf import fusion
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.evaluation import pipeline as recycling
from cold_fusion_tf.evaluation import report
from cold_fusion_tf.evaluation import summary as summary_lib
from cold_fusion_tf.evaluation import results as results_dir
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.errors import UserError
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {"data.max_examples.train": 32, "data.max_examples.dev": 8,
             "data.max_examples.test": 16, "eval.recipe.batch_size": 8,
             "eval.recipe.max_steps": 2, "eval.recipe.max_length": 32,
             "eval.recipe.learning_rate": 1e-3}
SMALL = [f"--config.data.dirs=('{tiny.DATA}',)"] + [
    f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _demo_config():
  """configs/demo.py with SMALL applied: what the program sees."""
  config = tiny.user_demo_config()
  config.data.dirs = (tiny.DATA,)
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _program(program, *args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", f"cold_fusion_tf.{program}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  """A store with base 0 (a tiny random BERT, real tokenizer) and base 1 fused from two
  contributions (base 0 plus small noise)."""
  root = tmp_path_factory.mktemp("recycling")
  source = tiny.write_tiny_base(str(root / "source"), "bert")
  store = store_lib.Store(str(root / "store"), cache_dir=str(root / "cache"))
  store.create(source, {"source_model": source})
  base = h.base_tensors(store)
  for seed, cid in enumerate(("alice", "bob")):
    h.contribute(store, cid, h.nudged(base, seed, scale=0.002), dataset="sst2")
  fusion.fuse(store, log=lambda message: None, settings=fusion.Settings(workers=1))
  return str(root / "store"), source, tiny.demo_config(source)


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def test_program_writes_tables_and_a_later_run_extends_without_rerunning(tiny_store, tmp_path):
  store, _, _ = tiny_store
  out = str(tmp_path / "results")
  # Execute: the program, base = the store's LATEST (1), reference defaults to STORE@0.
  result = _program("evaluate", "--config=configs/demo.py", f"--base={store}",
                    "--tasks=sst2", "--seeds=1", f"--out={out}", *SMALL)
  # Assert: 2 models x 1 task x 1 seed, every run recorded with its identity.
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2 to run" in result.stdout
  first = _lines(os.path.join(out, "results.jsonl"))
  records = [json.loads(line) for line in first]
  assert len(records) == 2
  assert {(r["name"], r["seed"]) for r in records} == {(f"{store}@0", 0), (f"{store}@1", 0)}
  shas = {r["name"]: r["model"] for r in records}
  assert shas[f"{store}@1"] == weights.sha256_file(
      os.path.join(store, "bases", "000001", "model.safetensors"))
  assert all(r["mode"] == "finetune" and r["task"] == "sst2" and 0 <= r["score"] <= 1
             and r["steps"] == 2 for r in records)
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["reference"] == f"{store}@0"
  scores = {(r["name"], r["seed"]): r["score"] for r in records}
  gain = summary["gains"][f"{store}@1"]["tasks"]["sst2"]
  assert gain["mean"] == pytest.approx(scores[(f"{store}@1", 0)] - scores[(f"{store}@0", 0)])
  assert gain["n"] == 1 and gain["se"] is None  # undefined from one pair: JSON null
  assert summary["groups"] == {"held-in": ["sst2"]}  # sst2 is in demo.py's pool
  for name in ("summary.csv", "summary.md", "gains.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert f"| {store}@0 (reference) |" in open(os.path.join(out, "summary.md")).read()

  # Execute: the same evaluation with one more seed, in process (the same config, so the
  # recipe and data hashes match).
  messages = []
  summary = recycling.evaluate(_demo_config(), [store], None, "sst2", 2, "finetune", out,
                               log=messages.append)
  # Assert: only the two new (model, seed 1) runs ran; earlier lines are untouched.
  assert any("2 already in" in m and "2 to run" in m for m in messages), messages[:3]
  lines = _lines(os.path.join(out, "results.jsonl"))
  assert lines[:2] == first and len(lines) == 4
  assert {json.loads(line)["seed"] for line in lines[2:]} == {1}
  assert summary["scores"][f"{store}@0"]["tasks"]["sst2"]["n"] == 2
  assert summary["gains"][f"{store}@1"]["tasks"]["sst2"]["n"] == 2

  # Execute: inspect shows the results directory.
  shown = _program("inspect", f"--results={out}")
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert "4 finished run(s)" in shown.stdout
  assert shown.stdout.count("mode finetune") == 2 and "(2 seeds)" in shown.stdout
  assert "--- summary.md ---" in shown.stdout


def test_probe_trains_only_the_head_and_finetune_moves_the_body(tiny_store):
  _, source, config = tiny_store
  task = data_lib.load_task("sst2", [tiny.DATA],
                            max_examples={"train": 32, "dev": 8, "test": 8})
  tokenizer = models.load_tokenizer(source)
  moved = {}
  for mode in ("probe", "finetune"):
    # Prepare
    body = evaluation.load_eval_body(source, mode)
    before = [w.numpy().copy() for w in body.weights]
    recipe = evaluation.recipe_for(config.eval, mode).replace(max_steps=2)
    # Execute
    result = training.finetune(body, tokenizer, task, recipe, evaluate_test=True,
                               log=lambda message: None)
    # Assert
    moved[mode] = max(float(np.abs(a - w.numpy()).max()) for a, w in zip(before, body.weights))
    assert result.steps == 2 and 0 <= result.test["score"] <= 1
  assert moved["probe"] == 0.0
  assert moved["finetune"] > 0.0
  probe = evaluation.recipe_for(config.eval, "probe", seed_index=2)
  assert probe.learning_rate == config.eval.probe_learning_rate
  assert probe.seed == config.eval.recipe.seed + 2


def _job(tmp_path):
  task = data_lib.load_task("rte", [tiny.DATA], max_examples={"train": 8, "dev": 4,
                                                              "test": 4})
  config = tiny.demo_config("unused")
  bases = [refs.BaseRef(n, str(tmp_path), c * 64) for n, c in (("orig", "a"), ("fused", "b"))]
  return recycling.Job(bases, {"t1": task, "t2": task}, config.eval, seeds=3)


def _record(job, model, task, seed, score):
  return {"model": model.sha256, "name": model.name, "task": task,
          "task_key": job.task_keys[task], "mode": job.mode, "recipe_key": job.recipe_key,
          "seed": job.seed_values[seed], "score": score}


def test_gains_are_paired_by_seed_with_standard_errors(tmp_path):
  # Prepare: reference and fused scores per (task, seed); fused is missing t2's seed 2.
  job = _job(tmp_path)
  ref, fused = job.models
  table = {("t1", 0): (0.70, 0.75), ("t1", 1): (0.60, 0.68), ("t1", 2): (0.80, 0.81),
           ("t2", 0): (0.50, 0.49), ("t2", 1): (0.55, 0.60)}
  records = [_record(job, ref, "t2", 2, 0.9)]
  for (task, seed), (a, b) in table.items():
    records += [_record(job, ref, task, seed, a), _record(job, fused, task, seed, b)]
  # Execute
  summary = summary_lib.summarize(job, records, {"held-in": ["t1"], "held-out": ["t2"]})
  # Assert
  gains = summary["gains"]["fused"]
  d1, d2 = np.array([0.05, 0.08, 0.01]), np.array([-0.01, 0.05])
  assert gains["tasks"]["t1"]["mean"] == pytest.approx(d1.mean())
  assert gains["tasks"]["t1"]["se"] == pytest.approx(d1.std(ddof=1) / math.sqrt(3))
  assert gains["tasks"]["t2"]["n"] == 2  # seed 2 has no pair
  both = gains["groups"]["all tasks"]
  assert both["mean"] == pytest.approx((d1.mean() + d2.mean()) / 2)  # unweighted over tasks
  per_seed = [(0.05 - 0.01) / 2, (0.08 + 0.05) / 2]  # the seeds both tasks have
  assert both["se_seeds"] == pytest.approx(np.std(per_seed, ddof=1) / math.sqrt(2))
  assert both["se_tasks"] == pytest.approx(abs(d1.mean() - d2.mean()) / 2)
  assert both["n_seeds"] == 2 and both["losses"] == []
  assert gains["groups"]["held-out"]["mean"] == pytest.approx(0.02)
  orig = summary["scores"]["orig"]["tasks"]["t2"]
  assert orig["mean"] == pytest.approx(np.mean([0.5, 0.55, 0.9])) and orig["n"] == 3
  assert summary["scores"]["orig"]["groups"]["all tasks"] == pytest.approx(
      (0.7 + np.mean([0.5, 0.55, 0.9])) / 2)
  text = report.markdown(summary)
  assert "| orig (reference) | 70.0 | - | 65.0 | - | 70.0 ± 10.0 | 65.0 ± 21.8 |" in text
  assert f"| all tasks | 2 | +{100 * both['mean']:.2f} |" in text
  rows = report.to_csv(summary).splitlines()
  assert rows[0].startswith("model,task,mean,std,n,gain") and len(rows) == 1 + 2 * (2 + 3)


def test_tasks_the_reference_does_not_learn_are_flagged_against_one_constant_answer(tmp_path):
  # Prepare: t1 and t2 have test labels 0, 0, 0, 1 (always answering 0 scores 0.75); the
  # reference scores 0.75-0.78 on t1 (not learned) and 0.9-0.95 on t2; t3 is regression.
  import dataclasses  # pylint: disable=g-import-not-at-top
  job = _job(tmp_path)
  task = job.tasks["t1"]
  test = dataclasses.replace(task.splits["test"], labels=np.array([0, 0, 0, 1], np.int32))
  skewed = dataclasses.replace(task, splits={**task.splits, "test": test})
  scores = dataclasses.replace(test, labels=np.array([0.5, 1.0, 2.0, 4.0], np.float32))
  regression = dataclasses.replace(task, kind="regression", label_names=[],
                                   splits={**task.splits, "test": scores})
  job = recycling.Job(job.models, {"t1": skewed, "t2": skewed, "t3": regression},
                      job.eval_config, seeds=3)
  ref, fused = job.models
  table = {"t1": ((0.75, 0.78, 0.76), (0.9, 0.9, 0.9)), "t2": ((0.9, 0.95, 0.92), (0.9,) * 3),
           "t3": ((0.4, 0.5, 0.45), (0.5,) * 3)}
  records = [_record(job, model, task, seed, values[seed])
             for task, pair in table.items() for model, values in zip((ref, fused), pair)
             for seed in range(3)]
  # Execute
  summary = summary_lib.summarize(job, records, {"held-out": ["t1", "t2", "t3"]})
  text = report.markdown(summary)
  rows = report.to_csv(summary).splitlines()
  # Assert
  assert summary["constant"] == {"t1": 0.75, "t2": 0.75, "t3": 0.0}
  assert summary["not_learned"] == ["t1"]
  assert "| t1 | held-out | 76.3 | 90.0 | +13.67 ± 0.88 | +15.5 | 3 | not learned |" in text
  assert "| (one constant answer) | - | - | 75.0 | 75.0 | 0.0 |" in text
  assert "Not learned by orig in these fine-tunes: t1 (76.3 against 75.0)" in text
  assert "eval.recipe.epochs" in text
  assert summary["gains"]["fused"]["groups"]["held-out"]["n_tasks"] == 3  # kept in the mean
  assert rows[1].startswith("orig,t1,") and rows[1].endswith(",not-learned,0.75")
  assert rows[2].startswith("orig,t2,") and rows[2].endswith(",,0.75")


def test_results_file_skips_damaged_lines_and_duplicates(tmp_path):
  # Prepare
  job = _job(tmp_path)
  ref = job.models[0]
  results = results_dir.ResultsDir(str(tmp_path / "out"))
  good = _record(job, ref, "t1", 0, 0.5)
  # Execute: a record, the same run again, then damaged lines
  results.append(good)
  results.append({**good, "score": 0.9})  # the same run again: the first one counts
  with open(results.file("results.jsonl"), "a") as f:
    f.write('{"model": "x", "seed": 1, "score": NaN}\n{"truncat')
  # Execute / Assert: a NaN score is refused
  with pytest.raises(ValueError):
    results.append({**good, "score": float("nan")})
  # Assert
  notes = []
  assert results.records(notes.append) == [good]
  assert "skipped 2 unreadable line(s)" in notes[0]
  # Execute / Assert: inspect --results says so too
  shown = results_dir.describe(results).splitlines()
  assert "1 finished run(s)" in shown[0] and "skipped 2 unreadable line(s)" in shown[1]
  # Execute / Assert: a remote location is refused
  with pytest.raises(UserError, match="results go to a local directory"):
    results_dir.ResultsDir("gs://bucket/results")


def test_a_results_directory_that_cannot_be_written_is_one_user_error(tmp_path):
  # Prepare
  job = _job(tmp_path)
  good = _record(job, job.models[0], "t1", 0, 0.5)
  (tmp_path / "file").write_text("a regular file\n")
  # Execute / Assert: found up front, nothing left behind
  with pytest.raises(UserError, match=r"^--out=/proc/nope/r: cannot create files there \(No "
                     r"such file or directory: /proc/nope\)"):
    results_dir.ResultsDir("/proc/nope/r").check_writable()
  with pytest.raises(UserError, match=r"cannot create files there \(Not a directory"):
    results_dir.ResultsDir(str(tmp_path / "file" / "r")).check_writable()
  results_dir.ResultsDir(str(tmp_path / "new" / "r")).check_writable()
  assert not os.path.exists(tmp_path / "new")
  # Execute / Assert: writes the system refuses (results.jsonl, a summary, are folders)
  results = results_dir.ResultsDir(str(tmp_path / "out"))
  os.makedirs(results.file("results.jsonl"))
  os.makedirs(results.file("summary.md"))
  with pytest.raises(UserError, match=r"results.jsonl: cannot write it \(Is a directory"):
    results.append(good)
  with pytest.raises(UserError, match=r"summary.md: cannot write it \(Is a directory"):
    results.write_text("summary.md", "# summary\n")
  assert sorted(os.listdir(results.path)) == ["results.jsonl", "summary.md"]


@pytest.mark.parametrize("base,fragment", [
    ("{tmp}/store@abc", "--base={tmp}/store@abc: 'abc' is not a base number; STORE@N takes N, "
     "a whole number from 0 to 999999"),
    ("{tmp}/store@-1", "--base={tmp}/store@-1: '-1' is not a base number"),
    ("{tmp}/store@1234567", "'1234567' is not a base number"),
    ("{tmp}/store@\u0663", "'\u0663' is not a base number"),  # an Arabic-Indic 3
    ("{tmp}/store@0@1", "--base={tmp}/store@0@1: more than one @N"),
    ("{tmp}/nothere", "--base={tmp}/nothere: {tmp}/nothere does not exist (expected a store "
     "or a model directory)"),
    ("{tmp}/file", "--base={tmp}/file: {tmp}/file is a file (expected a store or a model "
     "directory)"),
    ("{tmp}/file@3", "--base={tmp}/file@3: {tmp}/file is a file"),
])
def test_a_bad_base_is_named_before_a_reference_is_asked_for(base, fragment, tmp_path):
  # Prepare: a store's folder (its contents are read only later) and a file
  (tmp_path / "store").mkdir()
  (tmp_path / "file").write_text("a regular file\n")
  base, fragment = base.format(tmp=tmp_path), fragment.format(tmp=tmp_path)
  # Execute
  with pytest.raises(UserError) as raised:
    recycling.evaluate(_demo_config(), [base], out=str(tmp_path / "out"), log=lambda _: None)
  # Assert
  assert fragment in str(raised.value) and "--reference" not in str(raised.value)
  assert not os.path.exists(tmp_path / "out")
  # Execute / Assert: the same mistake in --reference
  with pytest.raises(UserError) as raised:
    recycling.evaluate(_demo_config(), [str(tmp_path / "store")], base,
                       out=str(tmp_path / "out"), log=lambda _: None)
  assert fragment.replace("--base=", "--reference=") in str(raised.value)


def test_model_references_resolve_or_fail_clearly(tiny_store, tmp_path):
  # Prepare
  store, source, _ = tiny_store
  # Execute
  latest = refs.resolve(store)
  # Assert
  assert latest.name == f"{store}@1" and os.path.isfile(os.path.join(latest.directory,
                                                                      "config.json"))
  # Execute / Assert: other references, and ones that fail
  assert refs.resolve(f"{store}@0").sha256 == weights.sha256_file(
      os.path.join(store, "bases", "000000", "model.safetensors"))
  assert refs.resolve(source).sha256 == weights.sha256_file(
      os.path.join(source, "model.safetensors"))
  assert refs.default_reference(f"{store}@1") == f"{store}@0"
  assert refs.default_reference(source) is None
  with pytest.raises(UserError, match=r"holds bases 0\.\.1"):
    refs.resolve(f"{store}@7")
  with pytest.raises(UserError, match="is a model directory, not a store"):
    refs.resolve(f"{source}@1")
  with pytest.raises(UserError, match="neither a ColD Fusion store"):
    refs.resolve(str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    refs.resolve(str(tmp_path / "nope"), what="--reference")


def test_program_errors_are_one_line_before_any_training(tiny_store, tmp_path):
  # Prepare
  _, source, _ = tiny_store
  # Execute
  result = _program("evaluate", "--config=configs/demo.py", f"--base={source}",
                    f"--out={tmp_path / 'out'}", *SMALL)
  # Assert
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "--reference is required" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "out")


def test_the_loop_keeps_every_run_of_a_base_in_its_evaluation_file(tiny_store):
  # Prepare: runs of base 1 with an older recipe (r0), then two seeds of the current one (r1).
  store = store_lib.Store(tiny_store[0])
  runs = recycling.StoreRuns(store, 1, ["sst2"])
  run = {"model": store.base_sha256(1), "name": "base 1", "task": "sst2", "task_key": "k",
         "mode": "finetune", "recipe_key": "r0", "seed": 0, "score": 0.1}
  # Execute
  for record in (run, {**run, "recipe_key": "r1", "seed": 1, "score": 0.8},
                 {**run, "recipe_key": "r1", "seed": 0, "score": 0.6}):
    runs.append(record)
  reread = recycling.StoreRuns(store, 1, ["sst2"])
  saved = json.load(open(os.path.join(tiny_store[0], "evaluations", "000001.json")))
  # Assert: every run is kept; the scores summarise the newest recipe's runs in seed order.
  assert len(reread.records()) == 3 and reread.records()[0] == run
  assert saved["base_sha256"] == store.base_sha256(1) and saved["contributors"] == ["sst2"]
  assert saved["scores"]["sst2"]["scores"] == [0.6, 0.8]
  assert saved["scores"]["sst2"]["score"] == pytest.approx(0.7)
  assert saved["scores"]["sst2"]["std"] == pytest.approx(0.1 * math.sqrt(2))
  # A damaged file is refused with what to do, before any run.
  store.write_json("evaluations/000001.json", {**saved, "runs": [{**run, "score": "high"}]})
  with pytest.raises(UserError, match="run 0 is malformed; delete the file"):
    recycling.StoreRuns(store, 1, [])
  os.remove(os.path.join(tiny_store[0], "evaluations", "000001.json"))


def test_evaluation_fine_tunes_train_on_a_seeded_sample_of_at_most_max_train_examples():
  # Prepare
  config = tiny.demo_config("unused")
  task = data_lib.load_task("sst2", [tiny.DATA])
  # Execute
  config.eval.max_train_examples = 10
  capped = recycling.eval_task(config, task)
  again = recycling.eval_task(config, task)
  config.eval.max_train_examples = 0
  whole = recycling.eval_task(config, task)
  # Assert: a sample of the training split only, the same each time, with its own data key.
  assert len(capped.splits["train"]) == 10 and capped.splits["train"].texts == again.splits[
      "train"].texts
  assert set(capped.splits["train"].texts) <= set(task.splits["train"].texts)
  assert len(capped.splits["test"]) == len(task.splits["test"])
  assert len(whole.splits["train"]) == len(task.splits["train"])
  assert recycling.task_key(capped) != recycling.task_key(whole)
  config.eval.max_train_examples = -1
  with pytest.raises(UserError, match="max_train_examples=-1"):
    recycling.eval_task(config, task)


def test_task_lists_expand_pool_prefixes_and_reject_bad_counts():
  # Prepare
  config = _demo_config()
  # Execute
  names, groups = recycling.resolve_tasks(config, "pool:1,heldout")
  all_names, _ = recycling.resolve_tasks(config, "pool:4,pool,rte")
  # Assert
  assert names == [config.pool[0], *config.heldout]
  assert groups == {"held-in": [config.pool[0]], "held-out": list(config.heldout)}
  assert all_names == list(config.pool)
  for bad in ("pool:0", "pool:5", "pool:x", "pool:-1", "pool:١"):
    with pytest.raises(UserError, match=r"pool:N is its first N tasks"):
      recycling.resolve_tasks(config, f"{bad},heldout")


def test_a_recipe_key_changes_with_a_probe_phase_only_when_there_is_one():
  # Prepare
  from cold_fusion_tf.training.recipe import Recipe  # pylint: disable=g-import-not-at-top
  # Execute
  plain = recycling.recipe_key(Recipe(), "finetune")
  unused = recycling.recipe_key(Recipe(probe_learning_rate=5e-3), "finetune")
  probed = recycling.recipe_key(Recipe(probe_epochs=1.0), "finetune")
  faster = recycling.recipe_key(Recipe(probe_epochs=1.0, probe_learning_rate=5e-3), "finetune")
  # Assert: the runs of recipes without a probe phase keep their keys
  assert plain == unused
  assert len({plain, probed, faster}) == 3


def test_a_dataset_both_held_in_and_held_out_is_refused():
  # Prepare: the pool's first dataset also held out, named by its folder
  config = _demo_config()
  config.heldout = (*config.heldout, os.path.join(tiny.DATA, config.pool[0]))
  # Execute / Assert: its runs would count in both groups
  with pytest.raises(UserError, match=rf"dataset\(s\) {config.pool[0]} both in config.pool and "
                                      "in config.heldout"):
    recycling.resolve_tasks(config, "heldout")
