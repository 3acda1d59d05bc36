"""Losses of PeCo tokenizer training (VQGAN's recipe with a transformer as the perceptual network).

taming/modules/losses/vqperceptual.py: nll = pixel loss + w_p * perceptual loss (L78-81); generator loss = nll +
adaptive_weight * disc_factor * (-mean D(x_hat)) + codebook loss (L107); hinge loss for the discriminator (L20-24).
PeCo replaces LPIPS-VGG by the distance of deep features of a self-supervised ViT over several blocks.

Everything here is a pure function of arrays except `PerceptualLoss`, which holds the frozen feature network as a
(graphdef, state) pair and is still a pure function of (images, state).
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from beit_jax.models.beit import Beit

BEIT_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # BEiT checkpoints (timm's IMAGENET_INCEPTION_*)
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # MoCo v3, supervised ViTs


def pixel_loss(x, y, kind: str = "l1"):
  """Mean |x - y| ("l1", taming's rec_loss) or mean (x - y)^2 ("l2") over all elements, f32."""
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.abs(d))
  if kind == "l2":
    return jnp.mean(jnp.square(d))
  raise ValueError(f"pixel_loss kind={kind!r}: must be 'l1' or 'l2'")


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake):
  """-mean D(x_hat): the generator's side of the hinge GAN."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_nll_last, grad_g_last, disc_weight: float = 0.8):
  """taming's calculate_adaptive_weight (vqperceptual.py L63-73): balances the GAN term against the nll.

  ||grad_last nll|| / (||grad_last g|| + 1e-4), clipped to [0, 1e4], stop-gradient, times disc_weight; the
  gradients are with respect to the decoder's last layer (`PecoTokenizer.last_layer`).
  """
  w = jnp.linalg.norm(jnp.ravel(grad_nll_last)) / (jnp.linalg.norm(jnp.ravel(grad_g_last)) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4)) * disc_weight


def disc_factor(step, start: int, factor: float = 1.0):
  """taming's adopt_weight: 0 before step `start` (the discriminator is off), `factor` from it on. Works traced."""
  return jnp.where(jnp.asarray(step) >= start, factor, 0.0).astype(jnp.float32)


