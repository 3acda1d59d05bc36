"""SIGTERM as a preemption notice: remembered from whenever it comes, answered by the step loop.

A preemption notice (Cloud TPU maintenance, a SLURM time limit, `kill`) can come at any moment, the minutes of
start-up and the first compile included. The entry point calls `install()` first thing, so from then on SIGTERM
only sets a flag; the loop (train/loop.py) checks it after every step: a checkpoint, then a clean stop. Come
before the first step, it stops the run there with nothing to save (and says so). The process then exits 0 and
a rerun resumes.

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
  """From now on, for the rest of the process, SIGTERM asks the training loop to stop (idempotent)."""
  global _installed  # pylint: disable=global-statement
  signal.signal(signal.SIGTERM, _handler)
  _installed = True


def requested() -> bool:
  return _requested


@contextlib.contextmanager
def listening():
  """SIGTERM handled for the duration of a loop: process-wide after install(), else installed here and the
  caller's handler (and a clear flag) restored on exit, so the next loop in the same process starts afresh."""
  global _requested  # pylint: disable=global-statement
  if _installed:
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
