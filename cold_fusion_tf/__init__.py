"""cold_fusion_tf: ColD Fusion (collaborative descent for distributed multitask fine-tuning)
in TensorFlow / Keras.

Contributors fine-tune the shared base on private data with a fresh head and upload only the
encoder body to a store; a fusion job averages the bodies into the next base model.
"""

import os as _os

# transformers' TensorFlow models are tf-keras (Keras 2) models; keras-hub uses Keras 3.
_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"

# Loaded on first use, so `import cold_fusion_tf` stays light (no TensorFlow import).
_LAZY = {"load_base": "interop.keras_api", "keras_classifier": "interop.keras_api",
         "load_classifier": "interop.keras_api",
         "compile_classifier": "interop.keras_api"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
