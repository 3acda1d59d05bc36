"""Model checkpoints with orbax: what `beit-convert` writes and the training loops restore.

Layout: an orbax CheckpointManager directory; each step holds the items `params` (the nnx.Param state as a
nested dict) and `model_config` (the BeitConfig as JSON). Orbax writes each step to a temporary folder and
renames it when complete, so a crash never leaves a half-written step that looks finished.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from beit_jax.models.beit import Beit, BeitConfig, make_rngs


def _manager(directory: str | pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(create=True, max_to_keep=None))


def save_model(directory: str | pathlib.Path, model: Beit, step: int = 0) -> None:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with _manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            model_config=ocp.args.JsonSave(model.config.to_dict())))
    mngr.wait_until_finished()


def load_model(directory: str | pathlib.Path, step: int | None = None, **overrides) -> Beit:
  """Restores a model saved by `save_model` (the latest step by default); `overrides` change numerics only
  (e.g. dtype="bfloat16", attention_impl="cudnn", drop_path_rate=0.1)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  with _manager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint step in {directory}")
    meta = mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    cfg = BeitConfig(**meta["model_config"]).replace(**overrides)
    create = lambda: nnx.split(Beit(cfg, rngs=make_rngs(0)), nnx.Param, ...)
    graphdef, params, _ = nnx.eval_shape(create)  # shapes only: the weights come from the checkpoint
    # The non-parameter state (drop-path RNG streams) must be real; under jit XLA drops the unused weight init.
    rest = jax.jit(lambda: create()[2])()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  nnx.replace_by_pure_dict(params, restored["params"])
  return nnx.merge(graphdef, params, rest)
