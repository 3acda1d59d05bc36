"""The `finetune` step: ImageNet-1K fine-tuning of BEiT (configs.finetune(): mixup/cutmix, label smoothing, layer
decay, drop path) against timm's model with timm's Mixup and SoftTargetCrossEntropy.
"""
# jax and torch are imported only in the worker that builds the step (the parent imports this module too).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import harness

NUM_CLASSES = 1000  # ImageNet-1K's (the config's data source; its classifier's width comes from the data set)


def _config(args, batch: int):
  from beit_jax import configs
  config = configs.finetune()
  config.batch_size = batch
  config.model.name = args.model
  return config


def ours(args, batch: int, mesh) -> harness.OursStep:
  from beit_jax.train import finetune, weights

  config = _config(args, batch)
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  cfg = weights.classifier_config(config, NUM_CLASSES)
  graphdef, state, tx, lr_fn = finetune.create_state(config, cfg, mesh, 100_000)
  step_fn = finetune.jit_train_step(config, mesh, state, graphdef, tx, lr_fn, cfg.num_classes)
  spec = finetune.batch_spec(config)
  high = {"label": NUM_CLASSES, **({"erase": config.data.image_size} if "erase" in spec else {})}  # data.uint8
  return harness.OursStep(step_fn, state, harness.synthetic_batch(spec, mesh, high=high))


def peer(args, batch: int, t: harness.Torch) -> harness.PeerStep:
  """timm's BEiT, timm's Mixup (cutmix, label smoothing) and SoftTargetCrossEntropy, AdamW; no layer decay."""
  import numpy as np
  from timm.data import Mixup
  from timm.loss import SoftTargetCrossEntropy

  torch = t.torch
  config = _config(args, batch)
  model = t.timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES,
                              drop_path_rate=config.model.overrides.drop_path_rate).to(t.dev)
  net = t.compile(model)
  params = list(model.parameters())
  opt = t.adamw(params, config.optim)
  m = config.mixup
  mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                label_smoothing=config.label_smoothing, num_classes=NUM_CLASSES)
  criterion = SoftTargetCrossEntropy()
  size = config.data.image_size
  images = torch.from_numpy(t.rng.standard_normal((batch, 3, size, size), np.float32)).to(t.dev)
  labels = torch.from_numpy(t.rng.integers(0, NUM_CLASSES, batch)).to(t.dev)

  def loss_fn():
    x, y = mixup(images.clone(), labels)
    with t.autocast():
      logits = net(x)
    return criterion(logits.float(), y)

  return harness.PeerStep(loss_fn, opt, params)
