"""The package's floors: the lower ones (models, tokenizers, converters, data, model files) never reach up into
training, and no trainer imports another. Read from the source's import statements (function-level imports
included), so an import that only runs on some path counts too."""
import ast
import pathlib

import beit_jax

PACKAGE = pathlib.Path(beit_jax.__file__).parent
LOWER_FLOORS = ("models", "tokenizers", "convert", "data")


def imported_modules(path: pathlib.Path) -> set[str]:
  """The absolute names of the modules `path` imports (`from beit_jax.train import x` gives beit_jax.train and
  beit_jax.train.x: x may be a module or a name in it)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_imported_modules_sees_function_level_imports(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import os\ndef f():\n  from beit_jax.train import loop\n")
  assert {"os", "beit_jax.train", "beit_jax.train.loop"} <= imported_modules(src)


def test_lower_floors_never_import_training():
  offenders = {}
  files = [f for floor in LOWER_FLOORS for f in (PACKAGE / floor).rglob("*.py")] + [PACKAGE / "model_files.py"]
  assert len(files) > 20, files  # the walk found the package
  for f in files:
    up = sorted(m for m in imported_modules(f) if m == "beit_jax.train" or m.startswith("beit_jax.train."))
    if up:
      offenders[str(f.relative_to(PACKAGE))] = up
  assert not offenders, f"modules below train/ that import it: {offenders}"


def test_no_trainer_imports_another():
  """Each trainer (the modules modes.MODES names) reads on its own: shared set-up lives in train/runs.py and
  train/weights.py, never in a sibling trainer."""
  from beit_jax.train import modes  # pylint: disable=import-outside-toplevel
  trainers = sorted({module for module, _ in modes.MODES.values()})
  assert len(trainers) == 5, trainers
  offenders = {}
  for name in trainers:
    path = PACKAGE / "train" / f"{name.rsplit('.', 1)[1]}.py"
    siblings = sorted((imported_modules(path) & set(trainers)) - {name})
    if siblings:
      offenders[name] = siblings
  assert not offenders, f"trainers importing other trainers: {offenders}"


def test_nothing_in_the_package_imports_the_experiment_drivers():
  """beit_jax/experiments/ (the miniature chain) drives the product; the product never depends on a driver."""
  files = [f for f in PACKAGE.rglob("*.py") if "experiments" not in f.relative_to(PACKAGE).parts]
  offenders = {str(f.relative_to(PACKAGE)): up for f in files
               if (up := sorted(m for m in imported_modules(f) if m.startswith("beit_jax.experiments")))}
  assert len(files) > 40 and not offenders, offenders


def test_importing_the_package_starts_no_jax_backend():
  """A multi-process run calls jax.distributed.initialize after its imports: a module that makes a jax array at
  import (a jnp constant) would start the backend first, single-process, and the processes hang at their first
  collective (it happened: a jnp constant in data/device.py). Every module under beit_jax/ except the entry
  points (main and compile_for define the same flags) is imported in a fresh process, then the backend is asked."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(beit_jax.__file__).parent
  names = sorted("beit_jax." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                 for p in root.rglob("*.py") if p.stem not in ("main", "compile_for", "__main__")
                 and "configs" not in p.relative_to(root).parts)
  code = ("import importlib, sys\n"
          f"for n in {names!r}:\n  importlib.import_module(n)\n"
          "from jax._src import xla_bridge\n"
          "print('started' if xla_bridge.backends_are_initialized() else 'not started')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  print(len(names), "modules imported:", out.stdout.strip())
  assert out.stdout.strip().splitlines()[-1] == "not started"
