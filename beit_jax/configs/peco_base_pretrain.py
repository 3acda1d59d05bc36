"""PeCo ViT-B/16 pre-training: BEiT's recipe with a perceptual-codebook tokenizer (configs/peco_tokenizer.py).

  python -m beit_jax.main --config=configs/peco_base_pretrain.py:/path/to/tokenizer_run/tokenizer \\
      --workdir=gs://.../peco_b

PeCo tokenizes the 224 px view itself (16x down -> 14x14 ids), so the tokenizer view is the model view's size.
The paper reports 84.5% ImageNet-1K top-1 after 800 epochs and fine-tuning (+1.3 over BEiT).
"""
from beit_jax import configs


def get_config(tokenizer_checkpoint: str = ""):
  c = configs.peco_tokens(configs.pretrain(), tokenizer_checkpoint)
  c.data.mean_std = "imagenet"
  return c
