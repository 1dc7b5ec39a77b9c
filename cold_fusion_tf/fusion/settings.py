"""What a fusion job does (:class:`Settings`, from ``config.fusion``) and what it did (:class:`Outcome`)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import params as fusion_params
from cold_fusion_tf.fusion import robust

# Defaults of the trust settings (config.fusion.*; what they were derived from is in
# cold_fusion_tf/configs/defaults.py).
MAX_UPDATE_RATIO = 0.2
MAX_TENSOR_UPDATE_RATIO = 0.5
MIN_COSINE = -0.5
MAX_WEIGHT_RATIO = 4.0
MAX_FUSED_RATIO = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a fusion job does; :meth:`from_config` reads them from ``config.fusion``."""

  method: str = "mean"
  params: dict = dataclasses.field(default_factory=dict)
  min_contributions: int = 1
  max_update_z: float = robust.ROBUST_Z_THRESHOLD
  max_update_ratio: float = MAX_UPDATE_RATIO
  max_tensor_update_ratio: float = MAX_TENSOR_UPDATE_RATIO
  clip_updates: bool = False
  min_cosine: float = MIN_COSINE
  max_weight_ratio: float = MAX_WEIGHT_RATIO
  max_fused_ratio: float = MAX_FUSED_RATIO
  server_optimizer: Optional[dict] = None  # {"lr", "momentum", "nesterov"} when enabled
  workers: int = 0
  max_wait: float = 0.0
  poll_seconds: float = 30.0
  watch_iterations: int = 0

  def __post_init__(self):
    fm.get_method(self.method)
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_("params", fusion_params.check_params(self.method, dict(self.params or {})))
    if self.server_optimizer is not None:
      set_("server_optimizer", fusion_params.check_params(fusion_params.SERVER_MOMENTUM, dict(self.server_optimizer)))
    if not isinstance(self.clip_updates, bool):
      raise UserError(f"config.fusion.clip_updates={self.clip_updates!r} is invalid: expected "
                      "True or False.")
    for name, low, kind in (("min_contributions", 1, int), ("workers", 0, int),
                            ("watch_iterations", 0, int), ("max_update_z", 0, float),
                            ("max_update_ratio", 0, float), ("max_tensor_update_ratio", 0, float),
                            ("min_cosine", -1, float), ("max_weight_ratio", 0, float),
                            ("max_fused_ratio", 0, float),
                            ("max_wait", 0, float), ("poll_seconds", 0.001, float)):
      value = getattr(self, name)
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      ok = ok and (kind is float or float(value).is_integer()) and math.isfinite(value)
      if not ok or value < low or name == "min_cosine" and value > 1:
        raise UserError(f"config.fusion.{name}={value!r} is invalid: expected "
                        f"{'an integer' if kind is int else 'a number'} >= {low}.")
      set_(name, kind(value))

  @classmethod
  def from_config(cls, fusion) -> "Settings":
    """From a ``config.fusion`` ConfigDict (see :mod:`cold_fusion_tf.configs.defaults`)."""
    server = fusion.get("server_optimizer") or {}
    server = dict(server)
    enabled = server.pop("enabled", False)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: fusion[k] for k in fields if k in fusion and k != "server_optimizer"}
    values["params"] = dict(values.get("params") or {})
    return cls(server_optimizer=server if enabled else None, **values)

  def plan_fields(self) -> dict:
    """The settings a plan fixes (everything that changes what gets published)."""
    return {"method": self.method, "params": self.params, "max_update_z": self.max_update_z,
            "max_update_ratio": self.max_update_ratio,
            "max_tensor_update_ratio": self.max_tensor_update_ratio,
            "clip_updates": self.clip_updates, "min_cosine": self.min_cosine,
            "max_weight_ratio": self.max_weight_ratio, "max_fused_ratio": self.max_fused_ratio,
            "server_optimizer": self.server_optimizer}

  def threads(self) -> int:
    return self.workers or max(1, min(os.cpu_count() or 1, 8))


@dataclasses.dataclass
class Outcome:
  published: Optional[int]  # the new iteration, or None if nothing was published
  fused: list[dict]
  rejected: list[dict]
  message: str
  lost_race: bool = False   # another fuser published this iteration
  timings: dict = dataclasses.field(default_factory=dict)
