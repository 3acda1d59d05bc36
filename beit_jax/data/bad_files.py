"""The undecodable files a process's input pipelines met, for the run's log and metrics. No TensorFlow here: the
training loops import this.

The pipelines (data/pipelines.py) add every file that failed to decode as they yield the batch that held it: a
training batch's row of a bad file holds a copy of another row of the same batch, an evaluation batch's row is
marked invalid. The first `keep` distinct files are logged by name (a warning each) as they are met, then one line
at every power of two of the distinct count; `metrics()` (data/bad_files, data/bad_rows) is what train/loop.py
adds to every logged interval's metrics (console line, TensorBoard, the run's last metrics) once the process's
record `SEEN` holds a file, and the loop logs `summary()` when the run ends.

Training records carry the step their batch is for, so the figures of step k are those of the batches up to k
however far the pipeline reads ahead, and a checkpoint keeps the record as of its step (`snapshot`): a resumed
run's figures go on from there (`restore`, train/checkpoints.py) and end as the uninterrupted run's. Counts are
this process's (each host reads its own shard); with several processes the checkpoint keeps the primary's, and
the other processes count again from the resume on. A file met again in a later epoch is one file, another row.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable


class BadFiles:
  """Undecodable files by name: `count` distinct files, `rows` batch rows they filled, `first` the first `keep`
  names, `names` all (in the order met). Each name and row has the training step it was met at (None: outside
  training, e.g. an evaluation pass), so that `metrics(step)` and `snapshot(step)` leave out what the pipeline
  read ahead of that step."""

  def __init__(self, keep: int = 10):
    self.keep = keep
    self._names: dict[str, int | None] = {}  # insertion-ordered: name -> the step it was first met at
    self._rows: dict[int | None, int] = {}  # step -> bad rows of its batch
    self._lock = threading.Lock()

  @property
  def count(self) -> int:
    return len(self._names)

  @property
  def rows(self) -> int:
    return sum(self._rows.values())

  @property
  def names(self) -> list[str]:
    return list(self._names)

  @property
  def first(self) -> list[str]:
    return list(self._names)[:self.keep]

  def add(self, names: Iterable[str], where: str = "", step: int | None = None) -> None:
    """Records the files of one batch's bad rows (a name may repeat: a file met again); `step`: the training step
    the batch is for (1-based, as the loop counts)."""
    with self._lock:
      for name in names:
        self._rows[step] = self._rows.get(step, 0) + 1
        if name in self._names:
          continue
        self._names[name] = step
        n = len(self._names)
        if n <= self.keep:
          logging.warning("undecodable file skipped%s: %s", f" ({where})" if where else "", name)
        elif n & (n - 1) == 0:  # a power of two
          logging.warning("%s", self.summary())

  def _upto(self, step: int | None):
    """(names, rows) met at steps <= `step` or outside training (all with step None)."""
    keep = lambda s: step is None or s is None or s <= step
    return [n for n, s in self._names.items() if keep(s)], sum(r for s, r in self._rows.items() if keep(s))

  def metrics(self, step: int | None = None) -> dict[str, float]:
    names, rows = self._upto(step)
    return {"data/bad_files": float(len(names)), "data/bad_rows": float(rows)}

  def snapshot(self, step: int) -> dict:
    """The record as of training step `step`, JSON-serialisable: what a checkpoint of that step keeps."""
    with self._lock:
      names, rows = self._upto(step)
      return {"names": names, "rows": rows, "step": step}

  def restore(self, snapshot: dict) -> None:
    """Back to a checkpoint's `snapshot` (a resumed run): what was met after its step is met again."""
    with self._lock:
      step = snapshot["step"]
      self._names = {n: step for n in snapshot["names"]}
      self._rows = {step: snapshot["rows"]} if snapshot["rows"] else {}

  def summary(self) -> str:
    if not self.count:
      return "no undecodable files"
    more = f" and {self.count - self.keep} more" if self.count > self.keep else ""
    return (f"{self.count} undecodable files skipped so far ({self.rows} batch rows): "
            f"{', '.join(self.first)}{more}")


SEEN = BadFiles()  # what every pipeline of this process adds to unless it is given its own record
