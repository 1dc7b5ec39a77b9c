"""Untrusted JSON: limits that hold whatever the bytes, in time linear in their size."""

from __future__ import annotations

import time

import pytest

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted


def test_nesting_is_measured_outside_strings_only():
  # Prepare
  texts = {'["a\\"[", {"b": [1, "]]]"]}]': 3, '"[[[["': 0, '{"k": "\\\\"}': 1, "": 0}
  # Execute
  found = {text: untrusted.depth(text) for text in texts}
  # Assert
  assert found == texts


@pytest.mark.parametrize("text, seconds", [
    ('"' + '\\"' * 40_000, 0.5), ('"' + '\\"' * 40_000 + "\\", 0.5),
    ('"' + '\\"' * 2_000_000, 5), ('"' * 4_000_001, 5), ('{"a": "' + "x" * 4_000_000, 5)])
def test_a_string_bomb_is_refused_in_linear_time(text, seconds):
  # Prepare: a quote followed by escaped quotes used to be rescanned from every later quote:
  # 80 KB (a safetensors header) took 20 s, 4 MiB (a contribution.json) would take hours.
  data = text.encode()
  # Execute
  start = time.perf_counter()
  with pytest.raises(UserError, match="not valid JSON") as raised:
    untrusted.loads(data, "contribution.json")
  elapsed = time.perf_counter() - start
  # Assert
  assert elapsed < seconds, elapsed
  assert str(raised.value).startswith("contribution.json: not valid JSON (")
