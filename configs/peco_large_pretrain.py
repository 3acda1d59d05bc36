"""PeCo ViT-L/16 pre-training (LayerScale 1e-5, clip 1.0 as BEiT-L).

  python -m beit_jax.main --config=configs/peco_large_pretrain.py:/path/to/tokenizer --workdir=gs://.../peco_l
"""
from beit_jax import configs


def get_config(tokenizer_checkpoint: str = ""):
  c = configs.pretrain()
  c.model.name = "beit_large_patch16_224"
  c.model.overrides = {"drop_path_rate": 0.1, "layer_scale_init": 1e-5}
  c.tokenizer = {"name": "peco", "checkpoint": tokenizer_checkpoint}
  c.data.tokenizer_size = 224
  c.data.tokenizer_resize = "bicubic"
  c.data.mean_std = "imagenet"
  c.optim.clip_grad = 1.0
  return c
