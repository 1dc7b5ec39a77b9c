"""cold_fusion_tf: ColD Fusion (collaborative descent for distributed multitask fine-tuning)
in TensorFlow / Keras.

Contributors fine-tune the shared base on private data with a fresh head and upload only the
encoder body to a store; a fusion job averages the bodies into the next base model.
"""

import os as _os

# transformers' TensorFlow models are tf-keras (Keras 2) models; keras-hub uses Keras 3.
_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"
