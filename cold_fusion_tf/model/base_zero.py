"""Base 0: a new store's first base, published from ``config.model.source``."""

from __future__ import annotations

from typing import Callable

import tf_keras as keras

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.model import sources


def ensure_store(store: store_lib.Store, config, log: Callable[[str], None]) -> None:
  """Creates the store from ``config.model.source`` if needed (publishing base 0); an existing
  store's latest base must be complete (:meth:`Store.check_complete`)."""
  if store.exists() and store.latest() is not None:
    store.check_complete(store.require_latest())
    info = store.run_info()
    source = config.model.source
    if info.get("source_model") and info["source_model"] != source:
      log(f"note: the store was created from {info['source_model']!r}; "
          f"config.model.source={source!r} is ignored.")
    return
  source = sources.resolve_source(config.model.source)
  log(f"creating store {store.uri} from {config.model.source}")
  body, tokenizer = models.load_source_model(source)
  with store_lib.staging_dir("base0") as work:
    models.write_base_dir(body, tokenizer, work, source=source)
    store.create(work, {"source_model": config.model.source,
                        "fusion_method": config.fusion.method,
                        "contributors_per_iteration": config.contributors_per_iteration})
  del body
  keras.backend.clear_session()
