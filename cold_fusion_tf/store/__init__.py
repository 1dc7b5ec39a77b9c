"""The store: a local directory or ``gs://bucket/prefix`` shared by contributors and the fuser.

* :mod:`.layout`: the protocol (every object name and schema);
* :mod:`.store`: :class:`Store`, the one door to a store's objects;
* :mod:`.backends`: local directories and GCS;
* :mod:`.refs`: which base a reference (``STORE``, ``STORE@N``, a directory) means;
* :mod:`.lineage`: what a store holds, for ``inspect`` and model cards;
* :mod:`.paths`: names that become path parts.
"""

from cold_fusion_tf.store.layout import (BODY, CONTRIBUTION, FORMAT_VERSION, LATEST_FILE,
                                         MANIFEST, MODEL, PLAN, RUN_FILE, STATE,
                                         check_contribution_meta, check_manifest, check_sha)
from cold_fusion_tf.store.store import Contribution, LostRace, Store, staging_dir

__all__ = ["BODY", "CONTRIBUTION", "Contribution", "FORMAT_VERSION", "LATEST_FILE",
           "LostRace", "MANIFEST", "MODEL", "PLAN", "RUN_FILE", "STATE", "Store",
           "check_contribution_meta", "check_manifest", "check_sha", "staging_dir"]
