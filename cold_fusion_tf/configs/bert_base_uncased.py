"""The paper's setting with BERT-base-uncased: as configs/roberta_base.py (36 datasets, 8
contributors per iteration, 30 iterations) with the BERT learning rate, 2e-5.

  python -m cold_fusion_tf.run --config=configs/bert_base_uncased.py --store=gs://BUCKET/cf-bert

One contributor (Cloud TPU VM, multi-GPU machine or TF_CONFIG cluster):

  python -m cold_fusion_tf.train --config=configs/bert_base_uncased.py \
      --store=gs://BUCKET/cf-bert --workdir=gs://BUCKET/work-bert/rte \
      --config.task=tfds:glue/rte --config.strategy=auto [--config.tpu=local]
"""

from cold_fusion_tf.configs import roberta_base


def get_config():
  return roberta_base.get_config(model="bert-base-uncased", learning_rate=2e-5)
