"""The step loop every training mode shares: what happens around the step, never the step itself.

Each mode (tokenizer.py, pretrain.py, finetune.py, linear_probe.py) builds its state, its jitted step and its
batches, then hands them here: one step per iteration, the clu hooks (progress, profiler), the mean of the
step metrics every `config.log_every` steps (where a non-finite loss stops the run, naming the step, with the
last checkpoint intact), a checkpoint every `config.ckpt_every` steps and at the end, and SIGTERM
(preemption) answered by a checkpoint and a clean stop. `after_step` adds mode-specific work (the tokenizer's
periodic evaluation) and may return figures for the last log.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from beit_jax.train import checkpoints, metrics


def run(config, state, step_fn: Callable[[int, Any], tuple[Any, Mapping]], *, start: int, steps: int,
        ckpts: checkpoints.TrainCheckpoints, writer, hooks, meta: Callable[[int], dict],
        after_step: Optional[Callable[[int, Any], Optional[Mapping[str, float]]]] = None) -> tuple[Any, dict]:
  """Steps start+1..steps of `step_fn(step, state) -> (state, step metrics)`; returns (state, last logged
  metrics). Closes `ckpts` (waiting for its last save) and flushes `writer` however it ends."""
  preempt = checkpoints.Preemption()
  history, last = [], {}
  try:
    for step in range(start + 1, steps + 1):
      state, out = step_fn(step, state)
      history.append(out)
      for hook in hooks:
        hook(step)
      if step % config.log_every == 0 or step == steps or preempt.requested:
        metrics.check_finite(state, ckpts.latest_step())
        last = metrics.mean_of(history)
        history = []
        writer.write_scalars(step, last)
      if after_step is not None:
        last.update(after_step(step, state) or {})
      if step % config.ckpt_every == 0 or step == steps or preempt.requested:
        ckpts.save(step, state, meta(step))
      if preempt.requested:
        break
  finally:
    preempt.restore()
    ckpts.close()
    writer.flush()
  return state, last
