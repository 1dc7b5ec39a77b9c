"""Fusion throughput and memory: this package's fuser against reading the bytes and the naive way.

  python benchmarks/fuse_throughput.py                      # the README's figures
  python benchmarks/fuse_throughput.py --quick              # a small model only, N = 2, 8

Builds local stores of random float32 bodies with the real tensor names and shapes
(roberta-base: 476 MiB per body; a MiniLM-L6-sized model for N = 2, 8, 32), warms the page
cache, then for each case measures, each in a fresh process:

- read: ``cat`` of the N body files to /dev/null (warm cache; the best of 3);
- naive: load every file fully (``safetensors.numpy.load_file``), stack, mean, save;
- fuse: ``cold_fusion_tf.fusion.fuse`` on the store, split into validation (sha256,
  finiteness and update norms: one read of every body), the fusion pass (read, average,
  write, fsync) and publishing (hashing the new base, copying it into the store, manifest,
  LATEST);

and prints wall times, peak RSS (``ru_maxrss``, which counts mapped file pages) and the ratios
to the read time and to one body's size. Needs about 11 bodies of disk space under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

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
  out = {"embeddings.word_embeddings.weight": (vocab, hidden),
         "embeddings.position_embeddings.weight": (positions, hidden),
         "embeddings.token_type_embeddings.weight": (type_vocab, hidden),
         "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,),
         "pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      out[p + part + ".weight"], out[p + part + ".bias"] = (hidden, hidden), (hidden,)
    out[p + "intermediate.dense.weight"] = (intermediate, hidden)
    out[p + "intermediate.dense.bias"] = (intermediate,)
    out[p + "output.dense.weight"], out[p + "output.dense.bias"] = (hidden, intermediate), (hidden,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      out[p + norm + ".weight"], out[p + norm + ".bias"] = (hidden,), (hidden,)
  return out


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
  start = time.perf_counter()
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
    start = time.perf_counter()
    outcome = fusion.fuse(store, log=lambda m: None, settings=settings,
                          validations=validations)
    assert outcome.published == 1, outcome.message
    result["timings"] = outcome.timings
    if validations is not None:
      validations.close()
  result["wall"] = time.perf_counter() - start
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
    row = {"model": model, "n": count, "body_mib": body_bytes / 2**20, "read_s": read,
           "write_s": write}
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
  f, t = row["fuse"], row["fuse"]["timings"]
  read = row["read_s"]
  print(f"\n{row['model']}, N = {row['n']} bodies of {row['body_mib']:.0f} MiB "
        f"({row['n'] * row['body_mib'] / 1024:.2f} GiB), warm cache")
  print(f"  {'':34} {'wall s':>8} {'x read':>8} {'peak RSS MiB':>13} {'x body':>7}")
  print(f"  {'read (cat > /dev/null)':34} {read:8.2f} {1:8.2f}")
  print(f"  {'write one body to a new file':34} {row['write_s']:8.2f} "
        f"{row['write_s'] / read:8.2f}")
  q = row["at_quorum"]
  lines = [("fuse, whole job", f["wall"], f["peak_rss"]),
           ("  validation (sha256, finite, norm)", t["validate"], None),
           ("  fusion pass (read, mean, write)", t["fuse"], None),
           ("  publishing (link, manifest, CAS)", t["publish"], None),
           ("waiting fuser: at the quorum", q["wall"], q["peak_rss"]),
           ("  (validated as they arrived)", q["arrival_validation"], None)]
  if "naive" in row:
    lines.append(("naive (load all, stack, mean)", row["naive"]["wall"],
                  row["naive"]["peak_rss"]))
  for label, wall, rss in lines:
    rss_text = f"{rss / 2**20:13.0f} {rss / body:7.2f}" if rss else ""
    print(f"  {label:34} {wall:8.2f} {wall / read:8.2f} {rss_text}")
  floor = read + row["write_s"]
  print(f"  fusion pass / (read + write one body) = {t['fuse'] / floor:.2f}; validation: "
        f"{row['n'] * body / t['validate'] / 2**30:.2f} GiB/s (sha256 of every byte)")
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
