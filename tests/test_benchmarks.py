"""Every benchmark script starts: its imports and flag definitions run (`--help`), so a module move or a flag
defined twice (what broke benchmarks/fmnist_reproduction.py once the demo became an experiment driver) fails
here and not an hour into a measurement nobody is watching."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "harness.py")


def _harness():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import harness  # pylint: disable=import-outside-toplevel
  return harness


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


def test_synthetic_batch_follows_the_trainers_spec_and_names_a_mismatch():
  harness = _harness()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  spec = {"image": ((2, 4, 4, 3), np.float32), "label": ((2,), np.int32), "mask": ((2, 2, 2), np.bool_)}
  mask = np.zeros((2, 2, 2), bool)
  b = harness.synthetic_batch(spec, mesh, given={"mask": mask}, high={"label": 10})
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (s, np.dtype(d)) for k, (s, d) in spec.items()}
  assert 0 <= int(b["label"].min()) and int(b["label"].max()) < 10
  with pytest.raises(ValueError, match=r"batch\['mask'\].*\(2, 2, 2\) bool"):
    harness.synthetic_batch(spec, mesh, given={"mask": np.zeros((2, 3, 3), bool)}, high={"label": 10})
  with pytest.raises(ValueError, match="label"):
    harness.synthetic_batch(spec, mesh, given={"mask": mask})
  with pytest.raises(ValueError, match="not in the trainer's batch spec"):
    harness.synthetic_batch(spec, mesh, given={"mask": mask, "ids": mask}, high={"label": 10})


def test_rounds_report_the_median_round_and_keep_every_one():
  harness = _harness()
  runs = [{"step": "s", "framework": fw, "images_per_s": v, "round": i}
          for i, (a, b) in enumerate([(500.0, 450.0), (420.0, 480.0), (470.0, 440.0)]) for fw, v in (("jax", a), ("torch", b))]
  out = {r["framework"]: r for r in harness.median_rounds(runs)}
  assert (out["jax"]["round"], out["torch"]["round"]) == (2, 0)  # the median images/s of each side
  assert out["jax"]["rounds_images_per_s"] == [500.0, 420.0, 470.0]
  assert [r["round"] for r in harness.median_rounds(runs[:4]) if r["framework"] == "jax"] == [1]  # lower middle
  failed = runs + [{"step": "s", "framework": "torch", "error": "worker exited with status 1"}]
  assert "error" in {r["framework"]: r for r in harness.median_rounds(failed)}["torch"]


def test_profile_adds_up_a_jitted_steps_ops_by_kind():
  harness = _harness()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  assert harness._op_kind("copy_bitcast_fusion.36") == "copy_bitcast_fusion"
  assert harness._op_kind("dot.3.1") == "dot" and harness._op_kind("ynn_fusion") == "ynn_fusion"
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b)
  a = jnp.ones((256, 256))
  jax.block_until_ready(f(a, a))
  ops = harness.profile_ops("jax", lambda: jax.block_until_ready(f(a, a)), n=2)
  assert ops and all(ms > 0 and count >= 1 for _, ms, count in ops)
  kinds = [k for k, _, _ in ops]
  assert any("dot" in k or "ynn" in k for k in kinds), kinds  # the matmuls, by their XLA:CPU names
  assert not any(k[-1].isdigit() for k in kinds), kinds
