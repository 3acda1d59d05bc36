"""The step loop every training mode shares: what happens around the step, never the step itself.

Each training mode (tokenizer.py, pretrain.py, finetune.py, linear_probe.py, segmentation.py) builds its state,
its jitted step and its batches, then hands them here: one step per iteration, the clu hooks (progress,
profiler), the mean of the step metrics every `config.log_every` steps into TensorBoard and as one console line
(train/console.py; a non-finite loss stops the run there, naming the step, with the last checkpoint intact), a
checkpoint every `config.ckpt_every` steps and at the end,
and SIGTERM (preemption, train/preemption.py) answered by a checkpoint and a clean stop. `after_step` adds
mode-specific work (the tokenizer's periodic evaluation) and may return figures for the last log.

The host runs at most STEPS_AHEAD steps ahead of the devices. Dispatch is asynchronous, and between two logs
nothing else waits on a step, so the host would queue steps as fast as it can dispatch them (on CPU up to the
runtime's in-flight limit, 32; on accelerators as far as theirs allows); a SIGTERM answered "after this step"
then waits for every queued step first: up to 7 s in the demo's fine-tuning (32 steps; 3.4 s measured once),
minutes on a pod model, past the grace period a preemption or SLURM gives (~30 s), and the checkpoint is never
written. Why 8 and not 2: the queue also hides the input pipeline's stalls, and the biggest is each epoch's start
(a new tf.data pipeline, ~1.4 s by the steps lost in the demo's fine-tuning, ~7 steps): with 2 in flight the
steps around each epoch boundary ran at 4.2-4.4 steps/s instead of 4.9 (unbounded); with 8 or 16 mostly not,
within this VM's noise of unbounded (BENCHMARKS.md). The answer to a SIGTERM then waits for ~9 steps at most.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import jax

from beit_jax.data import bad_files
from beit_jax.train import checkpoints, console, metrics, preemption

STEPS_AHEAD = 8  # steps dispatched but not finished, at most (docstring)


def run(config, state, step_fn: Callable[[int, Any], tuple[Any, Mapping]], *, start: int, steps: int,
        ckpts: checkpoints.TrainCheckpoints, writer, hooks, meta: Callable[[int], dict],
        after_step: Optional[Callable[[int, Any], Optional[Mapping[str, float]]]] = None) -> tuple[Any, dict]:
  """Steps start+1..steps of `step_fn(step, state) -> (state, step metrics)`; returns (state, last logged
  metrics). Closes `ckpts` (waiting for its last save) and flushes `writer` however it ends. A SIGTERM that came
  before the first step (start-up, data, the set-up before it; see train/preemption.py) stops the run before it:
  nothing new to save. One during a step (the first one's compile included) stops it after that step's
  checkpoint."""
  history, last = [], {}
  progress = console.Progress(start, steps, config.batch_size)
  with preemption.listening():
    try:
      for step in range(start + 1, steps + 1):
        if step == start + 1 and preemption.requested():
          logging.warning("SIGTERM before step %d, the first of this run: stopping with nothing new to save "
                          "(the newest checkpoint: %s)", step, ckpts.latest_step())
          break
        if step == start + 1:
          logging.info("step %d, the first of this run: compiling the step", step)
        state, out = step_fn(step, state)
        history.append(out)
        if len(history) > STEPS_AHEAD:  # (the steps before `history` finished: the last log read them)
          jax.block_until_ready(history[-STEPS_AHEAD - 1])
        for hook in hooks:
          hook(step)
        stop = preemption.stop_after(step)  # in a multi-process run: the same step on every process
        if step % config.log_every == 0 or step == steps or stop:
          metrics.check_finite(state, ckpts.latest_step())
          last = metrics.mean_of(history)
          if bad_files.SEEN.count:  # undecodable files the pipelines met (each named in the log once, as met)
            last.update(bad_files.SEEN.metrics(step))
          history = []
          writer.write_scalars(step, last)
          logging.info("%s", progress.line(step, last))
        if after_step is not None:
          last.update(after_step(step, state) or {})
        if step % config.ckpt_every == 0 or step == steps or stop:
          ckpts.save(step, state, {**meta(step), "bad_files": bad_files.SEEN.snapshot(step)})
        if stop:
          logging.warning("SIGTERM: stopped after the checkpoint of step %d of %d", step, steps)
          break
    finally:
      ckpts.close()
      writer.flush()
      if bad_files.SEEN.count:  # named one by one as they were met; the tally once more at the end
        logging.warning("%s", bad_files.SEEN.summary())
  return state, last
