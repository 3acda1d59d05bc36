"""Filling a conv tokenizer's NNX parameters from a PyTorch state dict (DALL-E's dVAE, taming's VQGAN): one strict
loop, so a checkpoint either loads whole or fails naming the tensor."""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def load_params(module: nnx.Module, sd: Mapping[str, np.ndarray], names: Mapping[tuple, str], what: str, *,
                ignored_prefixes: tuple[str, ...] = (), hint: str = "") -> None:
  """Sets every nnx.Param of `module` to `sd[names[path]]` (4-d convs OIHW -> HWIO), in place. A missing tensor,
  a shape mismatch or a tensor of `sd` the module does not use (outside `ignored_prefixes`) is a ValueError
  naming it, `what` saying whose checkpoint it is and `hint` what to check: a silently partial load would leave
  default weights that still run."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  for path, var in flat:
    name = names[path]
    if name not in sd:
      raise ValueError(f"{what} lacks tensor {name!r} (for {'/'.join(map(str, path))})")
    value = np.asarray(sd[name], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != var.shape:
      raise ValueError(f"{what} tensor {name!r} has shape {value.shape} (as HWIO), expected {var.shape}{hint}")
    var.set_value(jnp.asarray(value))
  extra = sorted(k for k in set(sd) - set(names.values()) if not k.startswith(ignored_prefixes))
  if extra:
    raise ValueError(f"{what} has tensors this model does not use: {extra[:5]}"
                     + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
  nnx.update(module, nnx.from_flat_state(flat))
