"""A base's config.json from an untrusted store: read with limits, every setting a body is
built from checked, and its sizes checked against the weights beside it before anything is
allocated."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import hf_config

_TINY = {"model_type": "bert", "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
         "type_vocab_size": 2}


def _model_dir(tmp_path, config, numbers: int = 1000) -> str:
  """A folder with ``config`` (a dict, or raw text) and a model.safetensors of ``numbers``."""
  folder = tmp_path / "model"
  folder.mkdir()
  text = config if isinstance(config, str) else json.dumps(config)
  (folder / "config.json").write_text(text)
  safetensors.numpy.save_file({"w": np.zeros(numbers, np.float32)},
                              str(folder / "model.safetensors"))
  return str(folder)


@pytest.mark.parametrize("config,message", [
    ('{"model_type": "bert", "x": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested 5001 deep"),
    ('{"model_type": "bert", "x": ' + "9" * 5000 + "}", "an integer of 5000 characters"),
    ({**_TINY, "num_attention_heads": 3}, "hidden size 8 is not a multiple of the 3 attention"),
    ({**_TINY, "hidden_act": "evil"}, "hidden_act='evil' is not one of gelu"),
    ({**_TINY, "layer_norm_eps": "x"}, "layer_norm_eps='x' is not a number in [0, 1)"),
    ({**_TINY, "hidden_dropout_prob": 2.5}, "hidden_dropout_prob=2.5 is not a rate in [0, 1)"),
    ({**_TINY, "pad_token_id": 100}, "pad_token_id=100 is not a token id (0..99)"),
    ({**_TINY, "auto_map": {"AutoModel": "evil.Model"}}, "names code to run (auto_map)"),
    ({"model_type": "distilbert", "dim": 10 ** 9}, "dim=1000000000 is not an integer in 1..16384"),
    ({"model_type": "electra", "embedding_size": 10 ** 9}, "embedding_size=1000000000 is not"),
])
def test_a_hostile_config_is_one_user_error(tmp_path, config, message):
  # Prepare
  folder = _model_dir(tmp_path, config)
  # Execute / Assert: a UserError naming the file, never RecursionError, ValueError or a build
  with pytest.raises(UserError) as error:
    hf_config.read(folder)
  assert str(error.value).startswith(os.path.join(folder, "config.json")), str(error.value)
  assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("sizes", [
    {"hidden_size": 16384, "num_hidden_layers": 128, "intermediate_size": 65536,
     "num_attention_heads": 128},
    {"vocab_size": 1_000_000},
    {"max_position_embeddings": 65536, "hidden_size": 1024},
])
def test_a_config_that_claims_more_than_its_weights_hold_is_refused_before_building(tmp_path,
                                                                                   sizes):
  # Prepare: a config within every single limit, weights of 1000 numbers
  folder = _model_dir(tmp_path, {**_TINY, **sizes})
  # Execute / Assert: refused from the sizes alone (building it would allocate gigabytes)
  with pytest.raises(UserError, match=r"config\.json: describes a body of about [\d,]+ "
                     r"parameters, but model\.safetensors holds 1,000 numbers"):
    hf_config.read(folder)


def test_a_config_that_fits_its_weights_is_read(tmp_path):
  # Prepare: the tiny config needs (100 + 16 + 2) * 8 + 4 * 64 + 2 * 128 = 1456 numbers
  folder = _model_dir(tmp_path, _TINY, numbers=1456)
  # Execute
  config = hf_config.read(folder)
  # Assert
  assert config == _TINY and hf_config.parameters(config) == 1456
  assert hf_config.sizes({"model_type": "distilbert", "dim": 32})["hidden_size"] == 32
