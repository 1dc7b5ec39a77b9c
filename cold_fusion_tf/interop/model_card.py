"""The lineage of a published base and its model card (README.md; its metadata, the YAML
front matter, through ``huggingface_hub``'s ModelCardData: base model, pipeline tag,
datasets and the evaluation as a model-index).

The lineage is read from the store: ``run.json`` (source model), every manifest from base 1
to base N (fusion method, fused and rejected contributions) and ``evaluations/<i>.json``
(scores of base 0 and base N, when the run evaluated them).
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

from huggingface_hub import EvalResult, ModelCardData

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import lineage as store_lineage
from cold_fusion_tf.store import paths

PAPER = "https://arxiv.org/abs/2212.01378"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")
CITATION = """@inproceedings{don-yehiya-etal-2023-cold,
  title = "{C}ol{D} Fusion: Collaborative Descent for Distributed Multitask Finetuning",
  author = "Don-Yehiya, Shachar and Venezian, Elad and Raffel, Colin and Slonim, Noam and
            Katz, Yoav and Choshen, Leshem",
  booktitle = "Proceedings of the 61st Annual Meeting of the Association for Computational
               Linguistics (ACL 2023)",
  year = "2023",
  eprint = "2212.01378",
  archivePrefix = "arXiv",
}"""


def lineage(store, iteration: int) -> dict:
  """Everything the card says about base ``iteration``, as plain JSON-able data."""
  info = store.run_info()
  manifest = store.manifest(iteration)
  rounds = []
  for it in range(1, iteration + 1):
    fusion = store.manifest(it).get("fusion") or {}
    fused = [{"id": str(c.get("id", "")), "dataset": str(c.get("dataset", "")),
              "num_examples": c.get("num_examples")}
             for c in fusion.get("contributions", []) if isinstance(c, dict)]
    rejected = [str(r.get("id", "")) for r in fusion.get("rejected", []) if isinstance(r, dict)]
    rounds.append({"iteration": it, "method": str(fusion.get("method", "")),
                   "contributions": fused, "rejected": rejected,
                   "rejected_not_listed": store_lineage.not_listed(fusion)})
  return {
      "iteration": iteration,
      "model_type": str(info.get("model_type", "")),
      "source_model": str(info.get("source_model", "")),
      "model_sha256": manifest["files"]["model.safetensors"]["sha256"],
      "code_version": str(manifest.get("code_version", "")),
      "rounds": rounds,
      "datasets": sorted({c["dataset"] for r in rounds for c in r["contributions"]}),
      "evaluation": {str(i): scores for i in sorted({0, iteration})
                     if (scores := _scores(store, i)) is not None},
  }


def _scores(store, iteration: int) -> Optional[dict]:
  """task -> {"score", "std", "n"} from evaluations/<i>.json, malformed entries left out."""
  saved = store.read_json(f"evaluations/{paths.iteration_name(iteration)}.json")
  if not saved or not isinstance(saved.get("scores"), dict):
    return None
  out = {}
  for task, value in saved["scores"].items():
    if not isinstance(value, dict):
      continue
    score, std = value.get("score"), value.get("std", 0.0)
    runs = value.get("scores") if isinstance(value.get("scores"), list) else []
    if _finite(score) and _finite(std) and re.match(r"^[A-Za-z0-9][\w.-]{0,127}$", str(task)):
      out[str(task)] = {"score": float(score), "std": float(std), "n": len(runs)}
  return out or None


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _code(text: str) -> str:
  """Untrusted text shown verbatim in markdown (one line, in backticks)."""
  text = " ".join(str(text).split()).replace("`", "'")
  return f"`{text}`" if text else "-"


LICENSE_HELP = ("give a license identifier such as mit, apache-2.0 or cc-by-4.0 (that of the "
                "source model), or other")


def valid_license(license_name) -> bool:
  """Whether ``license_name`` looks like a Hub license identifier (``mit``, ``other``, ...)."""
  return isinstance(license_name, str) and bool(_LICENSE.match(license_name))


def check_license(license_name: str) -> str:
  if not valid_license(license_name):
    raise UserError(f"--license={license_name!r}: {LICENSE_HELP}.")
  return license_name


def card_data(lin: dict, license_name: str, library: str) -> ModelCardData:
  """The card's metadata: what the Hub indexes (base model, task, datasets, evaluation)."""
  tags = ["cold-fusion", lin["model_type"]]
  tags += ["tensorflow", "keras"] if library == "transformers" else ["keras-hub", "keras"]
  source = lin["source_model"]
  base_model = source if _HUB_ID.match(source) and not os.path.exists(source) else None
  name = f"ColD Fusion {lin['model_type']}, iteration {lin['iteration']}"
  scores = lin["evaluation"].get(str(lin["iteration"]), {})
  results = [EvalResult(task_type="text-classification", dataset_type=task, dataset_name=task,
                        dataset_split="test", metric_type="recycling_score",
                        metric_name="test accuracy (Spearman for regression) x 100 after "
                                    "fine-tuning with a fresh head, mean over seeds",
                        metric_value=round(100 * scores[task]["score"], 2))
             for task in sorted(scores)]
  return ModelCardData(language="en", license=check_license(license_name),
                       library_name=library, tags=[t for t in tags if t],
                       base_model=base_model, datasets=lin["datasets"] or None,
                       pipeline_tag="feature-extraction", model_name=name if results else None,
                       eval_results=results or None)


