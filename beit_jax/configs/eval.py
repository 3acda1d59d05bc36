"""Evaluate a classifier (converted or ours) on a held-out split: top-1 / top-5, every example counted once.

  python -m beit_jax.main --config=configs/eval.py --config.init=pytorch:/path/beit_base_patch16_224_pt22k_ft22kto1k.pth \\
      --workdir=/tmp/eval

`config.init` (or the config argument, `configs/eval.py:pytorch:PATH`) is "pytorch:PATH" (unilm .pth, timm or HF checkpoint) or "checkpoint:DIR" (our fine-tuning run's
workdir/model). The defaults evaluate a BEiT-B/16 at 224 on ImageNet-1K validation (tfds imagenet2012, which
must be prepared under data_dir); with the official BEiT-B/16 fine-tuned weights (IN-1K pre-training) the
paper reports 83.2% top-1. For another model set --config.model.name (and .overrides, e.g. global_pool) to its
architecture, and --config.data.image_size to its resolution.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.finetune()
  c.mode = "eval"
  c.init = init  # required: here or as --config.init
  c.batch_size = 256
  c.eval_split = "validation"
  return c
