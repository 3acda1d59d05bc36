"""VQGAN's PatchGAN discriminator (taming/modules/discriminator/model.py `NLayerDiscriminator`, from pix2pix).

  conv 4x4 s2 (C -> ndf) + LeakyReLU(0.2)
  n_layers - 1 x [conv 4x4 s2 + BatchNorm + LeakyReLU(0.2)], widths ndf * min(2^n, 8)
  conv 4x4 s1 + BatchNorm + LeakyReLU(0.2), width ndf * min(2^n_layers, 8)
  conv 4x4 s1 -> 1 channel: a map of logits, one per overlapping patch (30x30 for 256 px and 3 layers).
All convs pad 1. Init as taming's weights_init: conv weights N(0, 0.02) (the biases of the first and last conv keep
PyTorch's default; the others have none, BatchNorm follows them), BatchNorm scale N(1, 0.02) and bias 0.

Normalisation: nnx.BatchNorm, as taming (its ActNorm option is left out). In train mode (`d.train()`, the default)
it normalises with the statistics of the batch it is given and updates its running averages, which are
`nnx.BatchStat` state: optimizers built with wrt=nnx.Param skip them, and an nnx.jit / nnx.value_and_grad step
carries them in and out, so a pure jitted step is no harder than with GroupNorm. Two consequences to respect:
  * call the discriminator on real and on fake images *separately* (as taming does): in one concatenated batch,
    BatchNorm would mix their statistics and the discriminator could tell them apart by batch composition;
  * under jit on a batch sharded over devices the statistics are over the global batch (SyncBatchNorm), while
    taming's DDP BatchNorm uses each GPU's share.
Eval mode (`d.eval()`) uses the running averages; VQGAN training never needs it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from beit_jax.tokenizers.vqgan import Conv


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


class NLayerDiscriminator(nnx.Module):
  """NHWC images -> patch logits [B, h, w, 1] f32. taming feeds [-1, 1]; give real and fake in one range."""

  def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *, momentum: float = 0.9,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if n_layers < 1:
      raise ValueError(f"NLayerDiscriminator n_layers={n_layers}: must be >= 1")
    conv_init = _normal(0.0, 0.02)
    pad = ((1, 1), (1, 1))
    widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
    self.conv_in = Conv(input_nc, ndf, 4, stride=2, padding=pad, kernel_init=conv_init, dtype=dtype, rngs=rngs)
    strides = [2] * (n_layers - 1) + [1]
    self.convs = nnx.List([
        Conv(widths[i], widths[i + 1], 4, stride=strides[i], padding=pad, use_bias=False, kernel_init=conv_init,
             dtype=dtype, rngs=rngs) for i in range(n_layers)])
    # PyTorch's BatchNorm2d momentum 0.1 = weight of the new batch; flax's momentum is the weight of the old average.
    self.norms = nnx.List([
        nnx.BatchNorm(w, momentum=momentum, epsilon=1e-5, scale_init=_normal(1.0, 0.02), dtype=jnp.float32,
                      rngs=rngs) for w in widths[1:]])
    self.conv_out = Conv(widths[-1], 1, 4, padding=pad, kernel_init=conv_init, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.leaky_relu(norm(conv(x).astype(jnp.float32)), 0.2)
    return self.conv_out(x).astype(jnp.float32)
