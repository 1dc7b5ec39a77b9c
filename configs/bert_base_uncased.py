"""The paper's setting with bert-base-uncased (learning rate 2e-5).

Defined in cold_fusion_tf/configs/bert_base_uncased.py (its docstring shows the commands); installed with
the package, so ``--config=bert_base_uncased`` names the same config without this file.
"""

from cold_fusion_tf.configs.bert_base_uncased import get_config  # noqa: F401
