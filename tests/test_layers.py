"""The package's floors: every import points down a layer, no binary imports another,
and only the binaries, `app.config_schema` and configs/ see ml_collections."""

import ast
import os

from tests.xla_env import REPO

PACKAGE = os.path.join(REPO, "tokenflex_jax")
# Lower imports lower or equal; docs/architecture.md draws the same order.
LAYERS = {"errors": 0, "paths": 0, "entry": 0, "sharding": 0, "hf_remote": 0, "models": 1,
          "specs": 2, "model_config": 2, "data": 3, "training": 4, "evaluation": 5, "app": 6,
          "benchmarking": 7, "studies": 7}
BINARIES = {"train", "pretrain_vision", "eval", "predict", "aot", "bench", "microbench",
            "gpu_check", "probe", "report", "crash_test", "convert", "score", "sweep",
            "data.packing"}  # the planner: a binary beside the data it plans
BINARY = 9


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _floor(module: str) -> int | None:
  """The layer of ``tokenflex_jax.X...`` (None: the package itself)."""
  parts = module.split(".")[1:]
  if not parts:
    return None
  if parts[0] in BINARIES or ".".join(parts[:2]) in BINARIES:
    return BINARY
  return LAYERS[parts[0]]


def _binary(module: str) -> str:
  parts = module.split(".")[1:]
  return ".".join(parts[:2]) if ".".join(parts[:2]) in BINARIES else parts[0]


def _imports(path: str) -> list[str]:
  """The tokenflex_jax modules ``path`` imports at run time (not under TYPE_CHECKING)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  typing_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
  out = []
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenflex_jax"):
      out += ([f"tokenflex_jax.{a.name}" for a in node.names]
              if node.module == "tokenflex_jax" else [node.module])
    elif isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.startswith("tokenflex_jax")]
  return out


def test_every_module_has_a_floor():
  unknown = {m for m, _ in _modules() if m != "tokenflex_jax" and
             m.split(".")[1] not in LAYERS and m.split(".")[1] not in BINARIES}
  assert not unknown, f"add these to LAYERS or BINARIES: {sorted(unknown)}"


def test_imports_point_down_and_binaries_do_not_import_binaries():
  wrong = []
  for module, path in _modules():
    floor = _floor(module)
    for target in _imports(path):
      to = _floor(target)
      if floor is None or to is None:
        continue
      if to > floor or (to == floor == BINARY and _binary(target) != _binary(module)):
        wrong.append(f"{module} (floor {floor}) imports {target} (floor {to})")
  assert not wrong, "\n".join(wrong)


def test_only_the_binaries_and_the_schema_see_ml_collections():
  allowed = {"tokenflex_jax.app.config_schema", "tokenflex_jax.app.saved_config"}
  seeing = set()
  for module, path in _modules():
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    if any(name.split(".")[0] == "ml_collections" for name in names):
      seeing.add(module)
  assert {m for m in seeing if _floor(m) != BINARY} <= allowed, seeing


def test_a_wrong_way_import_would_be_caught(tmp_path):
  """The floor of a lower module importing a higher one is below the target's."""
  assert _floor("tokenflex_jax.training.loop") < _floor("tokenflex_jax.app.cli")
  assert _floor("tokenflex_jax.models.vlm") < _floor("tokenflex_jax.data.pipeline")
  source = tmp_path / "m.py"
  source.write_text("from tokenflex_jax.app import cli\nfrom typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n  from tokenflex_jax import train\n")
  assert _imports(str(source)) == ["tokenflex_jax.app"]
