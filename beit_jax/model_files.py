"""Model files: a saved BEiT, segmenter or tokenizer is a tree of arrays plus the JSON config that rebuilds it.

What `beit-convert` writes, what a finished training run leaves in workdir/model (workdir/tokenizer) and what
`config.init = "checkpoint:DIR"` reads. Layout: an orbax CheckpointManager directory; each step holds a tree item
(`params`, `variables` or `state`) and a JSON config item (`model_config`, `segmenter_config`,
`tokenizer_config`). Orbax writes each step to a temporary folder and renames it when complete, so a crash never
leaves a half-written step that looks finished. Not training: models/, tokenizers/ and convert/ use it, and
train/checkpoints.py keeps what only training needs (the train state, resume, the workdir lock).
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from beit_jax.models import segmentation
from beit_jax.models.beit import Beit, BeitConfig, make_rngs


def first_line(error: Exception, limit: int) -> str:
  """The first line of an error's message, at most `limit` characters (orbax's messages run to pages)."""
  text = str(error)
  return text.splitlines()[0][:limit] if text else ""


def _manager(directory: str | pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(create=True, max_to_keep=None))


def save_with_config(directory: str | pathlib.Path, step: int, *, tree_item: str, tree, config_item: str,
                     config: dict) -> None:
  with _manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{tree_item: ocp.args.StandardSave(tree),
                                               config_item: ocp.args.JsonSave(config)}))
    mngr.wait_until_finished()


def read_config(directory: str | pathlib.Path, step: int | None, *, config_item: str,
                what: str = "checkpoint directory") -> tuple[int, dict]:
  """(step, config) of `step` (default: the latest complete one)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{what} {directory} does not exist")
  with _manager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint step in {directory}")
    return step, mngr.restore(step, args=ocp.args.Composite(**{config_item: ocp.args.JsonRestore()}))[config_item]


# Layouts that an earlier beit_jax wrote, read into today's: leaf name -> the stored array's axes as a
# permutation of today's (stored = today.transpose(perm)). Until 2026-12-07 the attention's qkv kernel was
# [D, 3, H, Dh]; it is [3, D, H, Dh] now (models/beit.py says why), so model folders and training checkpoints
# (the optimizer's moments of that kernel too) written before still load.
_EARLIER_LAYOUTS = {"qkv": (1, 0, 2, 3)}


def _path(keys) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def _stored_shapes(directory: pathlib.Path, step: int, tree_item: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  # The handler, not a StandardCheckpointer: that one looks for a step's metadata file in the item's folder and
  # warns in every log that it is missing.
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(pathlib.Path(directory).absolute() / str(step) / tree_item)
  finally:
    handler.close()
  tree = getattr(metadata, "item_metadata", metadata)
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {_path(keys): tuple(leaf.shape) for keys, leaf in leaves}


def _permuted(leaf: jax.ShapeDtypeStruct, perm) -> jax.ShapeDtypeStruct:
  sharding = leaf.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):  # each stored axis keeps the mesh axes of today's
    spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in perm)))
  return jax.ShapeDtypeStruct(tuple(leaf.shape[i] for i in perm), leaf.dtype, sharding=sharding)


def as_stored(directory: str | pathlib.Path, step: int, tree_item: str, abstract):
  """(`abstract` with its leaves in the layout `tree_item` of `step` was saved in, a function that turns the tree
  restored with it into today's layout, in `abstract`'s shardings). Leaves are converted only where the stored
  shape is an earlier layout's (`_EARLIER_LAYOUTS`) and not today's."""
  stored = _stored_shapes(directory, step, tree_item)
  earlier = {}

  def stored_leaf(keys, leaf):
    path = _path(keys)
    name = path[:-1] if path[-1:] == ("value",) else path  # a training state's leaves are nnx Variables' values
    perm = _EARLIER_LAYOUTS.get(name[-1]) if name else None
    if perm and len(perm) == len(leaf.shape) and stored.get(path) != tuple(leaf.shape) and \
        stored.get(path) == tuple(leaf.shape[i] for i in perm):
      earlier[path] = (perm, leaf.sharding)
      return _permuted(leaf, perm)
    return leaf

  def to_today(tree):
    def convert(keys, x):
      if _path(keys) not in earlier:
        return x
      perm, sharding = earlier[_path(keys)]
      inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
      return jax.jit(lambda a: jnp.transpose(a, inverse), out_shardings=sharding)(x)
    return jax.tree_util.tree_map_with_path(convert, tree) if earlier else tree

  return jax.tree_util.tree_map_with_path(stored_leaf, abstract), to_today


