"""The server optimizer: an outer SGD step with (Nesterov) momentum on the fused delta."""

from __future__ import annotations

from typing import Optional

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion.methods import f64 as _f64
from cold_fusion_tf.fusion.params import SERVER_MOMENTUM, param as _param



def server_momentum_step(base: np.ndarray, mean_delta: np.ndarray,
                         momentum_buffer: Optional[np.ndarray], *, lr: float = 0.7,
                         momentum: float = 0.9,
                         nesterov: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """One server optimizer step on the fused delta (DiLoCo, Douillard et al. 2023; FedOpt).

  The fused update is treated as an "outer gradient" ``g = -mean_delta`` (that is,
  ``base - mean(bodies)`` when the fusion is ``mean``; any method's ``fused - base`` works)
  and applied with SGD with momentum, in PyTorch's convention::

    buffer' = momentum * buffer + g
    update  = g + momentum * buffer'   if nesterov else   buffer'
    new_base = base - lr * update

  With ``lr=1`` and ``momentum=0`` the new base is ``base + mean_delta``, i.e. the plain
  fusion result. The buffer is state kept by the fuser between iterations, one per tensor.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor.
  mean_delta : np.ndarray
    The fused delta for this tensor, e.g. ``mean(bodies) - base``; same shape as ``base``.
  momentum_buffer : np.ndarray or None
    The buffer returned by the previous step for this tensor, or None on the first step
    (treated as zeros).
  lr : float, default 0.7
    The outer learning rate, > 0 (DiLoCo uses 0.7).
  momentum : float, default 0.9
    In [0, 1); 0 disables momentum.
  nesterov : bool, default True
    Whether to use Nesterov momentum.

  Returns
  -------
  new_base : np.ndarray
    Of ``base.dtype``.
  new_momentum_buffer : np.ndarray
    float32 (float64 if ``base`` is float64): store it and pass it to the next step.

  Raises
  ------
  UserError
    For parameters out of range or shapes that do not match.
  """
  lr = _param(SERVER_MOMENTUM, "lr", lr)
  momentum = _param(SERVER_MOMENTUM, "momentum", momentum)
  nesterov = _param(SERVER_MOMENTUM, "nesterov", nesterov)
  base = np.asarray(base)
  if np.shape(mean_delta) != base.shape:
    raise UserError(
        f"Server momentum step: delta shape {np.shape(mean_delta)} does not match the base "
        f"shape {base.shape}.")
  if momentum_buffer is not None and np.shape(momentum_buffer) != base.shape:
    raise UserError(
        f"Server momentum step: momentum buffer shape {np.shape(momentum_buffer)} does not "
        f"match the base shape {base.shape} (was the buffer saved for another model?).")
  gradient = -_f64(mean_delta)
  buffer = gradient.copy() if momentum_buffer is None else momentum * _f64(momentum_buffer)
  if momentum_buffer is not None:
    buffer += gradient
  update = gradient + momentum * buffer if nesterov else buffer
  new_base = _f64(base) - lr * update
  buffer_dtype = np.float64 if base.dtype == np.float64 else np.float32
  return new_base.astype(base.dtype), buffer.astype(buffer_dtype)
