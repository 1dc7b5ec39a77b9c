"""The shipped configs (``--config=demo``, ``roberta_base``, ``bert_base_uncased``, or a path) and
the defaults every config starts from (:mod:`.defaults`). The repository's top-level ``configs/``
folder holds a file per shipped config that imports it."""
