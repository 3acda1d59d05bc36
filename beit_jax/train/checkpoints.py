"""Training-state checkpoints with orbax: save, resume, and the lock that keeps one run per workdir.

The model files a run leaves behind (and `beit-convert` writes) are beit_jax/model_files.py.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import socket

import jax
import orbax.checkpoint as ocp

from beit_jax import model_files
from beit_jax.data import bad_files


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the complete ones before it are intact."""


class TrainCheckpoints:
  """Training state (params, optimizer state, RNG state, step) plus a JSON record, saved by orbax.

  Saves are asynchronous (the step loop goes on while the arrays are written) and atomic (orbax writes to a
  temporary folder and renames it when complete), so a kill at any moment leaves the last complete step.
  Typed PRNG keys are stored as their raw key data and re-wrapped on restore.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        create=True, max_to_keep=keep, enable_async_checkpointing=True))
    self._lock = None

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    # An asynchronous save reports a failed write at the next save or at close: both go through _writing.
    with self._writing(f"saving checkpoint {step} (or finishing the one before it)"):
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _writing(self, what: str):
    """A failed write (disk full, quota, permissions) as one clear error naming the complete checkpoints, which
    the atomic rename leaves intact whatever failed."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax/OS errors alike)
      intact = (sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
                if self.directory.exists() else [])
      raise CheckpointWriteError(
          f"{what} in {self.directory} failed ({type(e).__name__}: {model_files.first_line(e, 300)})."
          f" The complete checkpoints there are intact (steps {intact}); a disk full or over quota? Free space and "
          f"rerun: the run resumes from step {max(intact) if intact else 0}.") from e

  def restore(self, target, step: int | None = None):
    """(state, meta) of `step` (default: the newest that can be restored) in the shardings of `target`, or None
    if there is none.

    A newest step that cannot be read (truncated or corrupted files; orbax's atomic rename rules out a half
    written one, not a disk that lost data later) is named in a warning and the previous one is tried; once an
    older step restores, the unreadable newer ones are moved aside to `<step>.unreadable` (kept for a look,
    never reused). If no step restores, the error names the newest step's failure: usually a checkpoint of
    another model or config in this workdir.
    """
    steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
    failed = []  # (step, error), newest first
    for s in steps:
      try:
        out = self._restore_step(target, s)
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds: all "unreadable")
        logging.warning("checkpoint %s cannot be restored (%s: %s); trying the one before it",
                        self.directory / str(s), type(e).__name__, model_files.first_line(e, 300))
        failed.append((s, e))
        continue
      if failed:
        self._set_aside([f for f, _ in failed])
      return out
    if failed:
      first = failed[0][1]
      raise ValueError(f"no checkpoint in {self.directory} can be restored into this run's state (steps "
                       f"{[f for f, _ in failed]}; the newest failed with {type(first).__name__}: "
                       f"{model_files.first_line(first, 500)}). A checkpoint of another model or config? Use a new "
                       "workdir.") from first
    return None

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:  # one process renames (a shared filesystem); all reload
      for s in steps:
        src = self.directory / str(s)
        dst = self.directory / f"{s}.unreadable"
        if src.exists() and not dst.exists():
          src.rename(dst)
          logging.warning("moved the unreadable checkpoint %s to %s", src, dst)
    self._mngr.reload()

  def _restore_step(self, target, step: int):
    def abstract(x):
      if _is_key(x):
        data = jax.random.key_data(x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
      return ocp.utils.to_shape_dtype_struct(x)
    # A checkpoint of an earlier beit_jax (model_files._EARLIER_LAYOUTS) resumes in today's layout.
    stored, to_today = model_files.as_stored(self.directory, step, "state", jax.tree.map(abstract, target))
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(stored),
                                                           meta=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
                         target, to_today(out["state"]))
    return state, dict(out["meta"])

  def wait(self) -> None:
    with self._writing("writing a checkpoint"):
      self._mngr.wait_until_finished()

  def close(self) -> None:
    try:
      with self._writing("writing the last checkpoint"):
        self._mngr.wait_until_finished()
        self._mngr.close()
    finally:
      self._release_lock()

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.close()  # releases the flock
      self._lock = None

  def lock(self, workdir: pathlib.Path) -> None:
    """Refuses a second run on this workdir while this one runs: an exclusive flock on workdir/run.lock, taken
    by process 0 (multi-host runs share the workdir). The kernel drops it when the process dies, even by
    SIGKILL, so a crashed run never leaves a stale lock. Local filesystems only (a gs:// workdir is not locked)."""
    if jax.process_index() != 0 or "://" in str(workdir):
      return
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / "run.lock", "a+")  # pylint: disable=consider-using-with  (held for the run)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      self.close()
      raise RuntimeError(f"workdir {workdir} is in use by another run ({holder}; lock {workdir / 'run.lock'}). "
                         "Wait for it to finish or stop it, or use another workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    self._lock = f


def resume(workdir, config, state, total_steps: int):
  """The run's checkpoint manager (workdir/checkpoints, keeping config.keep_checkpoints), the state restored
  from its newest checkpoint (or `state` as given), and the step to go on from; the record of undecodable files
  (data/bad_files.py) as of that step. A checkpoint past this config's end belongs to another run: an error,
  never a silent skip."""
  ckpts = TrainCheckpoints(pathlib.Path(workdir) / "checkpoints", keep=config.get("keep_checkpoints", 3))
  ckpts.lock(pathlib.Path(workdir))
  try:
    restored = ckpts.restore(state)
  except Exception:
    ckpts.close()
    raise
  # This process's record of undecodable files starts as of the checkpoint (empty for a new run): the pipeline
  # meets again what it read past that step. The checkpoint holds the primary process's record only.
  snapshot = {"names": [], "rows": 0, "step": 0}
  if restored is not None:
    state, meta = restored
    logging.info("resumed from %s at step %d", ckpts.directory, meta["step"])
    if jax.process_index() == 0 and "bad_files" in meta:
      snapshot = meta["bad_files"]
  bad_files.SEEN.restore(snapshot)
  start = int(jax.device_get(state["step"]))
  if start > total_steps:
    ckpts.close()
    raise ValueError(f"{ckpts.directory} holds a checkpoint at step {start}, past this config's {total_steps} "
                     "steps: use a new workdir, or set config.total_steps to at least that step")
  return ckpts, state, start
