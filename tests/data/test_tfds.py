"""TFDS datasets that cannot be had: one error naming the dataset, fast, nothing on stdout."""

import logging
import socket

from absl import logging as absl_logging
import pytest

from cold_fusion_tf.data import tfds as tfds_source
from cold_fusion_tf.errors import UserError


def _no_name_resolution(asked: list):
  """A getaddrinfo under which no host name resolves; the names asked go into ``asked``."""

  def getaddrinfo(host, *args, **kwargs):
    del args, kwargs
    asked.append(host)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  return getaddrinfo


def test_download_without_network_is_one_error_naming_the_dataset(tmp_path, monkeypatch, capsys):
  # Prepare: no host name resolves, as on a machine without internet (also on one with it).
  asked = []
  monkeypatch.setattr(socket, "getaddrinfo", _no_name_resolution(asked))
  # Execute / Assert
  with pytest.raises(UserError, match=r"^tfds:glue/rte: cannot download and prepare it \(cannot "
                     r"connect to [\w.-]+\); on a machine without internet, prepare it elsewhere "
                     r"and copy .* here, or give a folder dataset\.$"):
    tfds_source.load("glue/rte", data_dir=str(tmp_path))
  # Assert: a few tries, not tfds's own 10 retries (about 3.5 minutes of back-off); nothing
  # went to stdout.
  assert 1 <= len(asked) <= tfds_source.DOWNLOAD_RETRIES + 1
  assert "Downloading and preparing" not in capsys.readouterr().out


def test_what_tfds_prints_while_preparing_goes_to_the_log_not_stdout(monkeypatch, capsys,
                                                                      caplog):
  # Prepare: mocked data, prepared by a download_and_prepare that prints tfds's own two notes.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top

  def download_and_prepare(builder, *args, **kwargs):
    del args, kwargs
    builder._log_download_bytes()  # pylint: disable=protected-access
    builder._log_download_done()  # pylint: disable=protected-access

  caplog.set_level(logging.INFO)
  verbosity = absl_logging.get_verbosity()  # programs run in this process may have lowered it
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    with tfds.testing.mock_data(num_examples=20):
      monkeypatch.setattr(dataset_builder.DatasetBuilder, "download_and_prepare",
                          download_and_prepare)
      # Execute
      task = tfds_source.load("glue/rte")
  finally:
    absl_logging.set_verbosity(verbosity)
  # Assert
  assert len(task.splits["test"]) == 20
  assert capsys.readouterr().out == ""
  notes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
  assert any(n.startswith("Downloading and preparing dataset") for n in notes)
  assert any("downloaded and prepared" in n for n in notes)


@pytest.mark.parametrize("name,cause", [
    ("glu/rte", r"Dataset glu not found"),
    ("a b", r"Parsing builder name string a b failed"),
])
def test_unknown_name_is_one_short_error(tmp_path, name, cause):
  # Execute / Assert: the cause without tfds's list of every dataset it has.
  with pytest.raises(UserError, match=rf"^tfds:{name}: not a TensorFlow Datasets name \({cause}\); "
                     r"see https://www.tensorflow.org/datasets/catalog/overview\.$"):
    tfds_source.load(name, data_dir=str(tmp_path))
