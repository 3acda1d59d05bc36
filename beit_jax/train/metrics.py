"""Metric writing: clu writers (TensorBoard + console) on process 0, console-only elsewhere.

clu's writers import TensorFlow, so they are imported here, lazily, never by model or step code.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


class _LogWriter:
  """Console-only fallback where clu/TensorFlow are absent (e.g. a benchmark on synthetic data)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.5g}" for k, v in sorted(scalars.items())))

  def write_images(self, step, images):
    del step, images

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str):
  try:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _LogWriter()
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def step_hooks(config, total_steps: int, writer, workdir: str) -> list:
  """What runs after every step, called with the step number: clu's ReportProgress (steps/s, ETA) and, on
  request, a jax profiler trace of `config.profile_steps` steps from step `config.profile_first_step`
  (0 = off) into workdir/plugins/profile (TensorBoard's profile tab, or xprof)."""
  try:
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every)]
  if config.get("profile_first_step", 0):
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.get("profile_steps", 5), profile_duration_ms=None,
        first_profile=config.profile_first_step, every_steps=None, every_secs=None))
  return hooks


def mean_of(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
  """The mean of each metric over the steps since the last report (one device->host transfer); metrics that
  only some steps have (the GAN terms before their start step) are left out."""
  stacked = jax.device_get(history)
  keys = set.intersection(*(set(h) for h in stacked))
  return {k: float(np.mean([h[k] for h in stacked])) for k in sorted(keys)}


def sum_over(fn, batches):
  """The sum over `batches` of `fn(batch)`, a pytree of per-batch sums (hits, counts, histograms), on the host:
  how every held-out metric is gathered before its one division."""
  sums = None
  for batch in batches:
    out = jax.device_get(fn(batch))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  return sums


def finite_update(ok, state, new):
  """The next train state, inside a jitted step: `new` (the updated entries, "step" included) where `ok` (the
  step's loss and gradients were finite), else the old entries, step count aside; the first bad step is
  recorded in "nonfinite_step", which `check_finite` turns into a stop at the next log."""
  out = {k: v if k == "step" else jax.tree.map(lambda a, b: jnp.where(ok, a, b), v, state[k]) for k, v in new.items()}
  out["nonfinite_step"] = jnp.where(~ok & (state["nonfinite_step"] < 0), state["step"], state["nonfinite_step"])
  return out


def check_finite(state, last_checkpoint) -> None:
  """Stops the run at a step whose loss or gradient was not finite (the step left the state untouched)."""
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise FloatingPointError(
        f"non-finite loss or gradient at step {bad + 1}; training stopped and the last checkpoint (step "
        f"{last_checkpoint}) is intact. Lower config.optim.lr or enable config.optim.clip_grad")


# A patch whose pixels are all at most this (in [0, 1]) is "background": pure black, as Fashion-MNIST's border
# and a third of its patches. The figures built on it (codes spent on background, masked-token accuracy off
# background) say whether tokens mean something on data with a black background; elsewhere they count black
# patches (letterboxing, night skies) and may be empty.
BACKGROUND_MAX = 0.02


def background_patches(images, grid) -> jax.Array:
  """bool [B, h * w], row-major as the token grid: the patches of `grid` whose pixels are all <= BACKGROUND_MAX
  (images NHWC in [0, 1], any channels)."""
  b, s, _, c = images.shape
  h, w = grid
  patches = images.reshape(b, h, s // h, w, s // w, c)
  return (patches.max(axis=(2, 4, 5)) <= BACKGROUND_MAX).reshape(b, h * w)


HISTORY = "eval_history.jsonl"


def append_history(workdir, record: Mapping) -> None:
  """One line of held-out figures (a learning-curve point) appended to workdir/eval_history.jsonl, on process 0.
  A run resumed from an older checkpoint appends its steps again (with the same figures: resume is exact);
  `read_history` keeps the last line of each step."""
  if jax.process_index() == 0:
    with open(pathlib.Path(workdir) / HISTORY, "a", encoding="utf-8") as f:
      f.write(json.dumps({k: (float(v) if not isinstance(v, str) else v) for k, v in record.items()}) + "\n")


def read_history(workdir) -> list[dict]:
  """workdir/eval_history.jsonl as records sorted by step, one per step ([] when the run wrote none)."""
  path = pathlib.Path(workdir) / HISTORY
  if not path.exists():
    return []
  by_step = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[k] for k in sorted(by_step)]
