"""A published base as a self-contained model directory with a model card (the export program).

``--format=hf`` (default): a Hugging Face directory (config, ``model.safetensors``,
tokenizer files) for ``TFAutoModel`` / ``AutoModel.from_pretrained`` and
``cold_fusion_tf.load_base``. ``--format=keras_hub``: a keras-hub preset for
``keras_hub.models.Backbone.from_preset`` and ``TextClassifier.from_preset`` (BERT and
RoBERTa). Both hold ``README.md`` (the model card: lineage, evaluation table if the run
evaluated the bases) and ``cold_fusion_lineage.json``. The latest base is exported unless
``--iteration`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Optional

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import tokenizer as tokenizer_lib
from cold_fusion_tf.store.backends import local
from cold_fusion_tf.store.layout import RUN_FILE

FORMATS = ("hf", "keras_hub")
CARD = "README.md"
LINEAGE = "cold_fusion_lineage.json"


def export_model(store_uri: str, out_dir: str, iteration: Optional[int] = None,
                 fmt: str = "hf", license_name: str = "other",
                 sequence_length: Optional[int] = None,
                 log: Callable[[str], None] = print) -> str:
  """Writes base ``iteration`` (default: latest) of a store to ``out_dir``; returns it.

  ``out_dir`` must be a local path that does not exist or is an empty directory, outside any
  store, in a folder where files can be created (checked before the base is read). The
  directory is assembled beside it and renamed into place, so it is complete or absent.
  """
  from cold_fusion_tf.interop import model_card  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.store import refs  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}.")
  if not out_dir or "://" in out_dir:
    raise UserError(f"--out={out_dir!r}: expected a local directory.")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f"--out={out_dir}: exists and is not an empty directory; choose a new one.")
  parent = os.path.dirname(out_dir)
  folder = out_dir
  while os.path.dirname(folder) != folder:  # out_dir and every folder above it
    if os.path.isfile(os.path.join(folder, RUN_FILE)):
      raise UserError(f"--out={out_dir}: inside the store {folder}, which holds only what runs "
                      "publish; choose a folder outside it.")
    folder = os.path.dirname(folder)
  local.check_writable_folder(parent, f"--out={out_dir}")
  ref = refs.resolve(store_uri, iteration, what="--store")
  if ref.store is None:
    raise UserError(f"--store={store_uri}: a model directory, not a store; export reads a "
                    "base and its lineage from a store.")
  store, iteration, base_dir = ref.store, ref.iteration, ref.directory
  lineage = model_card.lineage(store, iteration)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  except OSError as e:
    raise _cannot_write(out_dir, e) from None
  try:
    if fmt == "hf":  # each file hashed as it is copied: exactly what the manifest names
      store.copy_base(iteration, staging)
      try:  # no code for its users to run (the copies checked: what is exported)
        for name in ("config.json", "tokenizer_config.json"):
          tokenizer_lib.read_settings(staging, name)
      except UserError as e:
        raise UserError(str(e).replace(staging, f"{store.uri}/{store.base_prefix(iteration)}")
                        ) from None
    else:
      from cold_fusion_tf.interop import keras_hub as keras_hub_export  # pylint: disable=g-import-not-at-top
      keras_hub_export.export_preset(base_dir, staging, sequence_length)
    with open(os.path.join(staging, CARD), "w", encoding="utf-8") as f:
      f.write(model_card.render(lineage, fmt, license_name))
    with open(os.path.join(staging, LINEAGE), "w", encoding="utf-8") as f:
      json.dump(lineage, f, indent=2, sort_keys=True)
      f.write("\n")
    os.chmod(staging, 0o755)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)
    os.replace(staging, out_dir)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, OSError):
      raise _cannot_write(out_dir, e) from None
    raise
  log(f"exported base {iteration} of {store.uri} ({fmt}) to {out_dir}")
  return out_dir


def _cannot_write(out_dir: str, error: OSError) -> UserError:
  return UserError(f"--out={out_dir}: cannot write the model directory "
                   f"({local.os_reason(error)}); nothing was left behind. Give an --out you "
                   "may write to, on a disk with free space.")
