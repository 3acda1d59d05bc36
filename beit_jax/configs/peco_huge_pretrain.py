"""PeCo ViT-H/14 pre-training (the backbone of PeCo's 88.3% ImageNet-1K result), on a TPU slice.

  python -m beit_jax.main --config=configs/peco_huge_pretrain.py:/path/to/tokenizer,v5p-128 --workdir=gs://.../peco_h

The argument is the PeCo tokenizer's checkpoint, optionally followed by a TPU slice (beit_jax.configs.PODS).
ViT-H/14 at 224 px has a 16x16 patch grid, so the f16 tokenizer sees the 256 px view and 102 of the 256 patches
(BEiT's 40%) are masked. PeCo's ViT-H hyper-parameters beyond the backbone are not published; the rest is BEiT-L's
recipe (LayerScale 1e-5, clip 1.0). The tokenizer must be trained at 256 px (configs/peco_tokenizer.py with
--config.tokenizer.overrides.input_size=256 and attn_resolutions=(16,)).

Batch 2048 data parallel in bf16 fits a v5p-128 (`python -m beit_jax.compile_for
--config=configs/peco_huge_pretrain.py:,v5p-128` compiles it ahead of time), so it is the default; BENCHMARKS.md
(pod table) has its memory per chip, FLOPs and expected images/s, and the fsdp and ViT-g rows.
"""
from beit_jax import configs


def get_config(arg: str = ""):
  tokenizer_checkpoint, _, tpu_slice = arg.partition(",")
  c = configs.peco_tokens(configs.large_recipe(configs.pretrain(), "beit_huge_patch14_224"), tokenizer_checkpoint,
                          size=256)
  c.data.mean_std = "imagenet"
  c.data.mask.num_masked = 102
  if tpu_slice:
    configs.on_pod(c, tpu_slice)
  return c
