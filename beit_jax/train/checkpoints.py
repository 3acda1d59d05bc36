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


# ---------------------------------------------------------------------------------------------------------------
# Training-state checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


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

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target, step: int | None = None):
    """(state, meta) of `step` (default: the latest) in the shardings of `target`, or None if there is none."""
    step = self._mngr.latest_step() if step is None else step
    if step is None:
      return None
    def abstract(x):
      if _is_key(x):
        data = jax.random.key_data(x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
      return ocp.utils.to_shape_dtype_struct(x)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(abstract, target)), meta=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
                         target, out["state"])
    return state, dict(out["meta"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
