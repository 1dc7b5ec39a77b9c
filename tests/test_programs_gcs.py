"""The programs against a gs:// store on fake-gcs-server, run as a user runs them (subprocesses).

A tiny random BERT (tests/tiny.py: hidden size 32) and a 40/16/16-example slice of SST-2 keep
each TensorFlow program to a few seconds: init, train, fuse and evaluate in turn; run for one
iteration; two fusers racing for the same iteration; a contribution changed in the bucket after
upload (and the lineage inspect shows for it); a missing bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import safetensors.numpy

from cold_fusion_tf import store as store_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")
SST2 = os.path.join(REPO_ROOT, "cold_fusion_tf", "data", "demo", "sst2")
SMALL = ["--config.recipe.batch_size=8", "--config.recipe.max_length=32",
         "--config.recipe.max_steps=4", "--config.data.max_examples.train=40",
         "--config.data.max_examples.dev=16", "--config.data.max_examples.test=16"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """{"base": a tiny random BERT base directory, "task": a 40/16/16-example dataset folder}."""
  import tiny  # pylint: disable=g-import-not-at-top  (tests/tiny.py)
  root = tmp_path_factory.mktemp("tiny")
  task = root / "tinytask"
  task.mkdir()
  for split, n in (("train", 40), ("dev", 16), ("test", 16)):
    with open(os.path.join(SST2, f"{split}.jsonl"), encoding="utf-8") as f:
      lines = f.read().splitlines()[:n]
    (task / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return {"base": tiny.write_tiny_base(str(root / "base0")), "task": str(task)}


@pytest.fixture
def gcs_uri(gcs_emulator, gcs_test_bucket):
  del gcs_emulator  # STORAGE_EMULATOR_HOST is set for this process and its children.
  return f"gs://{gcs_test_bucket}/p-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def env(tmp_path, gcs_emulator, monkeypatch):
  """The environment of every program: the emulator, a private base cache, no network."""
  del gcs_emulator
  monkeypatch.setenv("COLD_FUSION_CACHE", str(tmp_path / "cache"))  # Also for this process.
  e = dict(os.environ)
  e.update({"COLD_FUSION_GCS_RETRY_DEADLINE": "20",
            "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
  return e


def program(env, name, *args, config=DEMO_CONFIG, timeout=180):
  """Runs ``python -m cold_fusion_tf.<name> --config=... args``; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", f"cold_fusion_tf.{name}", f"--config={config}",
                         *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
  return proc.stdout


