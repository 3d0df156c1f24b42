"""README's commands and snippet are the ones the project runs."""

import os
import re
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
  with open(os.path.join(ROOT, *parts)) as f:
    return f.read()


def test_own_data_snippet_is_the_tested_function_body():
  """The README block is experiments/own_data_example.train_on_own_data's body, which
  tests/test_experiments.py::test_own_data_snippet runs."""
  readme = _read("README.md")
  block = re.search(r"## Train on your own data.*?```python\n(.*?)```", readme, re.S).group(1)
  source = _read("experiments", "own_data_example.py")
  body = re.search(r"# --- README: Train on your own data ---\n(.*?)\n\s*# --- end ---",
                   source, re.S).group(1)
  assert block.strip() == textwrap.dedent(body).strip()


def test_ci_runs_the_readme_test_command():
  readme = _read("README.md")
  ci = _read(".ci", "run")
  command = re.search(r"The tests .*?\n\n    (.+?)\n", readme, re.S).group(1)
  assert command in ci.splitlines()[-1], (command, ci.splitlines()[-1])


def test_own_loss_snippet_is_the_tested_example():
  """The README block is experiments/own_loss_example.py's marked part, which
  tests/test_own_loss.py checks and trains with."""
  readme = _read("README.md")
  block = re.search(r"## Write your own loss.*?```python\n(.*?)```", readme, re.S).group(1)
  source = _read("experiments", "own_loss_example.py")
  body = re.search(r"# --- README: Write your own loss ---\n(.*?)# --- end ---", source,
                   re.S).group(1)
  assert block.strip() == body.strip()


def test_own_loss_table_lists_every_systems_terms_and_defaults():
  """README's per-system table of loss terms is what each system's Settings declare."""
  import importlib
  readme = _read("README.md")
  section = readme[readme.index("## Write your own loss"):readme.index("## Add a detector")]
  rows = dict(re.findall(r"^\| (\w+)(?: \(fine-tuning\))? \| (.*?) \|$", section, re.M))
  for system in ("localization", "classify", "windows", "overfeat", "rcnn", "fast_rcnn",
                 "faster_rcnn", "yolo"):
    loss = importlib.import_module(f"jaxdet.models.{system}").Settings().loss
    row = rows[system]
    for term, kind in loss.TERMS.items():
      if system == "faster_rcnn" and term in ("cls", "box"):
        assert f"`{term}`" in row and "as fast_rcnn" in row
        continue
      weight = loss.weight(term)
      shown = f"{weight:g}"
      assert f"`{term}` ({kind}, `{getattr(loss, term)}`, {shown})" in row, (system, term, row)
