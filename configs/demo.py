"""The embedded default: MiniLM-L6 on six shipped datasets, a local store, offline.

Defined in cold_fusion_tf/configs/demo.py (its docstring shows the commands); installed with
the package, so ``--config=demo`` names the same config without this file.
"""

from cold_fusion_tf.configs.demo import get_config  # noqa: F401
