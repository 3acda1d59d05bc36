"""The undecodable files a process's input pipelines met, for the run's log and metrics. No TensorFlow here: the
training loops import this.

The pipelines (data/pipelines.py) add every file that failed to decode as they yield the batch that held it: a
training batch's row of a bad file holds a copy of another row of the same batch, an evaluation batch's row is
marked invalid. The first `keep` distinct files are logged by name (a warning each) as they are met, then one line
at every power of two of the distinct count; `metrics()` (data/bad_files, data/bad_rows) is what train/loop.py
adds to every logged interval's metrics (console line, TensorBoard, the run's last metrics) once the process's
record `SEEN` holds a file, and the loop logs `summary()` when the run ends.

Counts are this process's (each host reads its own shard) and start at 0 when the process starts (a resumed run
counts again what it meets from the resume on). A file met again in a later epoch is one file, another row.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable


class BadFiles:
  """Undecodable files by name: `count` distinct files, `rows` batch rows they filled, `first` the first `keep`
  names, `names` all (in the order met)."""

  def __init__(self, keep: int = 10):
    self.keep = keep
    self.rows = 0
    self._names: dict[str, None] = {}  # insertion-ordered set
    self._lock = threading.Lock()

  @property
  def count(self) -> int:
    return len(self._names)

  @property
  def names(self) -> list[str]:
    return list(self._names)

  @property
  def first(self) -> list[str]:
    return list(self._names)[:self.keep]

  def add(self, names: Iterable[str], where: str = "") -> None:
    """Records the files of one batch's bad rows (a name may repeat: a file met again)."""
    with self._lock:
      for name in names:
        self.rows += 1
        if name in self._names:
          continue
        self._names[name] = None
        n = len(self._names)
        if n <= self.keep:
          logging.warning("undecodable file skipped%s: %s", f" ({where})" if where else "", name)
        elif n & (n - 1) == 0:  # a power of two
          logging.warning("%s", self.summary())

  def metrics(self) -> dict[str, float]:
    return {"data/bad_files": float(self.count), "data/bad_rows": float(self.rows)}

  def summary(self) -> str:
    if not self.count:
      return "no undecodable files"
    more = f" and {self.count - self.keep} more" if self.count > self.keep else ""
    return (f"{self.count} undecodable files skipped so far ({self.rows} batch rows): "
            f"{', '.join(self.first)}{more}")


SEEN = BadFiles()  # what every pipeline of this process adds to unless it is given its own record
