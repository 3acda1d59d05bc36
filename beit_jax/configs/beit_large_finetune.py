"""Fine-tuning BEiT-L/16 on ImageNet-1K at 224 px (unilm's recipe for large: lr 1e-3, batch 1024, 50 epochs,
5 warm-up, layer decay 0.75, drop path 0.2; paper Table 13).

  python -m beit_jax.main --config=configs/beit_large_finetune.py:gs://bucket/beit_l_pretrain/model --workdir=gs://bucket/beit_l_ft

The paper reaches 85.2% top-1 at 224 px (86.3% at 384 px) after 800 epochs of pre-training on ImageNet-1K.
Shard the parameters (--config.mesh.fsdp=8) where the devices hold less than 32 GB.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.finetune()
  c.init = init if not init or init.startswith(("pytorch:", "checkpoint:")) else f"checkpoint:{init}"
  c.model.name = "beit_large_patch16_224"
  c.model.overrides = {"drop_path_rate": 0.2, "global_pool": "avg"}
  c.epochs = 50
  c.optim.lr, c.optim.warmup_steps, c.optim.layer_decay = 1e-3, 5 * 1251, 0.75
  return c
