"""The masked-image-modelling steps: `pretrain` (BEiT-B/16 on DALL-E ids, configs.pretrain()) and `miniature`
(configs/fmnist_pretrain.py: beit_fmnist on the ids of its PeCo tokenizer). Both sides tokenize inside the step.
"""
# jax and torch are imported only in the worker that builds the step (the parent imports this module too).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import harness


# -- ours -----------------------------------------------------------------------------------------------------
def _ours(config, tok, batch: int, mesh) -> harness.OursStep:
  """The pre-training trainer's jitted step for `config` and tokenizer module `tok`, its state and a synthetic
  batch of the real shapes (blockwise masks as the pipeline makes them)."""
  import jax
  import numpy as np
  from flax import nnx
  from beit_jax.data import masking  # numpy only
  from beit_jax.train import pretrain, sharding

  cfg = pretrain.model_config(config, tok.vocab_size)
  graphdef, state, tx, lr_fn = pretrain.create_state(config, cfg, mesh, 100_000)
  tok_graphdef, tok_state = nnx.split(tok)
  tok_state = jax.device_put(tok_state, sharding.replicated(mesh))
  d = config.data
  masks = masking.blockwise_masks(0, np.arange(batch), cfg.grid, d.mask.num_masked, d.mask.min_block,
                                  d.mask.min_aspect)
  host = harness.synthetic_batch(pretrain.batch_spec(config, cfg.grid), mesh, given={"mask": masks},
                                 unit=("tokenizer_image",))
  step_fn = pretrain.jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, d.mask.num_masked)
  return harness.OursStep(step_fn, state, host, tok_state)


def _pretrain_config(args, batch: int):
  from beit_jax import configs
  config = configs.pretrain()
  config.batch_size = batch
  config.model.name = args.model
  return config


def _miniature_config(batch: int):
  """configs/fmnist_pretrain.py with `batch`, and its tokenizer's PecoConfig (RGB, as the pipeline feeds it)."""
  from beit_jax import configs
  from beit_jax.tokenizers import vqgan
  config = configs.load("fmnist_pretrain")
  config.batch_size = batch
  return config, vqgan.get_config("peco_fmnist_small", channels=3)


def pretrain(args, batch: int, mesh) -> harness.OursStep:
  from flax import nnx
  from beit_jax.tokenizers import dalle

  config = _pretrain_config(args, batch)
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  tok = dalle.DalleTokenizer(dalle.DalleConfig(dtype=args.dtype), decoder=False, rngs=nnx.Rngs(0))
  return _ours(config, tok, batch, mesh)


def miniature(args, batch: int, mesh) -> harness.OursStep:
  from flax import nnx
  from beit_jax.tokenizers import vqgan

  config, tcfg = _miniature_config(batch)
  config.model.overrides = {**dict(config.model.overrides), "dtype": args.dtype}
  tok = vqgan.PecoTokenizer(tcfg.replace(dtype=args.dtype), rngs=nnx.Rngs(0))
  tok.eval()
  return _ours(config, tok, batch, mesh)


# -- the PyTorch peers ----------------------------------------------------------------------------------------
def _torch_mim(torch, beit, vocab: int):
  """unilm's VisionTransformerForMaskedImageModeling (beit/modeling_pretrain.py) over a timm `Beit`: the mask
  token replaces masked patch embeddings before [CLS] and the position embedding (where there is one) are added,
  the relative position bias shared by all blocks (where there is one), and the LM head runs on the masked
  positions only."""
  class Mim(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.beit = beit
      d = self.beit.embed_dim
      self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, d))
      torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
      self.norm = torch.nn.LayerNorm(d, eps=1e-6)
      self.lm_head = torch.nn.Linear(d, vocab)

    def forward(self, x, mask):
      b = self.beit
      x = b.patch_embed(x)
      w = mask.unsqueeze(-1).type_as(x)
      x = x * (1 - w) + self.mask_token.expand(x.shape[0], x.shape[1], -1) * w
      x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
      if b.pos_embed is not None:
        x = x + b.pos_embed
      x = b.pos_drop(x)
      rel_pos_bias = b.rel_pos_bias() if b.rel_pos_bias is not None else None
      for blk in b.blocks:
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
      return self.lm_head(self.norm(x)[:, 1:][mask])

  return Mim()