def restore_tree(directory: str | pathlib.Path, step: int, *, tree_item: str, like):
  """The tree saved at `step`, in the structure, shapes and dtypes of `like` (arrays or abstract arrays);
  leaves saved in an earlier layout are converted (`as_stored`)."""
  abstract, to_today = as_stored(directory, step, tree_item, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
  with _manager(directory) as mngr:
    tree = mngr.restore(step, args=ocp.args.Composite(**{tree_item: ocp.args.StandardRestore(abstract)}))[tree_item]
  return to_today(tree)


def save_model(directory: str | pathlib.Path, model: Beit, step: int = 0) -> None:
  save_with_config(directory, step, tree_item="params", tree=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                   config_item="model_config", config=model.config.to_dict())


def _restore_module(directory, step: int, tree_item: str, build, saved):
  """The module `build()` makes, with the `saved` variables (an nnx filter) restored from `tree_item` of `step`."""
  create = lambda: nnx.split(build(), saved, ...)
  graphdef, variables, _ = nnx.eval_shape(create)  # shapes only: the weights come from the checkpoint
  # The other state (drop-path RNG streams) must be real; under jit XLA drops the unused weight init.
  rest = jax.jit(lambda: create()[2])()
  nnx.replace_by_pure_dict(variables, restore_tree(directory, step, tree_item=tree_item,
                                                   like=nnx.to_pure_dict(variables)))
  return nnx.merge(graphdef, variables, rest)


def load_model(directory: str | pathlib.Path, step: int | None = None, **overrides) -> Beit:
  """Restores a model saved by `save_model` (the latest step by default); `overrides` change numerics only
  (e.g. dtype="bfloat16", attention_impl="cudnn", drop_path_rate=0.1)."""
  step, config = read_config(directory, step, config_item="model_config")
  cfg = BeitConfig(**config).replace(**overrides)
  return _restore_module(directory, step, "params", lambda: Beit(cfg, rngs=make_rngs(0)), nnx.Param)


_SEGMENTER_VARIABLES = nnx.Any(nnx.Param, nnx.BatchStat)


def save_segmenter(directory: str | pathlib.Path, model: segmentation.UperNet, step: int = 0) -> None:
  """A segmentation model: its parameters and BatchNorm statistics (`variables`) and both configs."""
  config = {"backbone": model.backbone.config.to_dict(), "segmentation": dataclasses.asdict(model.cfg)}
  save_with_config(directory, step, tree_item="variables", config_item="segmenter_config", config=config,
                   tree=nnx.to_pure_dict(nnx.state(model, _SEGMENTER_VARIABLES)))


def load_segmenter(directory: str | pathlib.Path, step: int | None = None, **overrides) -> segmentation.UperNet:
  """Restores a model saved by `save_segmenter`; `overrides` change the backbone's numerics only."""
  try:
    step, config = read_config(directory, step, config_item="segmenter_config", what="segmentation model")
  except FileNotFoundError:
    raise
  except Exception as e:  # orbax: no such item (a classifier's or backbone's folder)
    raise ValueError(f"{directory} holds no segmentation model (no segmenter_config: a backbone or classifier "
                     f"saved by save_model?): {first_line(e, 200)}") from None
  cfg = segmentation.SegConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config["segmentation"].items()})
  bcfg = BeitConfig(**config["backbone"]).replace(**overrides)
  return _restore_module(directory, step, "variables",
                         lambda: segmentation.UperNet(Beit(bcfg, rngs=make_rngs(0)), cfg, rngs=nnx.Rngs(0)),
                         _SEGMENTER_VARIABLES)
