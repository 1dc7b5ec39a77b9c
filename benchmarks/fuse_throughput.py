"""Fusion throughput and memory: this package's fuser against the limit of any fusion job, reading
the bytes, and the naive way.

  python benchmarks/fuse_throughput.py                      # the README's figures
  python benchmarks/fuse_throughput.py --quick              # a small model only, N = 2, 8

Builds local stores of random float32 bodies with the real tensor names and shapes
(roberta-base: 476 MiB per body; a MiniLM-L6-sized model for N = 2, 8, 32), warms the page
cache, then for each case measures (the fusions each in a fresh process):

- limit: what any fusion job must do, and the measure of the fuser: sha256 of every byte of
  the N bodies with ``hashlib`` on a thread pool of one thread per CPU (the bodies shared out
  over the threads, read in 4 MiB chunks; hashlib releases the GIL), plus the sha256 of one
  output-sized file (the new base, hashed once); cross-checked with ``sha256sum`` processes,
  the bodies split over the CPUs (the best of 3 each; coreutils' sha256sum may not use the
  CPU's SHA instructions, which hashlib's OpenSSL does: then it is the slower);
- floor: the least a job that averages the bodies can do, on the same threads: every body
  read once, each chunk hashed and its float32 values added into a float64 buffer (one add
  per value; no norms, no output); its ratio to the bodies' hashing bounds what any fuser
  written with numpy's array operations can reach;
- read: ``cat`` of the N body files to /dev/null (warm cache; the best of 3);
- naive: load every file fully (``safetensors.numpy.load_file``), stack, mean, save;
- fuse: ``cold_fusion_tf.fusion.fuse`` on the store, the whole job, split into validation
  (sha256 of every byte on a thread pool, finiteness and update norms; the fusion made on the
  way, kept when every body is), the fusion pass when it was not (read, average, write) and
  publishing (the new base linked into the store, its sha256 computed as it was written;
  manifest, LATEST);
- at the quorum: the same job for a fuser that waited for its quorum, the contributions
  validated as they arrived (the direction check and the fusion pass, then publishing);

and prints wall and CPU times, peak RSS (``VmHWM``, which counts mapped file pages) and the
ratios to the limit, to the read time and to one body's size. Needs about 11 bodies of disk
space under --workdir. The full run takes about 4 minutes on an idle 2-core machine,
``--quick`` about 30 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "roberta-base": dict(vocab=50265, positions=514, type_vocab=1, hidden=768, layers=12,
                         intermediate=3072),
    "minilm-l6": dict(vocab=30522, positions=512, type_vocab=2, hidden=384, layers=6,
                      intermediate=1536),
}


def shapes(vocab, positions, type_vocab, hidden, layers, intermediate):
  """Tensor names and shapes of a BERT/RoBERTa encoder body (Hugging Face layout)."""
  from cold_fusion_tf.model import keras_hub_names  # pylint: disable=g-import-not-at-top
  config = dict(vocab_size=vocab, max_position_embeddings=positions, type_vocab_size=type_vocab,
                hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate)
  return {n: shape for n, (shape, _) in keras_hub_names.hf_specs(config).items()}


def _write_body(path, model_shapes, seed, base_path=None):
  """A random body: the base plus small noise (or, without a base, fresh random values)."""
  from cold_fusion_tf.tensors import safetensors_io as weights  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  specs = {n: (s, "F32") for n, s in model_shapes.items()}
  base = None
  if base_path:
    base = weights.BodyFile(base_path)

  writer = weights.ChunkWriter(path, specs)
  for name in sorted(specs):
    values = rng.standard_normal(model_shapes[name], dtype=np.float32)
    if base is not None:
      values *= 1e-3
      values += base.read_tensor(name)
    writer.write(name, values.reshape(-1))
  writer.close()
  if base is not None:
    base.close()


def build_store(root, model, count):
  """A store with base 0 and ``count`` contributions to iteration 0."""
  from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
  model_shapes = shapes(**MODELS[model])
  source = os.path.join(root, "base0")
  os.makedirs(source)
  with open(os.path.join(source, "config.json"), "w") as f:
    json.dump({"model_type": "roberta" if model.startswith("roberta") else "bert",
               **MODELS[model]}, f)
  _write_body(os.path.join(source, "model.safetensors"), model_shapes, 0)
  store = store_lib.Store(os.path.join(root, "store"), cache_dir=os.path.join(root, "cache"))
  store.create(source, {"source_model": f"random {model}"})
  shutil.rmtree(source)
  base_path = os.path.join(store.base_dir(0), "model.safetensors")
  base_sha = store.base_sha256(0)
  bodies = []
  for i in range(count):
    cid = f"c{i:02d}"
    path = store.storage.local_path(f"{store.contribution_prefix(0, cid)}/body.safetensors")
    os.makedirs(os.path.dirname(path))
    _write_body(path, model_shapes, 1 + i, base_path)
    store.put_contribution(0, cid, path, {"base_sha256": base_sha, "dataset": cid,
                                          "num_examples": 1000, "steps": 1,
                                          "dev_metrics": {"score": 0.5}})
    bodies.append(path)
  return store, bodies, base_path


def reset_store(store):
  """Back to LATEST = 0 with no base 1, so the fusion can be measured again."""
  for prefix in ("bases/000001", "fusion/000001"):
    store.storage.delete_prefix(prefix)
  store.storage.write_bytes("LATEST", b"0\n")


def time_cat(paths, repeats=3):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
    best = min(best, time.perf_counter() - start)
  return best


HASH_CHUNK_BYTES = 4 << 20


def sha256_file(path: str, buffer: bytearray) -> str:
  """The hex sha256 of a file, read into ``buffer`` a chunk at a time."""
  digest, view = hashlib.sha256(), memoryview(buffer)
  with open(path, "rb", buffering=0) as f:
    while count := f.readinto(buffer):
      digest.update(view[:count])
  return digest.hexdigest()


def cpu_seconds() -> float:
  """CPU time of this process so far, all threads, user and system."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _best(fn, repeats: int) -> tuple[float, float]:
  """(wall seconds, CPU seconds) of the fastest of ``repeats`` calls of ``fn``."""
  best = (float("inf"), 0.0)
  for _ in range(repeats):
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    best = min(best, (time.perf_counter() - start, cpu_seconds() - cpu))
  return best


