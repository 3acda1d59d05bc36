"""Every benchmark script starts: its imports and flag definitions run (`--help`), so a module move or a flag
defined twice (what broke benchmarks/fmnist_reproduction.py once the demo became an experiment driver) fails
here and not an hour into a measurement nobody is watching."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "harness.py")


def test_the_scripts_are_found():
  assert {"train_step.py", "fmnist_reproduction.py", "input_pipeline.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts(script):
  out = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  # absl's --help prints the flags and exits 1; argparse's exits 0. Either way: help printed, no traceback.
  printed_help = out.returncode == 0 or "Try --helpfull" in out.stdout
  assert printed_help and "Traceback" not in out.stderr, (
      f"{script.name} --help exited {out.returncode}:\n{out.stderr[-3000:]}")
