"""The PeCo tokenizer on ImageNet-1K: a VQGAN f16 (224 -> 14x14 ids, 8192 codes) with a perceptual loss on a
frozen self-supervised ViT's deep features (MoCo v3 ViT-B/16 in the paper).

  python -m beit_jax.main --config=configs/peco_tokenizer.py:/path/to/mocov3_vit_base.pth --workdir=gs://.../peco_tok

The argument is the perceptual network: any BEiT/ViT checkpoint the converter reads (MoCo v3 weights are
CC-BY-NC; check the licence). PeCo's code was never released; the settings below are VQGAN's where the paper
is silent (taming configs/imagenet_vqgan.yaml), and the feature layers are configurable (blocks 3/6/9/12).
"""
from beit_jax import configs


def get_config(perceptual_checkpoint: str = ""):
  c = configs.tokenizer()
  c.loss.perceptual.source = f"pytorch:{perceptual_checkpoint}"
  c.loss.perceptual.model_overrides = {}
  return c
