"""SIGTERM as a preemption notice: remembered from whenever it comes, answered by the step loop.

A preemption notice (Cloud TPU maintenance, a SLURM time limit, `kill`) can come at any moment, the minutes of
start-up and the first compile included. The entry point calls `install()` first thing, so from then on SIGTERM
only sets a flag; the loop (train/loop.py) asks `stop_after(step)` after every step: a checkpoint, then a clean
stop. Come before the first step, it stops the run there with nothing to save (and says so). The process then
exits 0 and a rerun resumes.

Several processes (`jax.distributed.initialize()`, a pod or a cluster) must stop after the *same* step: the
checkpoint is one collective save, and a process that stopped alone would wait in it for the others while they
wait in the next step's collectives for it, until the job is killed without its checkpoint. The notices come to
the hosts at different moments, and some hosts may get none. So there jax's preemption service owns SIGTERM
(`initialize` installs its notifier, in place of the handler here): a notice to any process reaches all of them
through the coordination service, which picks the step they all stop after (one past the furthest), and
`stop_after` is `multihost_utils.reached_preemption_sync_point`. (A notice that came before `initialize`, in
start-up, was this process's handler's alone: the process stops before the first step, and the others cannot go
on without it; with no step trained, nothing is lost.)

A library caller that never called `install()` (a test, a notebook) gets the same behaviour for the duration of
each loop (`listening()`), and its own handler back afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import signal

_requested = False
_installed = False  # process-wide, by install(): kept for the life of the process


def _handler(signum, frame):
  del signum, frame
  global _requested  # pylint: disable=global-statement
  if not _requested:
    # A plain write: logging from a signal handler can deadlock on the handler lock the interrupted code holds.
    import sys  # pylint: disable=import-outside-toplevel
    sys.stderr.write("SIGTERM: stopping at the next step boundary (with a checkpoint where there is a step to "
                     "save)\n")
  _requested = True


def install() -> None:
  """From now on, for the rest of the process, SIGTERM asks the training loop to stop (idempotent). Called
  before jax is imported; a later `jax.distributed.initialize()` hands the signal to jax's preemption service."""
  global _installed  # pylint: disable=global-statement
  signal.signal(signal.SIGTERM, _handler)
  _installed = True


def requested() -> bool:
  """Whether this process's handler saw a SIGTERM (in a multi-process run: before jax.distributed took over)."""
  return _requested


def _distributed() -> bool:
  import jax  # pylint: disable=import-outside-toplevel  (this module is imported before jax: main.py)
  return jax.distributed.is_initialized()


def stop_after(step: int) -> bool:
  """Whether the loop stops after `step` (call it after every step, on every process): the flag in one process;
  in a multi-process run, whether `step` is the step that every process stops after (module docstring)."""
  if _distributed():
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.reached_preemption_sync_point(step)
  return _requested


@contextlib.contextmanager
def listening():
  """SIGTERM handled for the duration of a loop: process-wide after install() or by jax's preemption service
  in a multi-process run (module docstring); else installed here and the caller's handler (and a clear flag)
  restored on exit, so the next loop in the same process starts afresh."""
  global _requested  # pylint: disable=global-statement
  if _installed or _distributed():
    yield
    return
  old = signal.signal(signal.SIGTERM, _handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)
    if _requested:
      logging.info("SIGTERM was answered; the flag is cleared for the next loop of this process")
    _requested = False
