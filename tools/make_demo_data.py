"""Builds the small demo datasets shipped in cold_fusion_tf/data/demo/ from ../shared/data.

    python tools/make_demo_data.py --source ../shared/data

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
  args = parser.parse_args()
  for task in TASKS:
    os.makedirs(os.path.join(args.out, task), exist_ok=True)
    with open(os.path.join(args.source, task, "info.json"), encoding="utf-8") as f:
      info = json.load(f)
    for split, size in SIZES.items():
      with open(os.path.join(args.source, task, f"{split}.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
      sample = random.Random(0).sample(lines, min(size, len(lines)))
      with open(os.path.join(args.out, task, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(sample)
      info["counts"][split] = len(sample)
    info["notes"] = (f"Demo subset: a random sample (seed 0) of at most {SIZES} examples of "
                     "each split of the full conversion. " + info.get("notes", ""))
    with open(os.path.join(args.out, task, "info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, ensure_ascii=False)
      f.write("\n")


if __name__ == "__main__":
  main()
