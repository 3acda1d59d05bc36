"""The `segmentation` step: ADE20K UperNet on BEiT (configs.segmentation(): 512 px crops, auxiliary FCN head,
AdamW with layer decay, drop path) against HF transformers' `BeitForSemanticSegmentation`.
"""
# jax and torch are imported only in the worker that builds the step (the parent imports this module too).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import harness

NUM_CLASSES = 150  # ADE20K's (the config's data.num_classes is 0: from the data set)
IGNORE = 255  # ADE20K's unlabelled pixels, which both losses skip
# transformers' BeitConfig wants the shape spelled out: (width, depth, heads) of the BEiTs it is benchmarked with.
HF_SHAPES = {"beit_base_patch16_224": (768, 12, 12), "beit_large_patch16_224": (1024, 24, 16)}


def _config(args, batch: int):
  from beit_jax import configs
  config = configs.segmentation()
  config.batch_size = batch
  config.model.name = args.model
  return config


def _batch(config, batch: int):
  """Crops of the config's size, labels of the 150 classes with 10% of the pixels unlabelled (NHWC, uint8)."""
  import numpy as np
  size = config.data.crop_size
  rng = np.random.default_rng(0)
  labels = rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = IGNORE
  return rng.standard_normal((batch, size, size, 3), np.float32), labels


def ours(args, batch: int, mesh) -> harness.OursStep:
  from beit_jax.train import segmentation

  config = _config(args, batch)
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  bcfg, seg_cfg = segmentation.model_configs(config, NUM_CLASSES)
  graphdef, state, tx, lr_fn = segmentation.create_state(config, bcfg, seg_cfg, mesh, 100_000)
  _, labels = _batch(config, batch)  # the labels with their unlabelled pixels, as the peer's
  step_fn = segmentation.jit_train_step(config, mesh, state, graphdef, tx, lr_fn)
  return harness.OursStep(step_fn, state,
                          harness.synthetic_batch(segmentation.batch_spec(config), mesh, given={"annotation": labels}))


def peer(args, batch: int, t: harness.Torch) -> harness.PeerStep:
  """unilm's released UperNet as transformers ported it (the loss, auxiliary head included, computed inside)."""
  import numpy as np
  from beit_jax.convert.timm_compat import import_transformers

  if args.model not in HF_SHAPES:
    raise SystemExit(f"segmentation's peer knows --model={' or '.join(HF_SHAPES)}, not {args.model!r}")
  torch = t.torch
  transformers = import_transformers()
  config = _config(args, batch)
  width, depth, heads = HF_SHAPES[args.model]
  hf_config = transformers.BeitConfig(
      image_size=config.data.crop_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      intermediate_size=4 * width, use_relative_position_bias=True, layer_scale_init_value=0.1,
      drop_path_rate=config.model.overrides.drop_path_rate, use_auxiliary_head=True,
      auxiliary_loss_weight=config.aux_weight, semantic_loss_ignore_index=IGNORE, num_labels=NUM_CLASSES,
      # unilm's four taps in transformers' numbering (ours: config.seg.out_indices empty, unilm's default)
      out_indices=[3, 5, 7, 11] if depth == 12 else [7, 11, 15, 23])
  model = transformers.BeitForSemanticSegmentation(hf_config).to(t.dev).train()
  net = t.compile(model)
  params = list(model.parameters())
  opt = t.adamw(params, config.optim)
  x, y = _batch(config, batch)
  images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(t.dev)
  labels = torch.from_numpy(y.astype(np.int64)).to(t.dev)

  def loss_fn():
    with t.autocast():
      loss = net(pixel_values=images, labels=labels).loss
    return loss.float()

  return harness.PeerStep(loss_fn, opt, params)
