"""Reruns of the loop after an interruption or with changed settings: what is done is reused,
and a change that would mix two configurations is refused before any work."""

import json
import os
import shutil

import pytest

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.simulation import loop
from cold_fusion_tf.simulation import resume
from cold_fusion_tf.simulation import scalars
import tiny


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
  """(source, store) after one iteration of sst2 and trec_coarse (rte held out), no eval."""
  root = tmp_path_factory.mktemp("resume")
  source = tiny.write_tiny_base(str(root / "source"), "bert")
  loop.run(_config(source), str(root / "store"), log=lambda _: None)
  return source, str(root / "store")


def _config(source, **overrides):
  settings = {"fusion.server_optimizer.enabled": False, "eval.enabled": False,
              "iterations": 1}
  settings.update(overrides)
  return tiny.demo_config(source, **settings)


def _copy(one_iteration, tmp_path):
  source, store = one_iteration
  shutil.copytree(store, tmp_path / "store")
  return source, str(tmp_path / "store")


def _files(root):
  """Every file under ``root`` with its modification time."""
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(root) for f in files}


def _fused(store, iteration):
  with open(os.path.join(store, "bases", f"{iteration:06d}", "manifest.json")) as f:
    return sorted(c["dataset"] for c in json.load(f)["fusion"]["contributions"])


def _interrupt_contributor(monkeypatch, after):
  """The loop's contributors stop (as Ctrl-C does) once ``after`` of them have finished."""
  real, done = loop.contributor.contribute, []

  def contribute(*args, **kwargs):
    if len(done) >= after:
      raise KeyboardInterrupt
    done.append(real(*args, **kwargs))
    return done[-1]
  monkeypatch.setattr(loop.contributor, "contribute", contribute)


@pytest.mark.parametrize("overrides,message", [
    # trec_coarse was trained on (fused into base 1): reporting it as held out would be false.
    ({"pool": ("sst2", "rte"), "heldout": ("trec_coarse",)},
     r"config.heldout: trec_coarse was fused into base\(s\) 1 of "),
    ({"model.source": "OTHER"}, "was created from "),
])
def test_a_rerun_that_contradicts_the_store_is_refused_before_any_work(
    one_iteration, tmp_path, overrides, message):
  # Prepare
  source, store = _copy(one_iteration, tmp_path)
  overrides = {k: str(tmp_path / "other") if v == "OTHER" else v for k, v in overrides.items()}
  config = _config(source, iterations=2, **overrides)
  before = _files(store)
  lines = []
  # Execute / Assert
  with pytest.raises(UserError, match=message) as raised:
    loop.run(config, store, log=lines.append)
  assert "use a new --store" in str(raised.value)
  assert _files(store) == before and not lines


def test_an_open_iteration_is_finished_with_its_own_settings(one_iteration, tmp_path,
                                                             monkeypatch):
  # Prepare: iteration 1 stopped after its first contributor (sst2).
  source, store = _copy(one_iteration, tmp_path)
  with monkeypatch.context() as patch:
    _interrupt_contributor(patch, after=1)
    with pytest.raises(KeyboardInterrupt):
      loop.run(_config(source, iterations=2), store, log=lambda _: None)
  assert os.listdir(os.path.join(store, "contributions", "000001")) == ["sst2"]
  before = _files(store)
  # Execute / Assert: another recipe, pool or fusion for the open iteration is refused, and
  # nothing is written.
  for overrides, fragment in [
      ({"recipe.learning_rate": 5e-4}, "config.recipe.learning_rate=0.001 (now 0.0005)"),
      ({"pool": ("sst2", "ag_news")}, "contributors sst2, trec_coarse (now sst2, ag_news"),
      ({"contributors_per_iteration": 1, "seed": 3}, "contributors sst2, trec_coarse (now "),
      ({"fusion.method": "median"}, "config.fusion.method='mean' (now 'median')"),
  ]:
    with pytest.raises(UserError, match="iteration 1 was started with other settings") as e:
      loop.run(_config(source, iterations=2, **overrides), store, log=lambda _: None)
    assert fragment in str(e.value) and "use a new --store" in str(e.value)
    assert _files(store) == before
  # Execute: the same settings (and a changed evaluation, which the runs are keyed by)
  lines = []
  loop.run(_config(source, iterations=2, **{"eval.seeds": 1}), store, log=lines.append)
  # Assert: only trec_coarse trained; base 2 fuses exactly the two chosen contributions.
  assert "[sst2] already contributed to iteration 1; reusing it" in lines
  assert not [l for l in lines if l.startswith("[sst2") and "training" in l]
  assert _fused(store, 2) == ["sst2", "trec_coarse"]
  # Execute: the next iteration takes a new recipe.
  loop.run(_config(source, iterations=3, **{"recipe.learning_rate": 5e-4}), store,
           log=lambda _: None)
  # Assert
  record = json.load(open(os.path.join(store, resume.record_name(2))))
  assert record["recipe"]["learning_rate"] == 5e-4 and _fused(store, 3) == ["sst2",
                                                                             "trec_coarse"]


def test_fusion_scalars_of_a_base_published_by_a_stopped_run(one_iteration, tmp_path,
                                                             monkeypatch):
  # Prepare: the run stops right after publishing base 2, before recording its scalars.
  source, store = _copy(one_iteration, tmp_path)

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt
  with monkeypatch.context() as patch:
    patch.setattr(scalars.RunScalars, "fusion", stopped)
    with pytest.raises(KeyboardInterrupt):
      loop.run(_config(source, iterations=2), store, log=lambda _: None)
  assert open(os.path.join(store, "LATEST")).read().strip() == "2"
  # Execute: the rerun
  loop.run(_config(source, iterations=2), store, log=lambda _: None)
  # Assert: every published base has its points; base 2's seconds are not known any more.
  points = scalars.RunScalars(os.path.join(store, scalars.DIRECTORY)).read()
  assert points["fusion/contributions_fused"] == {1: 2.0, 2: 2.0}
  assert set(points["fusion/update_norm_mean"]) == {1, 2}
  assert set(points["fusion/seconds"]) == {1}


def test_a_bad_logdir_is_refused_before_the_store_is_made(one_iteration, tmp_path):
  # Prepare
  source, _ = one_iteration
  # Execute / Assert
  with pytest.raises(UserError, match="--logdir=gs://bucket/logs: give a local folder"):
    loop.run(_config(source), str(tmp_path / "store"), log=lambda _: None,
             logdir="gs://bucket/logs")
  assert not os.path.exists(tmp_path / "store")


def test_fewer_iterations_than_the_store_has_says_so(one_iteration, tmp_path):
  # Prepare
  source, store = _copy(one_iteration, tmp_path)
  lines = []
  # Execute
  loop.run(_config(source, iterations=0), store, log=lines.append)
  # Assert: nothing trained, and the output says why.
  assert any("the store is at base 1, past config.iterations=0" in l for l in lines)
  assert not [l for l in lines if l.startswith("=== iteration")]
  assert open(os.path.join(store, "LATEST")).read().strip() == "1"
