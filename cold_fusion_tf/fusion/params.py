"""Fusion method parameters: their specifications, defaults and ranges, and their validation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

import numpy as np

from cold_fusion_tf.errors import UserError

SERVER_MOMENTUM = "server_momentum"
"""The name under which :func:`check_params` checks the server optimizer's parameters."""



@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """What one method parameter accepts.

  Attributes
  ----------
  default : object
    The value the method uses when the parameter is not given.
  kind : str
    ``"real"`` (an int or float, not bool), ``"int"`` (an int, not bool) or ``"bool"``.
  low, high : float or None
    Range bounds; None means unbounded on that side. Real values must also be finite.
  low_open, high_open : bool
    Whether the bound itself is excluded (an open interval end).
  allow_none : bool
    Whether None is accepted (it then means something documented by the method).
  """

  default: Any
  kind: str = "real"
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  allow_none: bool = False

  def describe(self) -> str:
    """The accepted values in words, for error messages: e.g. ``a number in [0, 0.5)``."""
    if self.kind == "bool":
      text = "true or false"
    else:
      noun = "an integer" if self.kind == "int" else "a finite number"
      low, high = (
          None if bound is None else (str(int(bound)) if self.kind == "int" else f"{bound:g}")
          for bound in (self.low, self.high))
      if low is None and high is None:
        text = noun
      elif high is None:
        text = f"{noun} {'>' if self.low_open else '>='} {low}"
      elif low is None:
        text = f"{noun} {'<' if self.high_open else '<='} {high}"
      else:
        text = (f"{noun} in {'(' if self.low_open else '['}{low}, "
                f"{high}{')' if self.high_open else ']'}")
    if self.allow_none:
      text += " or None"
    return text

  def check(self, method_name: str, param: str, value: Any) -> Any:
    """Returns ``value`` normalized (float for reals, int for ints) or raises UserError."""
    if value is None and self.allow_none:
      return None
    bad = UserError(
        f"Fusion method {method_name!r}: parameter {param}={value!r} is invalid: expected "
        f"{self.describe()}.")
    if self.kind == "bool":
      if isinstance(value, (bool, np.bool_)):
        return bool(value)
      raise bad
    if isinstance(value, (bool, np.bool_)):
      raise bad
    if self.kind == "int":
      if not isinstance(value, numbers.Integral):
        raise bad
      value = int(value)
    else:
      if not isinstance(value, numbers.Real):
        raise bad
      value = float(value)
      if not math.isfinite(value):
        raise bad
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      raise bad
    if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
      raise bad
    return value


PARAM_SPECS: dict[str, dict[str, ParamSpec]] = {
    "mean": {},
    "weighted": {},
    "trimmed_mean": {
        "trim_fraction": ParamSpec(0.1, low=0.0, high=0.5, high_open=True),
    },
    "median": {},
    "task_arithmetic": {
        "scale": ParamSpec(None, allow_none=True),
    },
    "ties": {
        "density": ParamSpec(0.2, low=0.0, high=1.0, low_open=True),
        "scale": ParamSpec(1.0),
    },
    "dare": {
        "drop_rate": ParamSpec(0.9, low=0.0, high=1.0, high_open=True),
        "seed": ParamSpec(0, kind="int", low=0, high=2**32 - 1),
    },
    SERVER_MOMENTUM: {
        "lr": ParamSpec(0.7, low=0.0, low_open=True),
        "momentum": ParamSpec(0.9, low=0.0, high=1.0, high_open=True),
        "nesterov": ParamSpec(True, kind="bool"),
    },
}
"""For each method name (and :data:`SERVER_MOMENTUM`): its parameters, defaults and ranges."""


def check_params(method_name: str, params: Optional[dict[str, Any]]) -> dict[str, Any]:
  """Validates a method's parameters (names and ranges) and fills in the defaults.

  Parameters
  ----------
  method_name : str
    A key of :data:`METHODS`, or :data:`SERVER_MOMENTUM` for :func:`server_momentum_step`.
  params : dict or None
    Parameter name -> value, e.g. from a config. None is the same as ``{}``.

  Returns
  -------
  dict
    Every parameter of the method, with the given values normalized (ints and numpy
    scalars become Python float / int / bool) and the others at their defaults; suitable
    for ``method(..., **result)`` and for recording in a fusion manifest.

  Raises
  ------
  UserError
    For an unknown method name (the message lists the known names), an unknown parameter
    name (the message lists the method's parameters), or a value of the wrong type or out of
    range (the message gives the value and the valid range).
  """
  if method_name not in PARAM_SPECS:
    known = ", ".join(sorted(PARAM_SPECS))
    raise UserError(f"Unknown fusion method {method_name!r}: expected one of {known}.")
  specs = PARAM_SPECS[method_name]
  params = {} if params is None else params
  if not isinstance(params, dict):
    raise UserError(
        f"Fusion method {method_name!r}: parameters must be a mapping of name to value, got "
        f"{type(params).__name__}.")
  unknown = sorted(str(key) for key in params if key not in specs)
  if unknown:
    allowed = ", ".join(sorted(specs)) if specs else "none"
    raise UserError(
        f"Fusion method {method_name!r} has no parameter(s) {', '.join(unknown)}: its "
        f"parameters are: {allowed}.")
  return {
      param: spec.check(method_name, param, params[param]) if param in params else spec.default
      for param, spec in specs.items()
  }


def param(method_name: str, param: str, value: Any) -> Any:
  """Checks one parameter value inside a method (cheap: a few comparisons per tensor)."""
  return PARAM_SPECS[method_name][param].check(method_name, param, value)
