"""A large split is tokenized a chunk at a time: the same ids as in one call, without the
tokenizer's per-token objects for the whole split in memory at once."""

import numpy as np

from cold_fusion_tf.data import Split
from cold_fusion_tf.training import inputs
import tiny


class _CountingTokenizer:
  """A tokenizer that records how many texts each call gets."""

  def __init__(self, tokenizer):
    self.tokenizer, self.calls = tokenizer, []

  def __call__(self, texts, pairs=None, **kwargs):
    self.calls.append(len(texts))
    return self.tokenizer(texts, pairs, **kwargs)

  def __len__(self):
    return len(self.tokenizer)

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)


def test_a_split_is_tokenized_in_chunks_with_the_ids_of_one_call(monkeypatch):
  # Prepare: 23 sentence pairs, some long enough to be truncated, non-English and emoji text
  texts = [f"example {i} " + "word " * (i * 3) + "\u0645\u0631\u062d\u0628\u0627 \U0001f600"
           for i in range(23)]
  split = Split(texts, [f"second {i} \u05e9\u05dc\u05d5\u05dd" for i in range(23)],
                np.arange(23, dtype=np.int32) % 3)
  tokenizer = tiny.bert_tokenizer()
  whole = tokenizer(split.texts, split.pairs, truncation=True, max_length=32, padding=False)
  counting = _CountingTokenizer(tokenizer)
  monkeypatch.setattr(inputs, "TOKENIZE_CHUNK", 5)
  # Execute
  encoded = inputs.encode(counting, split, max_length=32, body_type="chunk-test")
  # Assert: calls of at most 5 texts, and the very ids, segment ids and lengths of one call
  assert counting.calls == [5, 5, 5, 5, 3]
  assert encoded.lengths.tolist() == [len(x) for x in whole["input_ids"]]
  assert max(encoded.lengths) == 32 and encoded.labels.tolist() == split.labels.tolist()
  for i in range(23):
    assert encoded.row(i).tolist() == whole["input_ids"][i]
    assert encoded.row_types(i).tolist() == whole["token_type_ids"][i]
