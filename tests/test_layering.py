"""Layering: models never import the training machinery or the experiments above them.

Multi-stage training (Faster R-CNN's 4 steps, R-CNN's stages) and starting from another run are
orchestration: they live in jaxdet.train and experiments and call the models, never the other
way round. Every import statement of every module under jaxdet/models is read with `ast`,
including imports inside functions.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "jaxdet" / "models"
FORBIDDEN = ("jaxdet.train", "experiments")


def imported_modules(source: str) -> list[tuple[int, str]]:
  """(line, module) of every import in `source`; `from a import b` gives a.b as well as a, so
  that `from jaxdet import train` is seen as jaxdet.train."""
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = "." * node.level + (node.module or "")
      out.append((node.lineno, base))
      out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
  return out


def forbidden(module: str, package: str = "jaxdet.models") -> bool:
  if module.startswith("."):   # relative: resolve against the package
    level = len(module) - len(module.lstrip("."))
    parts = package.split(".")[:len(package.split(".")) - level + 1]
    module = ".".join(parts + [module.lstrip(".")]).rstrip(".")
  return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("source,bad", [
    ("from jaxdet.train import init_from", True),
    ("def f():\n  import jaxdet.train.loop as loop", True),
    ("from jaxdet import train", True),
    ("from ..train import loop", True),
    ("from experiments import rcnn_stages", True),
    ("from jaxdet import losses\nfrom jaxdet.models import init_from", False),
    ("import jaxdet.training_data", False),
])
def test_the_check_sees_every_form_of_import(source, bad):
  assert any(forbidden(m) for _, m in imported_modules(source)) == bad


def test_no_model_imports_train_or_experiments():
  files = sorted(MODELS.glob("*.py"))
  assert len(files) > 5
  found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in files for line, module in imported_modules(path.read_text())
           if forbidden(module)]
  assert not found, "\n".join(found)
