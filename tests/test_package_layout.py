"""The package's shape: no import cycles between its modules (lazy imports included) and no
module longer than about 400 lines of code, so each concept reads in one sitting."""

from __future__ import annotations

import ast
import os

import cold_fusion_tf

PACKAGE = os.path.dirname(cold_fusion_tf.__file__)
MAX_CODE_LINES = 420


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
  return found


def _imports(tree: ast.AST, modules: dict) -> set[str]:
  """The package modules a module imports anywhere in its code."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
  return {name for name in out if name in modules}


def _code_lines(tree: ast.AST, source: str) -> int:
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      first = node.body[0] if node.body else None
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        docstrings.update(range(first.lineno, first.end_lineno + 1))
  return sum(1 for number, line in enumerate(source.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#") and number not in docstrings)


def test_no_module_imports_itself_through_others():
  # Prepare
  modules = _modules()
  graph = {name: _imports(ast.parse(open(path).read()), modules) - {name}
           for name, path in modules.items()}
  # Execute: depth-first search for a path back to a module on the stack.
  cycles, state, stack = [], {}, []

  def visit(name):
    state[name] = "open"
    stack.append(name)
    for other in sorted(graph[name]):
      if state.get(other) == "open":
        cycles.append(stack[stack.index(other):] + [other])
      elif other not in state:
        visit(other)
    stack.pop()
    state[name] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name)
  # Assert
  assert len(modules) > 40
  assert cycles == []


def test_every_module_reads_in_one_sitting():
  # Prepare / Execute
  sizes = {}
  for name, path in _modules().items():
    source = open(path).read()
    sizes[name] = _code_lines(ast.parse(source), source)
  # Assert
  too_long = {name: lines for name, lines in sizes.items() if lines > MAX_CODE_LINES}
  assert too_long == {}
  assert max(sizes.values()) > 100  # the count sees code, not only docstrings
