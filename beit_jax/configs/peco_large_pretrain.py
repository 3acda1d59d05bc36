"""PeCo ViT-L/16 pre-training (LayerScale 1e-5, clip 1.0 as BEiT-L).

  python -m beit_jax.main --config=configs/peco_large_pretrain.py:/path/to/tokenizer --workdir=gs://.../peco_l
"""
from beit_jax import configs


def get_config(tokenizer_checkpoint: str = ""):
  c = configs.peco_tokens(configs.large_recipe(configs.pretrain(), "beit_large_patch16_224"), tokenizer_checkpoint)
  c.data.mean_std = "imagenet"
  return c
