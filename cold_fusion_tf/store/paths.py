"""Names that become parts of store paths: validation and formatting, in one place."""

from __future__ import annotations

import re

from cold_fusion_tf.errors import UserError

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


def check_path_part(value: object, what: str) -> str:
  """Returns ``value`` if it is safe as one path component, else raises UserError.

  Safe: 1 to 128 characters from letters, digits, ``.``, ``_`` and ``-``, starting with a
  letter or digit, and not ``.``/``..``. So no ``/``, no control characters, no empty names.
  """
  if not isinstance(value, str) or not _SAFE_PART.fullmatch(value) or value in (".", ".."):
    raise UserError(
        f"{what} {value!r} is not a safe name: use 1-128 characters from letters, digits, "
        "'.', '_' and '-', starting with a letter or digit (it becomes part of a store path)."
    )
  return value


def check_object_name(name: str) -> str:
  """Checks a relative object name built by the code: safe parts joined by ``/``."""
  if name == "":
    return name
  for part in name.split("/"):
    check_path_part(part, "Object name part")
  return name


def iteration_name(iteration: int) -> str:
  """``7`` -> ``"000007"``, the folder name of an iteration."""
  if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 <= iteration <= 999_999:
    raise UserError(f"Iteration {iteration!r} is out of range: expected an integer 0..999999.")
  return f"{iteration:06d}"


def parse_iteration_name(name: str) -> int | None:
  """The iteration number of a folder name such as ``000007``, or None if it is not one."""
  if len(name) == 6 and name.isdigit():
    return int(name)
  return None
