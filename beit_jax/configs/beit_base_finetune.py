"""Fine-tuning BEiT-B/16 on ImageNet-1K at 224 px (paper Table 13; unilm's recipe: lr 4e-3, batch 1024, 100
epochs, 20 warm-up, layer decay 0.65, drop path 0.1, weight decay 0.05, mixup 0.8 / cutmix 1.0, smoothing 0.1,
RandAugment 9/0.5, random erasing 0.25).

  python -m beit_jax.main --config=configs/beit_base_finetune.py:gs://bucket/beit_b_pretrain/model --workdir=gs://bucket/beit_b_ft

The argument is a pre-training run's workdir/model, or "pytorch:PATH" for a converted unilm/timm/HF checkpoint.
After 800 epochs of BEiT pre-training the paper reaches 83.2% top-1 (84.6% after 10 more epochs at 384 px:
--config.model.overrides.img_size=384 --config.data.image_size=384, init from the 224 px classifier).
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.finetune()
  c.init = init if not init or init.startswith(("pytorch:", "checkpoint:")) else f"checkpoint:{init}"
  return c
