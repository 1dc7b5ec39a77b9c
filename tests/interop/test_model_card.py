"""The model card's metadata is huggingface_hub's: it parses as a ModelCard with the base
model, the feature-extraction pipeline tag, the datasets and a model-index of the scores."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.interop import model_card

LINEAGE = {
    "iteration": 2, "model_type": "roberta", "source_model": "roberta-base",
    "model_sha256": "ab" * 32, "code_version": "0.1.0",
    "rounds": [{"iteration": 1, "method": "mean", "rejected": [],
                "contributions": [{"id": "a", "dataset": "sst2", "num_examples": 10}]},
               {"iteration": 2, "method": "mean", "rejected": ["b"],
                "contributions": [{"id": "c", "dataset": "rte", "num_examples": 20}]}],
    "datasets": ["rte", "sst2"],
    "evaluation": {"0": {"sst2": {"score": 0.80, "std": 0.0, "n": 1},
                         "stsb": {"score": 0.50, "std": 0.0, "n": 1}},
                   "2": {"sst2": {"score": 0.84, "std": 0.01, "n": 3},
                         "stsb": {"score": 0.625, "std": 0.02, "n": 3}}},
}


def test_card_parses_with_huggingface_hub():
  # Execute
  card = ModelCard(model_card.render(LINEAGE, "hf", "mit"))
  # Assert
  data = card.data
  assert data.base_model == "roberta-base" and data.pipeline_tag == "feature-extraction"
  assert data.license == "mit" and data.library_name == "transformers"
  assert data.datasets == ["rte", "sst2"] and "cold-fusion" in data.tags
  assert data.model_name == "ColD Fusion roberta, iteration 2"
  scores = {r.dataset_name: (r.metric_value, r.task_type, r.dataset_split)
            for r in data.eval_results}
  assert scores == {"sst2": (84.0, "text-classification", "test"),
                    "stsb": (62.5, "text-classification", "test")}
  assert "# ColD Fusion roberta, iteration 2" in card.text
  assert "| sst2 | yes | 80.0 | 84.0 | +4.0 |" in card.text


def test_a_local_source_is_no_base_model_and_base_zero_has_no_index():
  # Prepare
  lineage = dict(LINEAGE, iteration=0, rounds=[], datasets=[], source_model="/models/mine",
                 evaluation={})
  # Execute
  data = ModelCard(model_card.render(lineage, "keras_hub")).data
  # Assert
  assert data.base_model is None and data.eval_results is None and data.datasets is None
  assert data.library_name == "keras-hub" and data.license == "other"


@pytest.mark.parametrize("license_name", ["MIT", "mit\nbase_model: evil", "", "a/b"])
def test_license_must_be_an_identifier(license_name):
  # Execute / Assert
  with pytest.raises(UserError, match="--license"):
    model_card.render(LINEAGE, "hf", license_name)


def test_a_base_with_many_rejected_ids_names_ten_and_counts_the_rest():
  # Prepare: base 2 rejected 12 listed ids and 5 more its plan only counts.
  rounds = [LINEAGE["rounds"][0],
            {**LINEAGE["rounds"][1], "rejected": [f"id{i:02d}" for i in range(12)],
             "rejected_not_listed": 5}]
  # Execute
  text = model_card.lineage_section(dict(LINEAGE, rounds=rounds))
  # Assert
  assert "| 2 | mean | rte: 20 | id00, id01, id02, id03, id04, id05, id06, id07, id08, id09 " \
         "and 7 more |" in text
  assert "| 1 | mean | sst2: 10 | - |" in text
