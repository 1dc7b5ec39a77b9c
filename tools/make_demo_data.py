"""Builds the small datasets shipped in the repository from ../shared/data: the demo's
(cold_fusion_tf/data/demo/) and the tests' extra ones (tests/data/).

    python tools/make_demo_data.py --source ../shared/data
    python tools/make_demo_data.py --out tests/data --tasks stsb --sizes 200,50,50

Each task keeps a random sample (seed 0) of its train/dev/test splits and its info.json
(source repository, commit, license note), with counts updated.
"""

import argparse
import json
import os
import random

TASKS = ("sst2", "trec_coarse", "ag_news", "rte", "rotten_tomatoes", "tweet_eval_emotion")
SIZES = {"train": 1000, "dev": 200, "test": 400}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--source", default=os.path.join("..", "shared", "data"))
  parser.add_argument("--out", default=os.path.join("cold_fusion_tf", "data", "demo"))
  parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task folders")
  parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES.values()),
                      help="train,dev,test sample sizes")
  args = parser.parse_args()
  sizes = dict(zip(SIZES, (int(n) for n in args.sizes.split(","))))
  for task in args.tasks.split(","):
    os.makedirs(os.path.join(args.out, task), exist_ok=True)
    with open(os.path.join(args.source, task, "info.json"), encoding="utf-8") as f:
      info = json.load(f)
    info.pop("group", None)  # where the source folder sat; means nothing in the repository
    for split, size in sizes.items():
      with open(os.path.join(args.source, task, f"{split}.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
      sample = random.Random(0).sample(lines, min(size, len(lines)))
      with open(os.path.join(args.out, task, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(sample)
      info["counts"][split] = len(sample)
    info["notes"] = (f"Subset: a random sample (seed 0) of at most {sizes} examples of "
                     "each split of the full conversion. " + info.get("notes", ""))
    with open(os.path.join(args.out, task, "info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, ensure_ascii=False)
      f.write("\n")


if __name__ == "__main__":
  main()
