"""Default config blocks shared by the files in configs/ (each file sets what differs and says how to run it).

The defaults are the paper's hyper-parameters (BEiT section 2.5 / Table 12, unilm run_beit_pretraining.py).
"""
from __future__ import annotations

import ml_collections


def pretrain() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "beit_base_patch16_224",
                                       "overrides": {"drop_path_rate": 0.1, "layer_scale_init": 0.1}})
  c.tokenizer = ml_collections.ConfigDict({"name": "dalle", "encoder": "", "decoder": None})
  c.data = ml_collections.ConfigDict({
      "source": "tfds:imagenet2012", "split": "train", "data_dir": None,
      "image_size": 224, "tokenizer_size": 112, "tokenizer_resize": "lanczos3", "color_jitter": 0.4,
      "mean_std": "inception",  # BEiT's default; the IN-1K recipe uses --imagenet_default_mean_and_std: "imagenet"
      "threads": None,
      "mask": {"num_masked": 75, "min_block": 16, "min_aspect": 0.3, "kind": "blockwise"},
  })
  c.batch_size = 2048
  c.epochs = 800
  c.total_steps = 0  # 0: epochs x steps per epoch
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1.5e-3, "min_lr": 1e-5, "warmup_steps": 10 * 625, "weight_decay": 0.05,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad": 3.0, "layer_decay": 1.0})
  c.grad_accum = 1
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.num_devices = 0  # 0: all; else the first n (tests compare meshes of different sizes)
  c.log_every = 100
  c.ckpt_every = 5000
  c.keep_checkpoints = 3
  return c
