"""A plain install works without the source tree: a wheel built from the repository, installed into a fresh
venv, runs the demo's first stage (the pixel tokenizer) and a pre-training from the config files it ships,
through the console script, from a folder that holds no source."""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

REPO = pathlib.Path(__file__).parent.parent


def _clean_env(**extra) -> dict:
  """This process's environment without what points at the source tree (PYTHONPATH) and with one CPU device."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  return {**env, **extra}


def _run(cmd, cwd, timeout=900, **kw):
  res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_clean_env(), **kw)
  assert res.returncode == 0, (f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-2000:]}\n"
                               f"{res.stderr[-4000:]}")
  return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(python of a fresh venv holding the wheel, an empty working folder). The venv reaches the dependencies
  through a .pth line to this environment's site-packages (no network here to install them again); beit_jax
  itself comes only from the wheel: this environment's editable-install hook is a .pth of a folder that is not
  a site folder in the new venv, so it never runs there."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"  # a copy of what the wheel is built from: the build writes build/ and egg-info next to it
  shutil.copytree(REPO / "beit_jax", src / "beit_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.py", "README.md"):
    shutil.copy(REPO / name, src / name)
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
        str(src)], cwd=tmp)
  wheel = next((tmp / "dist").glob("beit_jax-*.whl"))
  _run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], cwd=tmp)
  python = tmp / "venv" / "bin" / "python"
  site = pathlib.Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=tmp).stdout.strip())
  (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
        str(wheel)], cwd=tmp)
  work = tmp / "run"
  work.mkdir()
  return python, work


def test_wheel_runs_the_demo_stage_and_a_pretraining_without_the_source(installed):
  python, work = installed
  where = _run([str(python), "-c", "import beit_jax, beit_jax.configs as c; print(beit_jax.__file__); "
                "print(c.path('fmnist_pretrain'))"], cwd=work).stdout.split()
  assert all("site-packages" in w and str(REPO) not in w for w in where), where
  # The demo's first stage, from the installed package's config files, 4 steps.
  stage = textwrap.dedent("""
      import dataclasses, sys
      from beit_jax import configs
      from beit_jax.experiments import miniature
      chain = miniature.Chain(sys.argv[1], dataclasses.replace(miniature.SCALES["demo"], tokenizer_steps=4))
      config = miniature.with_steps(configs.load("fmnist_tokenizer", "pixel"), 4)
      config.data.eval_split = "test[:256]"  # the stage's own held-out evaluation, on fewer images
      m = chain.stage("beit_tokenizer", config)
      print("tokenizer PSNR", m["eval_psnr"])
  """)
  res = _run([str(python), "-c", stage, str(work / "demo")], cwd=work)
  assert "tokenizer PSNR" in res.stdout, res.stdout
  tokenizer = work / "demo" / "beit_tokenizer" / "tokenizer"
  assert tokenizer.is_dir()
  # A pre-training on that tokenizer through the console script and the shipped config file.
  beit_train = python.parent / "beit-train"
  _run([str(beit_train), f"--config={where[1]}:{tokenizer}", f"--workdir={work / 'pre'}",
        "--config.total_steps=2", "--config.optim.warmup_steps=0", "--config.eval_split=test[:64]"], cwd=work)
  assert (work / "pre" / "model" / "2").is_dir(), sorted(p.name for p in (work / "pre").iterdir())
