"""``cold-fusion <program> [flags]``: every program of the package behind one command.

  cold-fusion run --config=demo --store=stores/demo
  cold-fusion train --config=demo --store=stores/demo --config.task=sst2
  cold-fusion fuse --help

``cold-fusion <program>`` is the same as ``python -m cold_fusion_tf.<program>`` (also
``python -m cold_fusion_tf <program>``): the same flags, output and exit status.
"""

from __future__ import annotations

import importlib
import sys

PROGRAMS = {
    "run": "the whole loop on one machine: contributors, fusion, evaluation, report",
    "init": "create a store: publish base 0 from config.model.source",
    "train": "one contributor: fine-tune the latest base on a dataset, upload the body",
    "fuse": "validate and fuse the latest contributions, publish the next base",
    "evaluate": "model recycling: fine-tune bases and a reference on target tasks",
    "export": "write a base as a model directory with a model card (HF or keras-hub)",
    "inspect": "print a store's lineage (or an evaluate results directory)",
    "rollback": "withdraw published bases: move LATEST back to an earlier base",
    "keys": "signing keys: make a contributor's key pair, list a public key in a store",
}


def usage() -> str:
  width = max(len(name) for name in PROGRAMS)
  lines = [f"  {name:<{width}}  {text}" for name, text in PROGRAMS.items()]
  return ("usage: cold-fusion <program> [--flags]  (cold-fusion <program> --help for its flags)"
          "\n\nprograms:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
  """Runs the program named by the first argument with the remaining arguments."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in PROGRAMS:
    print(f"error: unknown program {name!r}; the programs are {', '.join(PROGRAMS)} "
          "(cold-fusion --help).", file=sys.stderr)
    sys.exit(2)
  # As `python -m cold_fusion_tf.<name>`: absl's --help shows the flags of the module named
  # by argv[0] and the docstring of __main__.
  sys.argv = [f"cold_fusion_tf.{name}", *argv[2:]]
  module = importlib.import_module(f"cold_fusion_tf.{name}")
  if hasattr(module, "define_flags"):  # a program that defines its flags only when run
    module.define_flags()
  sys.modules["__main__"].__doc__ = module.__doc__
  from cold_fusion_tf import cli  # pylint: disable=g-import-not-at-top
  cli.run(module.main)


if __name__ == "__main__":
  main()
