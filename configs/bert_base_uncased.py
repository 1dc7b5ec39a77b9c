"""The paper's setting with BERT-base-uncased: as configs/roberta_base.py (36 datasets, 8
contributors per iteration, 30 iterations) with the BERT learning rate, 2e-5.

  python -m cold_fusion_tf.run --config=configs/bert_base_uncased.py --store=gs://BUCKET/cf-bert

One contributor (Cloud TPU VM, multi-GPU machine or TF_CONFIG cluster):

  python -m cold_fusion_tf.train --config=configs/bert_base_uncased.py \
      --store=gs://BUCKET/cf-bert --workdir=gs://BUCKET/work-bert/rte \
      --config.task=tfds:glue/rte --config.strategy=auto [--config.tpu=local]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roberta_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return roberta_base.get_config(model="bert-base-uncased", learning_rate=2e-5)