def time_hash_limit(paths, output_like, threads, repeats=3) -> tuple[tuple, tuple]:
  """(wall, CPU) seconds to sha256 every byte of ``paths`` on ``threads`` threads, the bodies
  shared out over them, and to sha256 the output-sized file ``output_like`` on one."""
  local = threading.local()

  def one(path):
    if not hasattr(local, "buffer"):
      local.buffer = bytearray(HASH_CHUNK_BYTES)
    return sha256_file(path, local.buffer)

  def bodies():
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
      list(pool.map(one, paths))

  buffer = bytearray(HASH_CHUNK_BYTES)
  return _best(bodies, repeats), _best(lambda: sha256_file(output_like, buffer), repeats)


def time_floor(paths, threads, repeats=3) -> tuple[float, float]:
  """(wall, CPU) seconds of the least a fusion job can do on ``threads`` threads: every body
  read once, a chunk at a time, each chunk hashed and its float32 values added into a float64
  buffer (one add per value: the least arithmetic an average needs; no norms, no output)."""
  local = threading.local()

  def one(path):
    if not hasattr(local, "buffer"):
      local.buffer = bytearray(HASH_CHUNK_BYTES)
      local.total = np.zeros(HASH_CHUNK_BYTES // 4, np.float64)
    digest, view = hashlib.sha256(), memoryview(local.buffer)
    with open(path, "rb", buffering=0) as f:
      while count := f.readinto(local.buffer):
        digest.update(view[:count])
        values = np.frombuffer(local.buffer, np.float32, count // 4)
        np.add(local.total[:count // 4], values, out=local.total[:count // 4])
    return digest.hexdigest()

  def bodies():
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
      list(pool.map(one, paths))

  return _best(bodies, repeats)


def time_sha256sum(paths, output_like, processes, repeats=3) -> Optional[float]:
  """Seconds for ``sha256sum`` processes over ``paths`` split ``processes`` ways, then over
  ``output_like``: the limit measured by another program (None without sha256sum)."""
  if not shutil.which("sha256sum"):
    return None
  groups = [paths[k::processes] for k in range(processes) if paths[k::processes]]

  def run():
    running = [subprocess.Popen(["sha256sum", *group], stdout=subprocess.DEVNULL)
               for group in groups]
    if any(p.wait() for p in running):
      raise RuntimeError("sha256sum failed")
    subprocess.run(["sha256sum", output_like], stdout=subprocess.DEVNULL, check=True)

  return _best(run, repeats)[0]


def peak_rss() -> int:
  """This process's peak resident set in bytes (VmHWM: unlike ru_maxrss, not inherited from
  the parent process across fork and exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_write(source, repeats=3):
  """Seconds to copy one body into a new file (write side of any fusion: the output)."""
  best, target = float("inf"), source + ".copy"
  buffer = bytearray(4 << 20)
  for _ in range(repeats):
    start = time.perf_counter()
    with open(source, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
      while count := src.readinto(buffer):
        dst.write(memoryview(buffer)[:count])
    best = min(best, time.perf_counter() - start)
    os.remove(target)
  return best


def child(kind, store_uri, paths, method, workers):
  """Runs in a fresh process: one measurement, printed as JSON."""
  base_rss = peak_rss()
  start, cpu = time.perf_counter(), cpu_seconds()
  result = {}
  if kind == "naive":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    loaded = [safetensors.numpy.load_file(p) for p in paths]
    fused = {n: np.stack([b[n] for b in loaded]).mean(axis=0) for n in loaded[0]}
    out = os.path.join(os.path.dirname(store_uri), "naive.safetensors")
    safetensors.numpy.save_file(fused, out)
    os.remove(out)
  else:
    from cold_fusion_tf import fusion  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
    store = store_lib.Store(store_uri, cache_dir=store_uri + "-cache")
    settings = fusion.Settings(method=method, workers=workers)
    validations = None
    if kind == "at_quorum":  # as the waiting fuser: validated as they arrived, then fused
      validations = fusion.Validations(store, settings, lambda m: None)
      tick = time.perf_counter()
      assert validations.refresh() == len(paths)
      result["arrival_validation"] = time.perf_counter() - tick
    base_rss = peak_rss()
    start, cpu = time.perf_counter(), cpu_seconds()
    outcome = fusion.fuse(store, log=lambda m: None, settings=settings,
                          validations=validations)
    assert outcome.published == 1, outcome.message
    result["timings"] = outcome.timings
    if validations is not None:
      validations.close()
  result["wall"] = time.perf_counter() - start
  result["cpu"] = cpu_seconds() - cpu
  result["peak_rss"] = peak_rss()
  result["interpreter_rss"] = base_rss
  print(json.dumps(result))


def measure(kind, store, paths, method="mean", workers=0):
  out = subprocess.run(
      [sys.executable, __file__, "--child", kind, "--store", store.uri, "--method", method,
       "--workers", str(workers), *paths], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(workdir, model, count, naive, repeats, method, workers):
  root = tempfile.mkdtemp(prefix=f"{model}-{count}-", dir=workdir)
  try:
    store, bodies, _ = build_store(root, model, count)
    body_bytes = os.path.getsize(bodies[0])
    time_cat(bodies, 1)  # warm the page cache
    read = time_cat(bodies, 3)
    write = time_write(bodies[0])
    threads = os.cpu_count() or 1
    hash_bodies, hash_output = time_hash_limit(bodies, bodies[0], threads)
    row = {"model": model, "n": count, "body_mib": body_bytes / 2**20, "read_s": read,
           "write_s": write, "threads": threads, "hash_bodies": hash_bodies,
           "floor": time_floor(bodies, threads),
           "hash_output": hash_output, "sha256sum_s": time_sha256sum(bodies, bodies[0], threads)}
    for kind in ("fuse", "at_quorum"):
      runs = []
      for _ in range(repeats):
        reset_store(store)
        runs.append(measure(kind, store, bodies, method, workers))
      row[kind] = min(runs, key=lambda r: r["wall"])
      row[kind]["peak_rss"] = max(r["peak_rss"] for r in runs)
    if naive:
      row["naive"] = measure("naive", store, bodies)
    return row
  finally:
    shutil.rmtree(root, ignore_errors=True)


def report(row):
  body = row["body_mib"] * 2**20
  f, t, q = row["fuse"], row["fuse"]["timings"], row["at_quorum"]
  read, threads = row["read_s"], row["threads"]
  (hash_wall, hash_cpu), (out_wall, out_cpu) = row["hash_bodies"], row["hash_output"]
  limit = hash_wall + out_wall
  print(f"\n{row['model']}, N = {row['n']} bodies of {row['body_mib']:.0f} MiB "
        f"({row['n'] * row['body_mib'] / 1024:.2f} GiB), warm cache, {threads} threads")
  print(f"  {'':40} {'wall s':>7} {'x limit':>8} {'x read':>7} {'CPU s':>6} "
        f"{'peak RSS MiB':>13} {'x body':>7}")
  alongside = t.get("fused_before_plan")
  lines = [
      (f"limit: sha256 of the bodies, {threads} threads", hash_wall, hash_cpu, None),
      ("  + sha256 of one output-sized file", out_wall, out_cpu, None),
      ("limit of a fusion job (the sum)", limit, hash_cpu + out_cpu, None)]
  if row["sha256sum_s"] is not None:
    lines.append((f"  cross-check: sha256sum, {threads} processes", row["sha256sum_s"], None,
                  None))
  lines += [
      ("floor: bodies read once, hashed, one add", row["floor"][0], row["floor"][1], None),
      ("read (cat > /dev/null)", read, None, None),
      ("write one body to a new file", row["write_s"], None, None),
      ("fuse, whole job", f["wall"], f["cpu"], f["peak_rss"]),
      ("  validation (sha256, finite, norms)" if not alongside else
       "  validation, fusing on the way", t["validate"], None, None),
      ("  fusion pass (read, mean, write)" if not alongside else
       "  fusion pass (done while validating)", t["fuse"], None, None),
      ("  publishing (link, manifest, CAS)", t["publish"], None, None),
      ("waiting fuser: at the quorum", q["wall"], q["cpu"], q["peak_rss"]),
      ("  (validated as they arrived)", q["arrival_validation"], None, None)]
  if "naive" in row:
    lines.append(("naive (load all, stack, mean)", row["naive"]["wall"], row["naive"]["cpu"],
                  row["naive"]["peak_rss"]))
  for label, wall, cpu, rss in lines:
    cpu_text = f"{cpu:6.2f}" if cpu is not None else " " * 6
    rss_text = f" {rss / 2**20:13.0f} {rss / body:7.2f}" if rss else ""
    print(f"  {label:40} {wall:7.2f} {wall / limit:8.2f} {wall / read:7.2f} {cpu_text}"
          f"{rss_text}")
  hashed = row["n"] * body / hash_wall / 2**30
  floor_wall, floor_cpu = row["floor"][0] + out_wall, row["floor"][1] + out_cpu
  print(f"  floor + sha256 of the output = {floor_wall / limit:.2f} x the limit (CPU "
        f"{floor_cpu / (hash_cpu + out_cpu):.2f}): the least any job that averages the bodies "
        "does, before norms, checks and writing")
  print(f"  whole job / limit = {f['wall'] / limit:.2f} (target 1.3 or less; CPU time "
        f"{f['cpu'] / (hash_cpu + out_cpu):.2f}); at the quorum / limit = "
        f"{q['wall'] / limit:.2f}; sha256 of the bodies at {hashed:.2f} GiB/s")
  print(f"  fuse: interpreter alone {f['interpreter_rss'] / 2**20:.0f} MiB; peak RSS above it "
        f"{(f['peak_rss'] - f['interpreter_rss']) / 2**20:.0f} MiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--store", help=argparse.SUPPRESS)
  parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help="where to build the stores (disk)")
  parser.add_argument("--quick", action="store_true", help="small model, N = 2 and 8 only")
  parser.add_argument("--method", default="mean")
  parser.add_argument("--workers", type=int, default=0, help="fuser threads (0: CPUs)")
  parser.add_argument("--repeats", type=int, default=2, help="fusion runs per case (best)")
  args = parser.parse_args()
  if args.child:
    child(args.child, args.store, args.paths, args.method, args.workers)
    return
  cases = [("minilm-l6", n, True) for n in (2, 8)] if args.quick else (
      [("roberta-base", 8, True)] + [("minilm-l6", n, n != 32) for n in (2, 8, 32)])
  workdir = args.workdir or tempfile.mkdtemp(prefix="fuse_bench_")
  print(f"{os.cpu_count()} CPUs; method {args.method}; stores under {workdir}")
  try:
    for model, count, naive in cases:
      report(run_case(workdir, model, count, naive, args.repeats, args.method, args.workers))
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
