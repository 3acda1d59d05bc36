"""What a person sees while a run goes (train/console.py): our lines and every warning on the console, the
libraries' INFO lines in workdir/log.txt, one progress line per log interval and a last line naming the model."""
import logging
import os
import pathlib
import subprocess
import sys

from beit_jax.train import console

_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config


def get_config(arg=""):
  return tiny_config({tok!r}, total_steps=4, log_every=2, ckpt_every=2, eval_split="test[:64]")
"""


def _record(pathname: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("x", level, pathname, 1, "msg", None, None)


def test_console_filter_passes_ours_and_warnings_only():
  keep = console._OursOrWarnings()  # pylint: disable=protected-access
  ours = str(pathlib.Path(console.__file__).parent / "loop.py")
  library = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert keep.filter(_record(ours, logging.INFO))
  assert not keep.filter(_record(library, logging.INFO))
  assert keep.filter(_record(library, logging.WARNING))


def test_progress_line_and_duration():
  progress = console.Progress(start=0, steps=200, batch_size=64)
  progress.t -= 10.0  # 100 steps in ~10 s
  line = progress.line(100, {"loss": 2.5, "mlm_acc": 0.25})
  assert line.startswith("step 100/200 (50%)  loss 2.5 mlm_acc 0.25  |  ") and "img/s" in line, line
  assert "ETA 10s" in line or "ETA 9s" in line, line
  assert (console.duration(5), console.duration(65), console.duration(3700)) == ("5s", "1m05s", "1h01m")


def test_a_run_of_the_entry_point_prints_progress_not_library_info(tmp_path, tokenizer_file):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(_CONFIG.format(tests=str(pathlib.Path(__file__).parent), tok=str(tokenizer_file)))
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-m", "beit_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=pathlib.Path(__file__).parent.parent)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  print("\n".join(lines))
  assert any("step 2/4 (50%)  " in l and "mlm_acc" in l and "ETA" in l for l in lines), lines
  assert any("step 4/4 (100%)" in l for l in lines), lines
  assert "pre-training done in" in lines[-1] and f"model in {workdir / 'model'}" in lines[-1], lines[-1]
  log = (workdir / "log.txt").read_text()
  # orbax logs every save at INFO: in the file, not on the console (its warnings, "W...", still show there).
  assert "INFO checkpoint_manager.py" in log and "step 4/4" in log
  assert not [l for l in lines if l.startswith("I") and "checkpoint_manager.py" in l], lines