def _store_with_contributions(uri, tiny_run, ids, tmp_path):
  """A store with base 0 = the tiny base and one perturbed body per id (no training)."""
  store = store_lib.Store(uri, cache_dir=str(tmp_path / "setup-cache"))
  store.create(tiny_run["base"], {"source_model": "tiny"})
  base = safetensors.numpy.load_file(os.path.join(tiny_run["base"], store_lib.MODEL))
  for i, cid in enumerate(ids):
    rng = np.random.default_rng(i)
    # A fine-tune's size of change: the tiny base's weights have a standard deviation of 0.02.
    body = {k: (v + 0.001 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
    path = str(tmp_path / f"{cid}.safetensors")
    safetensors.numpy.save_file(body, path)
    store.put_contribution(0, cid, path, {
        "base_sha256": store.base_sha256(0), "dataset": "tinytask", "num_examples": 40 + i,
        "steps": 4, "dev_metrics": {"score": 0.5}})
  return store


def test_init_train_fuse_evaluate_on_gcs(tiny_run, gcs_uri, env, tmp_path):
  # Prepare
  store_flag = f"--store={gcs_uri}"
  # Execute: init
  out = ok(program(env, "init", store_flag, f"--config.model.source={tiny_run['base']}"))
  # Assert
  assert f"store {gcs_uri}: LATEST = 0" in out
  store = store_lib.Store(gcs_uri)  # The same base cache as the programs.
  assert store.storage.read_bytes("LATEST") == b"0\n"
  assert store.run_info()["source_model"] == tiny_run["base"]

  # Execute: train
  ok(program(env, "train", store_flag, f"--config.task={tiny_run['task']}",
             "--config.contributor_id=alice", *SMALL))
  # Assert
  (alice,), rejected = store.contributions(0)
  assert rejected == [] and alice.contributor_id == "alice"
  assert alice.meta["base_sha256"] == store.base_sha256(0)
  assert alice.meta["num_examples"] == 40 and alice.meta["steps"] == 4
  # The contributor read base 0 through the local cache.
  cached = os.path.join(store.cache_dir, "bases", "000000")
  assert store.cache_dir.startswith(env["COLD_FUSION_CACHE"])
  assert set(os.listdir(cached)) == set(store.manifest(0)["files"])

  # Execute: fuse
  out = ok(program(env, "fuse", store_flag))
  # Assert
  assert "published base 1" in out
  assert store.storage.read_bytes("LATEST") == b"1\n"
  manifest = store.manifest(1)
  assert manifest["parent"] == {"iteration": 0, "sha256": store.base_sha256(0)}
  assert [c["id"] for c in manifest["fusion"]["contributions"]] == ["alice"]
  assert manifest["fusion"]["rejected"] == []
  store.base_dir(1)  # Every file of base 1 matches its manifest.

  # Execute: fuse again
  # Nothing has contributed to base 1 yet: the fuser publishes nothing and says so.
  proc = program(env, "fuse", store_flag)
  # Assert
  assert proc.returncode == 1, proc.stderr
  assert "0 valid contribution(s)" in proc.stdout
  assert store.latest() == 1

  # Execute: evaluate
  # Model recycling of the gs:// store's LATEST base against its base 0 (one seed, 2 steps).
  out_dir = tmp_path / "eval"
  ok(program(env, "evaluate", store_flag, f"--tasks={tiny_run['task']}", "--seeds=1",
             f"--out={out_dir}", "--config.eval.recipe.batch_size=8",
             "--config.eval.recipe.max_length=32", "--config.eval.recipe.max_steps=2",
             *SMALL[3:]))
  # Assert
  summary = (out_dir / "summary.json").read_text(encoding="utf-8")
  assert f"{gcs_uri}@1" in summary and f"{gcs_uri}@0" in summary


def test_run_one_iteration_on_gcs(tiny_run, gcs_uri, env, tmp_path):
  # Prepare
  config = tmp_path / "tiny_run.py"
  config.write_text(textwrap.dedent(f"""
      from cold_fusion_tf.configs import defaults
      def get_config():
        c = defaults.get_config()
        c.model.source = {tiny_run['base']!r}
        c.pool = [{tiny_run['task']!r}]
        c.heldout = []
        c.iterations = 1
        c.contributors_per_iteration = 1
        c.eval.enabled = False
        return c
  """), encoding="utf-8")
  # Execute
  out = ok(program(env, "run", f"--store={gcs_uri}", *SMALL, config=str(config)))
  # Assert
  assert "published base 1" in out
  store = store_lib.Store(gcs_uri)
  assert store.latest() == 1
  assert [c["id"] for c in store.manifest(1)["fusion"]["contributions"]] == ["tinytask"]
  assert gcs_uri in store.storage.read_bytes("report.md").decode()
  assert store.storage.exists("report.png") and store.storage.exists("report.csv")


# Runs the real fuse program, holding it just before it publishes until the other fuser
# has got as far: both then race with the same view of LATEST.
_BARRIER_FUSE = textwrap.dedent("""
    import os, runpy, sys, time
    barrier, args = sys.argv[1], sys.argv[2:]
    from cold_fusion_tf import store as store_lib
    publish = store_lib.Store.publish_base
    def publish_after_barrier(self, *a, **k):
      open(os.path.join(barrier, str(os.getpid())), "w").close()
      deadline = time.monotonic() + 60
      while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      return publish(self, *a, **k)
    store_lib.Store.publish_base = publish_after_barrier
    sys.argv = ["fuse"] + args
    runpy.run_module("cold_fusion_tf.fuse", run_name="__main__")
""")


def test_two_fusers_race_on_gcs(tiny_run, gcs_uri, env, tmp_path):
  # Prepare: a store with two contributions
  store = _store_with_contributions(gcs_uri, tiny_run, ["alice", "bob"], tmp_path)
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  # Execute: two fusers at once
  # Both share one base cache, as two fusers on one machine would.
  procs = [subprocess.Popen(
      [sys.executable, "-c", _BARRIER_FUSE, str(barrier), f"--config={DEMO_CONFIG}",
       f"--store={gcs_uri}"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)
      results.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  # Assert
  assert len(os.listdir(barrier)) == 2  # Both reached the publish step.
  for code, out, err in results:
    assert code == 0, f"{out}\n{err[-3000:]}"
    assert "Traceback" not in err
  winners = [out for _, out, _ in results if "published base 1:" in out]
  losers = [out for _, out, _ in results if "was published by another fuser" in out]
  assert len(winners) == 1 and len(losers) == 1, results
  assert store.latest() == 1
  manifest = store.manifest(1)
  assert [c["id"] for c in manifest["fusion"]["contributions"]] == ["alice", "bob"]
  store_lib.Store(gcs_uri, cache_dir=str(tmp_path / "check")).base_dir(1)  # Intact.


def test_fuse_rejects_body_changed_in_bucket(tiny_run, gcs_uri, env, tmp_path):
  # Prepare
  store = _store_with_contributions(gcs_uri, tiny_run, ["alice", "bob"], tmp_path)
  # Someone rewrites bob's body in the bucket after upload: same size, valid safetensors,
  # other values. Only the sha256 in contribution.json can tell.
  name = "contributions/000000/bob/body.safetensors"
  path = str(tmp_path / "bob-downloaded.safetensors")
  store.storage.download(name, path)
  tensors = safetensors.numpy.load_file(path)
  tensors = {k: (v * 0.5).astype(v.dtype) for k, v in tensors.items()}
  safetensors.numpy.save_file(tensors, path)
  assert os.path.getsize(path) == store.contributions(0)[0][1].meta["body_size"]
  store.storage.upload(path, name)

  # Execute
  proc = program(env, "fuse", f"--store={gcs_uri}", "--config.fusion.min_contributions=2")
  # Assert
  assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr[-3000:]}"
  assert "rejected bob" in proc.stdout and "sha256" in proc.stdout
  assert "1 valid contribution(s), fewer than the 2 required; nothing published" in proc.stdout
  assert store.latest() == 0 and not store.storage.exists("bases/000001")

  # Execute: fuse again, with the default minimum
  out = ok(program(env, "fuse", f"--store={gcs_uri}"))
  # Assert
  assert "published base 1" in out
  fusion = store.manifest(1)["fusion"]
  assert [c["id"] for c in fusion["contributions"]] == ["alice"]
  assert [r["id"] for r in fusion["rejected"]] == ["bob"]
  assert "sha256" in fusion["rejected"][0]["reason"]

  # Execute: inspect
  # The lineage of the gs:// store, as the inspect program shows it.
  lineage = json.loads(ok(program(env, "inspect", f"--store={gcs_uri}", "--json")))
  # Assert
  assert lineage["uri"] == gcs_uri and lineage["latest"] == 1
  assert [b["problems"] for b in lineage["bases"]] == [[], []]
  assert [e["id"] for e in lineage["bases"][1]["fused"]] == ["alice"]
  assert [r["id"] for r in lineage["bases"][1]["rejected"]] == ["bob"]
  # Execute
  text = ok(program(env, "inspect", f"--store={gcs_uri}"))
  # Assert
  assert f"store {gcs_uri}:" in text and "LATEST = 1" in text and "sha256" in text


def test_missing_bucket_is_one_clear_error(env):
  # Prepare
  bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
  # Execute
  proc = program(env, "fuse", f"--store=gs://{bucket}/run")
  # Assert
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert f"Bucket '{bucket}' does not exist" in errors[0]
  assert f"gcloud storage buckets create gs://{bucket}" in errors[0]