def front_matter(lin: dict, license_name: str, library: str) -> str:
  """The card's YAML front matter (:func:`card_data`)."""
  return "---\n" + card_data(lin, license_name, library).to_yaml() + "\n---\n"


MAX_REJECTED_SHOWN = 10
"""Rejected ids a card names per base; it counts the others."""


def _rejected(fusion_round: dict) -> str:
  shown = fusion_round["rejected"][:MAX_REJECTED_SHOWN]
  more = (len(fusion_round["rejected"]) - len(shown)
          + fusion_round.get("rejected_not_listed", 0))
  return ", ".join(shown) + (f" and {more} more" if more else "")


def lineage_section(lin: dict) -> str:
  rounds = lin["rounds"]
  total = sum(len(r["contributions"]) for r in rounds)
  out = ["## Lineage", "",
         f"- Source model (base 0): {_code(lin['source_model'])} ({lin['model_type']})",
         f"- Fusion iterations: {lin['iteration']}, {total} fused contribution(s) from "
         f"{len(lin['datasets'])} dataset(s)",
         f"- Base weights (`model.safetensors` in the store) sha256: `{lin['model_sha256']}`",
         ""]
  if rounds:
    out += ["| base | method | fused contributions (dataset: training examples) | rejected |",
            "|---|---|---|---|"]
    for r in rounds:
      fused = ", ".join(f"{c['dataset']}: {c['num_examples']}" for c in r["contributions"])
      out.append(f"| {r['iteration']} | {r['method'] or '-'} | {fused or '-'} | "
                 f"{_rejected(r) or '-'} |")
    out.append("")
  else:
    out += ["This is base 0: the source model as published in the store, before any fusion.", ""]
  return "\n".join(out)


def evaluation_section(lin: dict) -> str:
  """Base N against base 0 on every evaluated task (points: accuracy or Spearman x 100)."""
  evaluation = lin["evaluation"]
  last = str(lin["iteration"])
  if last not in evaluation:
    return ""
  current, reference = evaluation[last], evaluation.get("0", {})
  seen = set(lin["datasets"])
  out = ["## Evaluation", "",
         "Model recycling as in the paper: the base is fine-tuned on each task with a fresh "
         "head (same recipe and seeds for every base); test accuracy, or Spearman correlation "
         "for regression, x 100, mean over seeds. *Seen* tasks were among the fused "
         "contributors' datasets.", ""]
  if last == "0":
    out += ["| task | base 0 |", "|---|---|"]
    out += [f"| {t} | {100 * current[t]['score']:.1f} |" for t in sorted(current)]
    return "\n".join(out) + "\n"
  out += [f"| task | seen | base 0 | base {last} | gain |", "|---|---|---|---|---|"]
  gains = {True: [], False: []}
  for task in sorted(current):
    now = current[task]["score"]
    before = reference.get(task, {}).get("score")
    gain = "-" if before is None else f"{100 * (now - before):+.1f}"
    if before is not None:
      gains[task in seen].append(now - before)
    out.append(f"| {task} | {'yes' if task in seen else 'no'} | "
               f"{'-' if before is None else f'{100 * before:.1f}'} | {100 * now:.1f} | {gain} |")
  for flag, label in ((True, "seen"), (False, "unseen")):
    if gains[flag]:
      out.append(f"| mean gain, {label} | | | | {100 * sum(gains[flag]) / len(gains[flag]):+.1f} |")
  return "\n".join(out) + "\n"


