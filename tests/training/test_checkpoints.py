"""Training checkpoints in a workdir: a damaged checkpoint, a checkpoint that cannot be written
and a workdir another process trains in each end with one clear UserError (no model: a few
variables stand for the training state)."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.training import checkpoints

FINGERPRINT = {"task": "sst2", "run_key": "base-sha:alice"}


def _checkpoints(workdir: str) -> checkpoints.Checkpoints:
  weights = tf.Variable(tf.random.stateless_normal([256, 256], seed=[1, 2]), name="weights")
  return checkpoints.Checkpoints(workdir, tf.distribute.get_strategy(), FINGERPRINT,
                                 model=tf.train.Checkpoint(weights=weights))


def test_a_saved_state_is_restored(tmp_path):
  # Prepare
  _checkpoints(str(tmp_path)).save(5, {"step": 5, "best_step": 5})
  # Execute
  state = _checkpoints(str(tmp_path)).restore()
  # Assert
  assert state["step"] == 5 and state["fingerprint"] == FINGERPRINT


def test_a_truncated_checkpoint_is_one_clear_error(tmp_path):
  # Prepare: the data file cut short (a disk that filled up, a copy that stopped)
  _checkpoints(str(tmp_path)).save(5, {"step": 5})
  folder = tmp_path / "checkpoints"
  (data,) = [name for name in os.listdir(folder) if ".data-" in name]
  with open(folder / data, "r+b") as f:
    f.truncate(1000)
  # Execute
  with pytest.raises(UserError) as error:
    _checkpoints(str(tmp_path)).restore()
  # Assert: not TensorFlow's IndexError ("Read less bytes than requested")
  assert "ckpt-5: cannot restore this checkpoint" in str(error.value)
  assert f"delete {folder}" in str(error.value)


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(tmp_path):
  # Prepare: a file where the checkpoints folder goes, so TensorFlow's write fails
  (tmp_path / "checkpoints").write_text("in the way")
  saver = _checkpoints(str(tmp_path))
  # Execute
  with pytest.raises(UserError) as error:
    saver.save(5, {"step": 5})
  # Assert: one message that names the folder and what to do, not a tf.errors.OpError
  assert str(error.value).startswith(f"{tmp_path / 'checkpoints'}: cannot write the checkpoint "
                                     "of step 5 (")
  assert "use another --workdir" in str(error.value)


def test_a_workdir_is_used_by_one_process_at_a_time(tmp_path):
  # Prepare
  workdir = str(tmp_path / "work")
  with checkpoints.workdir_lock(workdir):
    # Execute: a second holder (flock conflicts between open files, also in one process)
    with pytest.raises(UserError) as error:
      with checkpoints.workdir_lock(workdir):
        pass
  # Assert
  assert f"--workdir={workdir}: another process is training in it" in str(error.value)
  # Execute: free again once the first holder is done
  with checkpoints.workdir_lock(workdir):
    pass
  # Assert: a gs:// workdir takes no lock (and no request is made)
  with checkpoints.workdir_lock("gs://bucket/work"):
    with checkpoints.workdir_lock("gs://bucket/work"):
      pass
