"""The fusion job: validate the latest iteration's contributions, fuse them, publish the next base.

* :mod:`.settings`: what a job does (:class:`Settings`, from ``config.fusion``);
* :mod:`.validation`: each contribution checked; any problem is its rejection;
* :mod:`.trust`: no contributor decides the base (duplicates, norm bounds or clipping,
  outliers, direction, capped weights) and the fused base is checked before publishing;
* :mod:`.plan`: what is fused, fixed once per iteration in the store;
* :mod:`.stream`: the fusion pass, tensor by tensor in chunks;
* :mod:`.speculative`: the fusion pass made while validating (or checking directions),
  kept when the plan fuses exactly those bodies;
* :mod:`.methods`, :mod:`.params`: the fusion rules (mean, weighted, TIES, DARE, ...);
* :mod:`.server_optimizer`, :mod:`.robust`: the outer optimizer step and robust statistics;
* :mod:`.job`: one fusion, start to publish; :mod:`.watch`: the fuse program's waiting loop.
"""

from cold_fusion_tf.fusion.job import fuse, fuse_config
from cold_fusion_tf.fusion.settings import Outcome, Settings
from cold_fusion_tf.fusion.stream import fuse_files
from cold_fusion_tf.fusion.validation import Validations
from cold_fusion_tf.fusion.watch import run

__all__ = ["Outcome", "Settings", "Validations", "fuse", "fuse_config", "fuse_files", "run"]
