"""The device mesh, logical-axis rules, and sharded creation of model and optimizer state (what pjit became).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism that also shards parameters and optimizer
state along their `embed` axis, ZeRO-3 style) and `tensor` (Megatron-style: MLP hidden units, attention heads,
the vocabulary). The batch is split over (data, fsdp). Axes have the Auto type: XLA's GSPMD propagates the
shardings of the step from those of its inputs, which is what the model code is written for.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The model's logical parameter axes -> mesh axes (see beit_jax/models/layers.py for where they appear).
RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None), ("relpos", None), ("classes", None), ("patch", None), ("channels", None),
    ("conv_in", None), ("conv_out", "fsdp"), ("codebook", None), ("code_dim", None), ("probes", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from a config's `mesh` block; one size may be -1 (the rest)."""
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; use {MESH_AXES}")
  sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(spec)}: axis sizes must be positive, or -1 for the rest of the devices")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(spec)}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(spec)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh={dict(spec)} needs {int(np.prod(sizes))} devices, there are {num_devices}")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_sharding(mesh: Mesh, axes: Sequence[str | None] | None, rules=RULES) -> NamedSharding:
  """A parameter's NamedSharding from its logical axis names (None or an unknown name: replicated axis)."""
  if axes is None:
    return replicated(mesh)
  table = dict(rules)
  return NamedSharding(mesh, P(*[table.get(a) if a is not None else None for a in axes]))


def _variable_shardings(mesh: Mesh, state: nnx.State, rules) -> nnx.State:
  def one(var):
    axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    return var.replace(logical_sharding(mesh, axes, rules)) if isinstance(var, nnx.Variable) else replicated(mesh)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_sharded(create: Callable[[], nnx.Module], mesh: Mesh, filters=(nnx.Param, ...), rules=RULES, *,
                   abstract: bool = False):
  """(graphdef, *states) of `create()`, each array created directly in its sharding by one jitted init.

  No device ever holds the whole unsharded model: the shardings come from the parameters' logical axes
  (abstractly, via nnx.eval_shape), and the init runs under jax.jit with those as out_shardings. With
  `abstract=True` nothing is allocated: the states hold jax.ShapeDtypeStructs with their shardings, for
  lowering and compiling a step ahead of time (memory and cost analysis, other topologies).
  """
  def init():
    return tuple(nnx.split(create(), *filters)[1:])

  # Under the mesh and rules flax also constrains each new variable to its sharding inside the jit (and the
  # variables' metadata records that, so the abstract pass must run in the same context).
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, *shapes = nnx.split(nnx.eval_shape(create), *filters)
    shardings = tuple(_variable_shardings(mesh, s, rules) for s in shapes)
    states = _abstract(tuple(shapes), shardings) if abstract else jax.jit(init, out_shardings=shardings)()
  return (graphdef, *states)


def place(module: nnx.Module, mesh: Mesh, filters=(nnx.Param, ...), rules=RULES):
  """(graphdef, *states) of an existing module (e.g. a loaded checkpoint), each array put in the sharding its
  logical axes give. The module is built on the host first: right for models that fit one host's memory
  (every BEiT size); a model too large for that would be restored sharded from an orbax checkpoint instead."""
  graphdef, *states = nnx.split(module, *filters)
  with jax.set_mesh(mesh):
    return (graphdef, *(jax.device_put(s, _variable_shardings(mesh, s, rules)) for s in states))


def create_opt_state(tx, params, mesh: Mesh, *, abstract: bool = False):
  """`tx.init(params)` created directly in its shardings: moments shaped like a parameter are sharded like it,
  everything else (step counts) replicated. `abstract=True`: ShapeDtypeStructs, nothing allocated."""
  shapes = jax.eval_shape(tx.init, params)
  try:
    out = optax.tree_map_params(tx, lambda _, s: s, shapes, shardings_of(params),
                                transform_non_params=lambda _: replicated(mesh))
  except IndexError:
    # A transformation whose init reads the parameters' values (optax.lbfgs's line search) cannot be mapped
    # over placeholders: its state is replicated (the linear probes', a few MB of L-BFGS history).
    out = jax.tree.map(lambda _: replicated(mesh), shapes)
  if abstract:
    return _abstract(shapes, out)
  with jax.set_mesh(mesh):
    return jax.jit(tx.init, out_shardings=out)(params)


def scalar(value: int, mesh: Mesh, *, abstract: bool = False):
  """A replicated int32 (a step count), or its ShapeDtypeStruct."""
  if abstract:
    return jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
  return jax.device_put(jnp.int32(value), replicated(mesh))


def train_state(params, rest, tx, mesh: Mesh, *, abstract: bool = False) -> dict:
  """The train state of the BEiT trainers: step, params, optimizer state (created in its shardings), the
  model's other variables (RNG streams) and the first non-finite step (-1: none yet)."""
  return {"step": scalar(0, mesh, abstract=abstract), "params": params,
          "opt_state": create_opt_state(tx, params, mesh, abstract=abstract), "rest": rest,
          "nonfinite_step": scalar(-1, mesh, abstract=abstract)}


def shardings_of(tree) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def per_device_bytes(tree) -> int:
  """Bytes of `tree` held by one device (the first), from the arrays' shards."""
  dev = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == dev:
        total += shard.data.nbytes
  return total
