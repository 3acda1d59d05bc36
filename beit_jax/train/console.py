"""What a person sees while a run goes: one progress line per log interval and a last line saying where the model
and the metrics are. Every library's INFO lines (orbax, clu, absl, TensorFlow's Python side) go to
workdir/log.txt instead (log.N.txt on process N > 0), with beit_jax's own; warnings of any origin still reach the
console. `--verbose` puts everything on the console again.
"""
from __future__ import annotations

import logging
import pathlib
import time

PACKAGE = str(pathlib.Path(__file__).resolve().parent.parent)


class _OursOrWarnings(logging.Filter):
  """beit_jax's own records at any level, and every record at WARNING or above."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE)


def quiet(verbose: bool = False) -> None:
  """Unless `verbose`, the console (absl's handler, which app.run installs) shows only beit_jax's lines and
  warnings of any origin. Call in app.run's main, before anything logs."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  logging.getLogger().setLevel(logging.INFO)
  console = absl_logging.get_absl_handler()
  if not verbose and not any(isinstance(f, _OursOrWarnings) for f in console.filters):
    console.addFilter(_OursOrWarnings())


def log_to(workdir: str, process_index: int = 0) -> pathlib.Path:
  """Every INFO line from here on also goes to workdir/log.txt (log.N.txt on process N); returns its path."""
  path = (pathlib.Path(workdir) / ("log.txt" if process_index == 0 else f"log.{process_index}.txt")).resolve()
  path.parent.mkdir(parents=True, exist_ok=True)
  root = logging.getLogger()
  if not any(isinstance(h, logging.FileHandler) and pathlib.Path(h.baseFilename) == path for h in root.handlers):
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
    root.addHandler(file)
    logging.info("every library's INFO lines go to %s", path)
  return path


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """The progress line: step/total, the interval's mean metrics, speed and ETA, measured between log lines (the
  first interval includes the compile)."""

  def __init__(self, start: int, steps: int, batch_size: int):
    self.steps, self.batch_size = steps, batch_size
    self.t, self.step = time.time(), start

  def line(self, step: int, means: dict[str, float]) -> str:
    now = time.time()
    rate = (step - self.step) / max(now - self.t, 1e-9)
    self.t, self.step = now, step
    shown = " ".join(f"{k} {v:.4g}" for k, v in means.items())
    eta = duration((self.steps - step) / rate) if rate > 0 else "?"
    return (f"step {step}/{self.steps} ({100 * step / self.steps:.0f}%)  {shown}  |  {rate:.2f} steps/s, "
            f"{rate * self.batch_size:.0f} img/s  |  ETA {eta}")


def done(what: str, workdir, seconds: float, metrics: dict[str, float], model_dir=None) -> str:
  """The run's last line: how long, the held-out figures, and where the model and the metrics are."""
  workdir = pathlib.Path(workdir)
  held_out = {k: v for k, v in metrics.items() if k.startswith("eval_")}
  figures = ", ".join(f"{k[5:]} {v:.4g}" for k, v in held_out.items()) or "no held-out evaluation"
  model = f"model in {model_dir}; " if model_dir is not None and pathlib.Path(model_dir).exists() else ""
  return f"{what} done in {duration(seconds)}: {figures}. {model}metrics in {workdir} (TensorBoard)"
