"""Every program on bad flags, flag files, paths and help requests: one `error:` line that says
what is wrong and how to fix it, exit status 2, nothing written (or, for help, exit status 0
and the program's own flags listed)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from test_bad_inputs import REPO, STORE_PROGRAMS, _assert_one_error, _files, _run


@pytest.fixture
def place(tmp_path):
  """An empty folder that programs run in and could write to (checked afterwards)."""
  root = tmp_path / "place"
  root.mkdir()
  return root


# --------------------------------------------------------------------------------------------
# Paths: a URI that is not gs://, or control characters, would silently become a local folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program,args,fragment", [
    ("init", ["--store=gs:/bucket/run"], "--store=gs:/bucket/run: not a local path or a gs:// "
     "URI; did you mean gs://BUCKET/PREFIX"),
    ("init", ["--store=gs:bucket"], "--store=gs:bucket: not a local path or a gs:// URI"),
    ("init", ["--store=GS://bucket/run"], "--store=GS://bucket/run: not a local path"),
    ("fuse", ["--store=s3://bucket/run"], "only Cloud Storage's gs://bucket/prefix URIs"),
    ("fuse", ["--store=store", "--logdir=gs:/bucket/tb"], "--logdir=gs:/bucket/tb: not a local"),
    ("train", ["--store=store", "--config.task=sst2", "--workdir=gs:/bucket/wd"],
     "--workdir=gs:/bucket/wd: not a local path"),
    ("evaluate", ["--base=store,gs:/bucket/run", "--out=out"], "--base=gs:/bucket/run: not a"),
    ("export", ["--store=store", "--out=file:///tmp/x"], "--out=file:///tmp/x: not a local"),
    ("init", ["--store=new\nstore"], "--store='new\\nstore' holds the control character(s) "
     "'\\n'; give a path without them"),
    ("evaluate", ["--base=store", "--out=out\tdir"], "--out='out\\tdir' holds the control"),
])
def test_paths_that_are_not_local_folders_or_gs_uris(program, args, fragment, place):
  # Execute: relative paths land in `place`
  result = _run(program, *args, cwd=place)
  # Assert: one error line; no folder named gs: (or with a newline) was created
  _assert_one_error(result, fragment)
  assert os.listdir(place) == []


# --------------------------------------------------------------------------------------------
# Help: every program lists its own flags, the shared ones included
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", STORE_PROGRAMS)
@pytest.mark.parametrize("how", ["--help", "-h", "--helpshort"])
def test_help_lists_the_programs_flags(program, how, place):
  # Execute
  result = _run(program, how, cwd=place)
  # Assert: the shared flags are listed like the program's own; usage lines are not mangled
  assert result.returncode == 0 and result.stderr == "", result.stderr
  assert "\n  --store: " in result.stdout and "\n  --config: " in result.stdout, result.stdout
  assert ("\n  --workdir: " in result.stdout) == (program == "train")
  assert "default: 'None'" not in result.stdout
  assert not re.search(r"\S {4,}--", result.stdout), result.stdout  # "demo \<newline>" kept
  assert os.listdir(place) == []


def test_the_cold_fusion_command_lists_the_shared_flags(place):
  # Execute
  result = _run([sys.executable, "-m", "cold_fusion_tf"], "init", "--help", cwd=place)
  # Assert
  assert result.returncode == 0 and "\n  --store: " in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------
# Flag files, yes/no flags, stray arguments
# --------------------------------------------------------------------------------------------


def test_flagfiles_that_cannot_be_read(place):
  # Execute
  missing = _run("fuse", f"--flagfile={place / 'none.flags'}", "--store=store", cwd=place)
  folder = _run("fuse", f"--flagfile={place}", "--store=store", cwd=place)
  # Assert: one line each, no traceback
  _assert_one_error(missing, f"--flagfile: cannot read {place / 'none.flags'} (No such file or "
                    "directory); give a readable file of --flags")
  _assert_one_error(folder, f"--flagfile: cannot read {place} (Is a directory)")
  assert os.listdir(place) == []


@pytest.mark.parametrize("config", ["demo", os.path.join(REPO, "configs", "demo.py")])
def test_a_flagfile_is_read_like_the_command_line(config, tmp_path, place):
  # Prepare: a flag file naming the config (a shipped name or a file) and a bad override
  flagfile = tmp_path / "run.flags"
  flagfile.write_text(f"--config={config}\n--config.recipe.batch_size=0\n")
  # Execute
  result = _run("fuse", f"--flagfile={flagfile}", "--store=store", cwd=place)
  # Assert: the override's own error (not "defined twice" or "failed loading")
  _assert_one_error(result, "config.recipe.batch_size=0 is out of range: expected >= 1")
  assert os.listdir(place) == []


@pytest.mark.parametrize("args,fragment", [
    (["--nowatch=1"], "error: --nowatch=1 does not take an argument: a yes/no flag is --NAME or "
     "--noNAME"),
    (["a", "b", "c", "d", "e" * 100], "error: unexpected argument(s) a b c and 2 more: settings "
     "are --flags"),
])
def test_flag_syntax_errors_are_named_as_such(args, fragment, place):
  # Execute
  result = _run("fuse", "--store=store", *args, cwd=place)
  # Assert
  line = _assert_one_error(result, fragment)
  assert "bad --config or override" not in line
  assert os.listdir(place) == []


# --------------------------------------------------------------------------------------------
# Config files that are not Python files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,body,fragment", [
    ("/dev/null", None, "--config=/dev/null: /dev/null is not a regular file"),
    ("settings.txt", "x = 1\n", "settings.txt is not a Python file (.py)"),
    ("empty.py", "", "empty.py defines no get_config() function"),
    ("conf.py:", "def get_config():\n  return None\n", "nothing follows ':'; give --config="),
])
def test_config_files_that_are_no_configs(name, body, fragment, tmp_path, place):
  # Prepare
  path = name if body is None else str(tmp_path / name)
  if body is not None:
    (tmp_path / name.rstrip(":")).write_text(body)
  # Execute
  result = _run("fuse", f"--config={path}", "--store=store", cwd=place)
  # Assert
  _assert_one_error(result, fragment)
  assert os.listdir(place) == []


# --------------------------------------------------------------------------------------------
# Flags that contradict each other, or say nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program,args,fragment", [
    ("keys", ["--id=alice", "--private_key=alice.key", "--public_key=ed25519:x"],
     "--private_key (create a key pair) and --public_key (list a key in a store) are two"),
    ("keys", ["--id=alice", "--private_key=alice.key", "--store=store"],
     "--store=store is given without --public_key"),
    ("inspect", ["--store=store", "--results=results"], "--results shows a results directory "
     "of evaluate; --store is for a store's lineage: give one of them"),
    ("inspect", ["--json", "--results=results"], "--json is for a store's lineage"),
    ("inspect", ["--results=gs://bucket/results"], "--results=gs://bucket/results: evaluate "
     "writes its results to a local directory"),
    ("evaluate", ["--base=store", "--tasks=", "--out=out"], "--tasks='' names no task"),
    ("evaluate", ["--base=store", "--tasks=,", "--out=out"], "--tasks=',' names no task"),
    ("evaluate", ["--base=a", "--store=b", "--out=out"], "--base=a and --store=b: --store is a "
     "shorthand for --base=STORE; give one of them"),
    ("export", ["--store=store", "--out=out", "--iteration=-1"], "--iteration=-1: -1 is not a "
     "non-negative integer"),
    ("export", ["--store=store", "--out=out", "--sequence_length=64"], "--sequence_length=64 "
     "sets the keras-hub preprocessor; --format=hf has none"),
    ("run", ["--store=store", "--config.eval.tasks="], "config.eval.tasks='': expected a "
     "non-empty string"),
    ("run", ["--store=store", "--config.eval.tasks= ,"], "config.eval.tasks=' ,': names no task"),
])
def test_contradicting_or_empty_flags(program, args, fragment, place):
  # Execute
  result = _run(program, *args, cwd=place)
  # Assert: refused before anything is created (no key file, no store, no results)
  _assert_one_error(result, fragment)
  assert _files(place) == [] and os.listdir(place) == []
