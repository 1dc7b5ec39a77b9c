"""The paper's setting with roberta-base (36 datasets, 8 contributors per iteration).

Defined in cold_fusion_tf/configs/roberta_base.py (its docstring shows the commands); installed with
the package, so ``--config=roberta_base`` names the same config without this file.
"""

from cold_fusion_tf.configs.roberta_base import get_config  # noqa: F401