WORDPIECE_FAMILIES = ("bert", "electra", "distilbert")
"""Model types whose vocabulary ``keras_classifier(inputs="text")`` tokenizes in the graph."""


def usage_section(fmt: str, model_type: str = "bert") -> str:
  if fmt == "keras_hub":
    code = ('import keras_hub\n\n'
            'model_dir = "path/to/this/directory"\n'
            'backbone = keras_hub.models.Backbone.from_preset(model_dir)\n'
            'classifier = keras_hub.models.TextClassifier.from_preset(model_dir, num_classes=2)\n'
            'classifier.fit(x=["a gripping film", "a dull mess"], y=[1, 0], batch_size=2)\n')
  else:
    code = ('from transformers import AutoModel, AutoTokenizer, TFAutoModel\n\n'
            'model_dir = "path/to/this/directory"\n'
            'tokenizer = AutoTokenizer.from_pretrained(model_dir)\n'
            'tf_body = TFAutoModel.from_pretrained(model_dir)  # TensorFlow / Keras\n'
            'pt_body = AutoModel.from_pretrained(model_dir)    # PyTorch\n\n'
            'import cold_fusion_tf  # a compiled tf-keras classifier with the paper\'s recipe\n')
    if model_type in WORDPIECE_FAMILIES:  # raw strings, tokenized in the graph
      code += 'classifier = cold_fusion_tf.keras_classifier(model_dir, num_labels=2)\n'
    else:  # not WordPiece: the classifier takes the tokenizer's output
      code += ('classifier = cold_fusion_tf.keras_classifier(model_dir, num_labels=2, '
               'inputs="ids")\n'
               'logits = classifier(dict(tokenizer(["a gripping film"], padding=True, '
               'return_tensors="tf")))\n')
  return ("## How to use\n\nAn encoder without a task head: fine-tune it on your task (the "
          "paper's recipe: AdamW, learning rate 5e-5 (2e-5 for BERT), linear schedule with 0.6% "
          "warm-up, weight decay 0.01).\n\n```python\n" + code + "```\n")


def render(lin: dict, fmt: str = "hf", license_name: str = "other") -> str:
  """The model card text."""
  library = "keras-hub" if fmt == "keras_hub" else "transformers"
  title = f"# ColD Fusion {lin['model_type']}, iteration {lin['iteration']}"
  intro = (f"This encoder is base {lin['iteration']} of a ColD Fusion run ([Collaborative "
           f"Descent for Distributed Multitask Finetuning]({PAPER}), Don-Yehiya et al., ACL "
           "2023). ")
  if lin["iteration"]:
    intro += ("Starting from the source model, each iteration let contributors fine-tune the "
              "current base on their own datasets with a fresh task head, and a fusion job "
              "averaged their encoder bodies (no data was shared). The result is meant as a "
              "better starting point for fine-tuning on new tasks.\n")
  else:
    intro += "It is the source model as the run published it, before any fusion.\n"
  parts = [front_matter(lin, license_name, library), title, "", intro, lineage_section(lin),
           evaluation_section(lin), usage_section(fmt, lin["model_type"]),
           "## Citation\n\n```bibtex\n" + CITATION + "\n```\n"]
  return "\n".join(p for p in parts if p is not None)