class PerceptualLoss:
  """sum_l mean((f_l(x) - f_l(x_hat))^2) over blocks `layers` of a frozen BEiT/ViT (PeCo's perceptual loss).

  f_l is `hidden_states[l]` of `model(images, return_hidden_states=True)`: l = 0 is the patch embedding, l >= 1 the
  output of block l (so (3, 6, 9, 12) are the outputs of blocks 3, 6, 9 and 12 of a ViT-B). The [CLS] token is
  left out: PeCo's distance is over the spatial feature maps, normalised by C*H*W (a mean). Blocks after the
  deepest chosen one are dead code that XLA removes under jit.

  `normalize=True` unit-normalises every token's feature vector over channels first and sums the squared
  differences over channels (taming's LPIPS distance without its learned channel weights): each token then
  contributes a value in [0, 4] whatever the scale of the network's residual stream. The plain form's scale
  follows the network's (a BEiT with LayerScale 0.1 has small hidden states, and its loss is ~1% of the pixel
  loss at equal weights), so its weight must be tuned per network; the normalised one is comparable across them.

  Images are the tokenizer's: NHWC in [0, 1] (x_hat may leave it), 1 or 3 channels, any size. Before the network
  they are resized to its img_size (bilinear), repeated to 3 channels when grayscale, and normalised with the
  network's own `mean`/`std` (BEiT's (0.5, 0.5) by default; use IMAGENET_NORMALIZATION for MoCo v3).

  The network is not an nnx attribute of anything: it is held as (graphdef, state), so it never appears in the
  tokenizer's state, and `__call__` puts a stop_gradient on the state: the loss is a function of the images only,
  and jax.grad never computes (or lets an optimizer apply) gradients for the feature network.
  """

  def __init__(self, model: Beit, layers: Sequence[int] = (3, 6, 9, 12), *,
               mean: Sequence[float] = BEIT_NORMALIZATION[0], std: Sequence[float] = BEIT_NORMALIZATION[1],
               resize_method: str = "bilinear", normalize: bool = False):
    cfg = model.config
    layers = tuple(int(l) for l in layers)
    if not layers or any(not 0 <= l <= cfg.depth for l in layers):
      raise ValueError(f"PerceptualLoss layers={layers}: each must be in [0, {cfg.depth}] (the feature network "
                       f"has {cfg.depth} blocks; hidden state l is the output of block l)")
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
      raise ValueError(f"PerceptualLoss mean/std need {cfg.in_chans} values (the network's in_chans), "
                       f"got mean={tuple(mean)}, std={tuple(std)}")
    # An eval-mode view (no stochastic depth) sharing the caller's arrays; the caller's model keeps its mode.
    self.graphdef, self.state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
    self.layers = layers
    self.img_size, self.in_chans = cfg.img_size, cfg.in_chans
    self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    self.resize_method = resize_method
    self.normalize = normalize

  # -- ways to get the feature network ----------------------------------------------------------------------
  @classmethod
  def from_name(cls, name: str, layers: Sequence[int] = (3, 6, 9, 12), *, seed: int = 0, model_overrides=None,
                **kwargs) -> "PerceptualLoss":
    """A registry model (`beit_jax.models.create_model(name, **model_overrides)`): random weights, for tests."""
    from beit_jax.models.registry import create_model  # pylint: disable=import-outside-toplevel
    return cls(create_model(name, seed=seed, **(model_overrides or {})), layers, **kwargs)

  @classmethod
  def from_pytorch(cls, path: str | pathlib.Path, layers: Sequence[int] = (3, 6, 9, 12), *, model_overrides=None,
                   **kwargs) -> "PerceptualLoss":
    """A unilm/timm/HF BEiT checkpoint via `convert.pytorch.load_pytorch_checkpoint`."""
    from beit_jax.convert.pytorch import load_pytorch_checkpoint  # pylint: disable=import-outside-toplevel
    return cls(load_pytorch_checkpoint(path, **(model_overrides or {})), layers, **kwargs)

  @classmethod
  def from_checkpoint(cls, directory: str | pathlib.Path, layers: Sequence[int] = (3, 6, 9, 12), *,
                      model_overrides=None, **kwargs) -> "PerceptualLoss":
    """An orbax checkpoint written by `beit_jax.model_files.save_model`."""
    from beit_jax.model_files import load_model  # pylint: disable=import-outside-toplevel
    return cls(load_model(directory, **(model_overrides or {})), layers, **kwargs)

  # -- the loss ---------------------------------------------------------------------------------------------
  def prepare(self, images):
    """Tokenizer images [B, H, W, 1|3] in [0, 1] -> the network's input [B, S, S, in_chans], normalised."""
    if images.ndim != 4 or images.shape[-1] not in (1, self.in_chans):
      raise ValueError(f"PerceptualLoss takes NHWC images with 1 or {self.in_chans} channels, "
                       f"got {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (self.img_size, self.img_size):
      x = jax.image.resize(x, (x.shape[0], self.img_size, self.img_size, x.shape[3]), self.resize_method)
    if x.shape[-1] != self.in_chans:
      x = jnp.repeat(x, self.in_chans, axis=-1)  # grayscale -> RGB
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def features(self, images, state: Optional[nnx.State] = None) -> list:
    """The chosen hidden states [B, N, D] (patch tokens), f32, with the network's weights frozen."""
    # Floating leaves only: the state may hold RNG keys/counters (stochastic depth), which have no gradient.
    frozen = lambda v: jax.lax.stop_gradient(v) if jnp.issubdtype(v.dtype, jnp.inexact) else v
    state = jax.tree.map(frozen, self.state if state is None else state)
    model = nnx.merge(self.graphdef, state)
    _, hidden = model(self.prepare(images), return_hidden_states=True)
    return [hidden[l][:, 1:].astype(jnp.float32) for l in self.layers]

  def __call__(self, x, x_hat, state: Optional[nnx.State] = None):
    """The perceptual distance of x_hat to x (a scalar). Pass `state` (this object's `.state`) as an argument of a
    jitted step to keep the weights out of the compiled program's constants; by default the held state is used."""
    if x.shape != x_hat.shape:
      raise ValueError(f"PerceptualLoss compares images of one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    # One pass over [x; x_hat]: half the kernel launches of two, the same numbers.
    both = self.features(jnp.concatenate([jax.lax.stop_gradient(x), x_hat]), state)
    b = x.shape[0]
    if self.normalize:
      unit = lambda f: f * jax.lax.rsqrt(jnp.sum(jnp.square(f), -1, keepdims=True) + 1e-10)
      return sum(jnp.mean(jnp.sum(jnp.square(unit(f[:b]) - unit(f[b:])), -1)) for f in both)
    return sum(jnp.mean(jnp.square(f[:b] - f[b:])) for f in both)