def _peer(t: harness.Torch, config, beit, vocab: int, ids_of, batch: int) -> harness.PeerStep:
  """unilm's pre-training step on timm `beit` with the recipe of `config` (AdamW, gradient clip, image sizes,
  blockwise masks): `ids_of(tokenizer images)`, under no_grad, are the targets of the masked positions."""
  import numpy as np
  from beit_jax.data import masking  # numpy only

  torch = t.torch
  model = _torch_mim(torch, beit, vocab).to(t.dev)
  net = t.compile(model)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = t.adamw(params, config.optim)
  d = config.data
  images = torch.from_numpy(t.rng.standard_normal((batch, 3, d.image_size, d.image_size), np.float32)).to(t.dev)
  tok_images = torch.from_numpy(t.rng.uniform(size=(batch, 3, d.tokenizer_size, d.tokenizer_size)).astype(
      np.float32)).to(t.dev)
  mask = torch.from_numpy(masking.blockwise_masks(0, np.arange(batch), beit.patch_embed.grid_size,
                                                  d.mask.num_masked, d.mask.min_block, d.mask.min_aspect)).to(t.dev)
  mask = mask.reshape(batch, -1).bool()

  def loss_fn():
    with torch.no_grad(), t.autocast():
      ids = ids_of(tok_images)
    with t.autocast():
      logits = net(images, mask)
    return t.F.cross_entropy(logits.float(), ids[mask])

  return harness.PeerStep(loss_fn, opt, params, config.optim.clip_grad)


def pretrain_peer(args, batch: int, t: harness.Torch) -> harness.PeerStep:
  """OpenAI's `dall_e` Encoder on the 112 px view + timm's BEiT in unilm's pre-training layout."""
  from dall_e.encoder import Encoder
  from dall_e.utils import map_pixels

  config = _pretrain_config(args, batch)
  enc = Encoder(device=t.dev, requires_grad=False, use_mixed_precision=False).eval()
  encode = t.compile(enc)
  # The layout of pretrain.PRETRAIN_LAYOUT (one relative position bias shared by the blocks), written out: that
  # module imports jax, which would swell this process's memory figures. LayerScale: timm's value for the name.
  beit = t.timm.create_model(args.model, pretrained=False, num_classes=0,
                             drop_path_rate=config.model.overrides.drop_path_rate, use_rel_pos_bias=False,
                             use_shared_rel_pos_bias=True)
  return _peer(t, config, beit, enc.vocab_size, lambda x: encode(map_pixels(x)).argmax(1).flatten(1), batch)


def miniature_peer(args, batch: int, t: harness.Torch) -> harness.PeerStep:
  """taming's Encoder + quant_conv + the nearest normalised code, of peco_fmnist_small's shape, + timm's Beit of
  beit_fmnist's shape in the same layout."""
  import math
  from timm.models.beit import Beit
  from taming.modules.diffusionmodules import model as taming_model
  from beit_jax import models

  torch, F = t.torch, t.F
  # Ours takes gcd(32, channels) GroupNorm groups (vqgan.GroupNorm); taming's 32 do not divide 16 channels.
  taming_model.Normalize = lambda channels: torch.nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6,
                                                               affine=True)
  config, c = _miniature_config(batch)
  m = models.get_config(config.model.name, **dict(config.model.overrides))
  enc = taming_model.Encoder(ch=c.ch, out_ch=c.channels, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                             attn_resolutions=list(c.attn_resolutions), dropout=0.0, in_channels=c.channels,
                             resolution=c.input_size, z_channels=c.z_channels, double_z=False)
  if not c.mid_attn:
    enc.mid.attn_1 = torch.nn.Identity()  # peco_fmnist_small has no mid-block attention
  tok = torch.nn.ModuleDict({"encoder": enc, "quant_conv": torch.nn.Conv2d(c.z_channels, c.embed_dim, 1)})
  tok = tok.to(t.dev).eval().requires_grad_(False)
  codebook = F.normalize(torch.randn(c.vocab_size, c.embed_dim, device=t.dev), dim=-1)
  encoder = t.compile(tok["encoder"])
  beit = Beit(img_size=m.img_size, patch_size=m.patch_size, num_classes=0, embed_dim=m.width, depth=m.depth,
              num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, use_abs_pos_emb=m.use_abs_pos_emb,
              use_rel_pos_bias=m.use_rel_pos_bias, use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
              init_values=m.layer_scale_init or None, drop_path_rate=m.drop_path_rate)

  def ids_of(x):
    z = F.normalize(tok["quant_conv"](encoder(2 * x - 1)).float(), dim=1)  # [B, D, h, w]
    return torch.einsum("bdhw,kd->bhwk", z, codebook).argmax(-1).flatten(1)

  return _peer(t, config, beit, c.vocab_size, ids_of, batch)
