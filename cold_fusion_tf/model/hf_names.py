"""TF body variables <-> Hugging Face (PyTorch) tensor names and layouts.

This is the one place that knows how a ``TFAutoModel`` body's variables map onto the
tensor names of the matching PyTorch ``AutoModel`` (``encoder.layer.0.attention.self.query.weight``):
Dense kernels are transposed, ``gamma``/``beta`` become ``weight``/``bias``, the base-model
prefix (``bert.``, ``roberta.``) is dropped. Everything read from a file is checked against
the names, shapes and dtypes the model expects, and for finiteness, before it is assigned.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.tensors import safetensors_io


def _hf_name(model, variable) -> tuple[str, bool]:
  """(Hugging Face tensor name, whether the TF value is the transpose of the HF one)."""
  # Imported here: transformers takes seconds to import, and the safetensors half of this
  # module (used by the fuser) does not need it.
  from transformers.modeling_tf_pytorch_utils import TransposeType  # pylint: disable=g-import-not-at-top
  from transformers.modeling_tf_pytorch_utils import convert_tf_weight_name_to_pt_weight_name  # pylint: disable=g-import-not-at-top
  name, transpose = convert_tf_weight_name_to_pt_weight_name(
      variable.name, tf_weight_shape=variable.shape)
  prefix = model.base_model_prefix + "."
  if name.startswith(prefix):
    name = name[len(prefix):]
  if transpose not in (TransposeType.NO, TransposeType.SIMPLE):
    raise UserError(f"Variable {variable.name} needs a convolution transpose; this model type "
                    "is not supported (use an encoder such as BERT or RoBERTa).")
  return name, transpose == TransposeType.SIMPLE


def variable_map(model) -> dict[str, tuple[object, bool]]:
  """HF tensor name -> (TF variable, transposed?) for every weight of a built body."""
  result = {}
  for variable in model.weights:
    name, transposed = _hf_name(model, variable)
    if name in result:
      raise ValueError(f"Two variables map onto {name}: {result[name][0].name}, {variable.name}")
    result[name] = (variable, transposed)
  return result


def body_tensors(model) -> dict[str, np.ndarray]:
  """The body's weights as numpy arrays under HF names, in HF (PyTorch) layout."""
  out = {}
  for name, (variable, transposed) in variable_map(model).items():
    value = variable.numpy()
    out[name] = np.ascontiguousarray(value.T if transposed else value)
  return out


def expected_specs(model) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF name -> (shape, safetensors dtype string) the body expects."""
  specs = {}
  for name, (variable, transposed) in variable_map(model).items():
    shape = tuple(int(d) for d in variable.shape)
    specs[name] = (shape[::-1] if transposed else shape, safetensors_io.dtype_code(variable.dtype.as_numpy_dtype))
  return specs


def assign_body_tensors(model, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Assigns HF-named tensors to a built body, after checking them all.

  Extra tensors that are buffers in PyTorch (``*.position_ids``) are ignored; anything else
  missing, unexpected, of another shape or dtype, or not finite is an error naming ``source``.
  """
  mapping = variable_map(model)
  specs = expected_specs(model)
  safetensors_io.check_tensors(tensors, specs, source)
  for name, (variable, transposed) in mapping.items():
    value = tensors[name]
    variable.assign(value.T if transposed else value)
