"""The `tokenizer` step: PeCo tokenizer training before the GAN phase (configs.tokenizer(): VQGAN f16, L1 +
perceptual loss on a frozen BEiT's blocks + codebook loss, Adam) against taming-transformers' VQGAN with the same
losses on timm's BEiT features.
"""
# jax and torch are imported only in the worker that builds the step (the parent imports this module too).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import harness


def _config(args, batch: int):
  from beit_jax import configs
  config = configs.tokenizer()
  config.batch_size = batch
  config.tokenizer.name = args.tokenizer
  return config


def ours(args, batch: int, mesh) -> harness.OursStep:
  import jax
  from beit_jax.tokenizers import vqgan
  from beit_jax.train import sharding, tokenizer

  config = _config(args, batch)
  config.tokenizer.overrides = {"dtype": args.dtype}
  config.loss.perceptual.source = f"name:{args.model}"
  config.loss.perceptual.model_overrides = {"dtype": args.dtype, "attention_impl": args.attention}
  tcfg = vqgan.get_config(config.tokenizer.name, **config.tokenizer.overrides)
  perceptual = tokenizer.perceptual_loss(config)
  parts = tokenizer.create_state(config, tcfg, mesh, 100_000)
  step_fn = tokenizer.jit_train_step(config, mesh, parts, perceptual, gan=False)
  perc_state = jax.device_put(perceptual.state, sharding.replicated(mesh))
  images = harness.synthetic_batch(tokenizer.batch_spec(config, tcfg), mesh, unit=("image",))  # in [0, 1]
  return harness.OursStep(step_fn, parts["state"], images, perc_state)


def _features(torch, model, layers):
  """Outputs of blocks `layers` (1-based, [CLS] dropped) of a timm BEiT: the perceptual loss's features."""
  def features(x):
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    rel = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    out = []
    for i, blk in enumerate(model.blocks[:max(layers)], start=1):
      x = blk(x, shared_rel_pos_bias=rel)
      if i in layers:
        out.append(x[:, 1:])
    return out
  return features


def peer(args, batch: int, t: harness.Torch) -> harness.PeerStep:
  """taming's Encoder/Decoder/VectorQuantizer (the VQGAN PeCo builds on) of the tokenizer's shape, Adam."""
  import numpy as np
  from taming.modules.diffusionmodules.model import Decoder, Encoder
  from taming.modules.vqvae.quantize import VectorQuantizer
  from beit_jax import configs
  from beit_jax.tokenizers import vqgan

  torch = t.torch
  config = _config(args, batch)
  c = vqgan.get_config(config.tokenizer.name)
  arch = dict(ch=c.ch, out_ch=c.channels, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
              attn_resolutions=list(c.attn_resolutions), dropout=0.0, in_channels=c.channels,
              resolution=c.input_size, z_channels=c.z_channels, double_z=False)
  vq = torch.nn.ModuleDict({
      "encoder": Encoder(**arch), "decoder": Decoder(**arch),
      "quant_conv": torch.nn.Conv2d(c.z_channels, c.embed_dim, 1),
      "post_quant_conv": torch.nn.Conv2d(c.embed_dim, c.z_channels, 1),
      # ours: PecoConfig.beta None means 0.25 for the l2 quantizer (taming's)
      "quantize": VectorQuantizer(c.vocab_size, c.embed_dim, beta=0.25 if c.beta is None else c.beta)}).to(t.dev)
  encoder, decoder = t.compile(vq["encoder"]), t.compile(vq["decoder"])
  perc_net = t.timm.create_model(args.model, pretrained=False, num_classes=0).to(t.dev).eval().requires_grad_(False)
  features = t.compile(_features(torch, perc_net, tuple(config.loss.perceptual.layers)))
  mean = torch.tensor([0.485, 0.456, 0.406], device=t.dev).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], device=t.dev).view(1, 3, 1, 1)
  params = list(vq.parameters())
  o, recipe = config.optim, configs.tokenizer()
  lr = recipe.optim.lr / recipe.batch_size * batch  # taming's rule, base lr x batch (the recipe's is for its 128)
  opt = torch.optim.Adam(params, lr=lr, betas=(o.b1, o.b2), eps=o.eps, fused=t.gpu)
  images = torch.from_numpy(t.rng.uniform(size=(batch, 3, c.input_size, c.input_size)).astype(np.float32)).to(t.dev)
  w = config.loss

  def loss_fn():
    with t.autocast():
      z = vq["quant_conv"](encoder(2 * images - 1))
      z_q, codebook_loss, _ = vq["quantize"](z.float())
      recon = (decoder(vq["post_quant_conv"](z_q)) + 1) / 2
      with torch.no_grad():
        real = features((images - mean) / std)
      fake = features((recon - mean) / std)
      perc = sum(((a.float() - b.float()) ** 2).mean() for a, b in zip(real, fake))
    return (w.pixel_weight * (recon.float() - images).abs().mean() + w.perceptual_weight * perc
            + w.codebook_weight * codebook_loss)

  return harness.PeerStep(loss_fn, opt, params)
