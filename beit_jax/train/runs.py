"""What every trainer sets up the same way: the mesh, the host's share of the batch, the step count, and the
classification eval split as global batches. A trainer imports this, never another trainer."""
from __future__ import annotations

import jax
import ml_collections

from beit_jax.train import sharding


def make_mesh(config: ml_collections.ConfigDict):
  """config.mesh over the first config.num_devices devices (all of them when unset)."""
  return sharding.make_mesh(config.mesh, jax.devices()[:config.get("num_devices") or None])


def check_batch(config: ml_collections.ConfigDict, mesh) -> int:
  """The host-local batch size, after checking the global one divides over devices and hosts."""
  dp, hosts = sharding.data_parallel_size(mesh), jax.process_count()
  accum = config.get("grad_accum", 1)
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum={accum!r} must be a positive int (1 = no accumulation)")
  if config.batch_size % (dp * accum):
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                     f"times config.grad_accum={accum} (config.mesh={dict(config.mesh)}, "
                     f"{jax.device_count()} devices): every device needs an equal share of every micro-batch")
  if config.batch_size % hosts:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {hosts} processes")
  return config.batch_size // hosts


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.total_steps when set, else config.epochs over the training split."""
  if config.get("total_steps"):
    return int(config.total_steps)
  return int(config.epochs * steps_per_epoch)


def classification_eval_batches(config: ml_collections.ConfigDict, mesh, host_batch: int, split: str = ""):
  """The eval split (or `split`) as global batches of image/label/valid (padded rows marked invalid), each
  example once across hosts: fine-tuning's evaluation and the linear probe's."""
  from beit_jax.data import device, pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)
  it = pipelines.classification_eval(config.data, split or config.eval_split, host_batch=host_batch,
                                     shard=pipelines.Shard.of_this_process())
  return device.global_batches(it, mesh, sharding.BATCH_AXES)
