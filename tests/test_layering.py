"""Imports run one way, ``train -> configs -> fibjax -> pallas_kernels``, and never in a circle.

Inside a package the folders are layers too: in ``train``, ``cli`` (the frame every command runs
in, imported by commands in every folder) ``<- data <- run <- probe <- study <-`` the command
modules at its root; in ``pallas_kernels``, the shared modules at its root are
imported by the kernel families (``attention``, ``decode``, ``norm``), which never import each other.

Every module of those packages is read with ``ast`` (imports inside functions included); each
import of a module of the project is an edge. An edge to a package further up (or to
``benchmarks``/``tests``, which may import anything but nothing may import) fails, and so does
any cycle of edges between modules.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS: tuple[str, ...] = ("pallas_kernels", "fibjax", "configs", "train")  # bottom to top
ABOVE_ALL: tuple[str, ...] = ("benchmarks", "tests")

# Known violations that are being fixed on other branches: (importer, imported) edges, ignored here.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset({
})


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
  """Module name -> file, for every ``.py`` file of the layered packages."""
  return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _top(name: str) -> str:
  return name.split(".")[0]


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module an ``ImportFrom`` names (relative imports resolved against ``importer``)."""
  if not node.level:
    return node.module or ""
  package = importer.split(".") if is_package else importer.split(".")[:-1]
  base = package[:len(package) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The project modules that module ``name`` imports anywhere in its file. ``from a import b``
  imports module ``a.b`` when it exists, else names from ``a``."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      module = _resolve(name, path.name == "__init__.py", node)
      for alias in node.names:
        found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
  return {m for m in found if _top(m) in LAYERS + ABOVE_ALL and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = project_modules()
  known = set(modules)
  return {name: imports_of(name, path, known) - {b for a, b in KNOWN_VIOLATIONS if a == name}
          for name, path in modules.items()}


# Folders of a package from the bottom up; "" is the package's own root modules.
SUBLAYERS: dict[str, tuple[str, ...]] = {"train": ("cli", "data", "run", "probe", "study", ""),
                                         "pallas_kernels": ("", "family")}
FAMILIES: tuple[str, ...] = ("attention", "decode", "norm")  # pallas_kernels' kernel families


def _folder(module: str) -> str:
  """The folder of ``module`` inside its package ("" for the package's root modules)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBLAYERS.get(parts[0], ()) + FAMILIES) else ""


def _rank(module: str) -> tuple[int, int]:
  top = _top(module)
  layer = LAYERS.index(top) if top in LAYERS else len(LAYERS)
  folder = _folder(module)
  folder = "family" if top == "pallas_kernels" and folder in FAMILIES else folder
  order = SUBLAYERS.get(top, ("",))
  if module == top:  # the package's __init__: its public API, above its own folders
    return layer, len(order)
  return layer, order.index(folder) if folder in order else 0


def _across_families(a: str, b: str) -> bool:
  """``a`` and ``b`` lie in two different kernel families of ``pallas_kernels``."""
  fa, fb = _folder(a), _folder(b)
  return _top(a) == _top(b) == "pallas_kernels" and fa in FAMILIES and fb in FAMILIES and fa != fb


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  return sorted((a, b) for a, targets in graph.items() for b in targets
                if _rank(b) > _rank(a) or _across_families(a, b))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_every_layered_module_is_read():
  modules = project_modules()
  for layer in LAYERS:
    assert layer in modules and f"{layer}.__init__" not in modules
  assert "fibjax.layers" in modules and "train.run.trainer" in modules


def test_no_upward_import():
  assert upward_imports(import_graph()) == []


def test_no_import_cycle():
  assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for():
  graph = {"fibjax.layers": {"pallas_kernels.decode.block", "fibjax.decode"},
           "pallas_kernels.decode.block": {"fibjax.layers"}, "fibjax.decode": {"benchmarks.timing"},
           "train.run.trainer": {"train.probe.evaluate", "configs"}, "train.probe.evaluate": {"train.run.step"},
           "train.run.step": {"train.run.trainer"}}
  assert upward_imports(graph) == [("fibjax.decode", "benchmarks.timing"),
                                   ("pallas_kernels.decode.block", "fibjax.layers"),
                                   ("train.run.trainer", "train.probe.evaluate")]
  assert sorted(cycles(graph)) == [["fibjax.layers", "pallas_kernels.decode.block"],
                                   ["train.probe.evaluate", "train.run.step", "train.run.trainer"]]


def test_folders_inside_a_package_are_layers():
  graph = {"train.data.text": {"train.run.step"}, "train.study.sweep": {"train.probe.evaluate", "train.data.text"},
           "train.evaluate": {"train.probe.evaluate"}, "train.run.trainer": {"train.evaluate"},
           "train.data.prepare": {"train.cli"}, "train.cli": {"train.run.step"},
           "pallas_kernels.decode.block": {"pallas_kernels.attention.ops", "pallas_kernels.tile_math"},
           "pallas_kernels.tile_math": {"pallas_kernels.norm.rmsnorm"}}
  assert upward_imports(graph) == [("pallas_kernels.decode.block", "pallas_kernels.attention.ops"),
                                   ("pallas_kernels.tile_math", "pallas_kernels.norm.rmsnorm"),
                                   ("train.cli", "train.run.step"), ("train.data.text", "train.run.step"),
                                   ("train.run.trainer", "train.evaluate")]


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
  source = tmp_path / "m.py"
  source.write_text("from . import sibling\n\ndef f():\n  from .. import ops\n  from ..ops import name\n"
                    "  import train.run.trainer\n")
  known = {"pallas_kernels.ops", "pallas_kernels.sub.sibling", "train.run.trainer"}
  assert imports_of("pallas_kernels.sub.m", source, known) == {"pallas_kernels.sub.sibling", "pallas_kernels.ops",
                                                                "train.run.trainer"}
