"""BEiT-L/16 pre-training on ImageNet-1K with DALL-E tokens (BEiT Table 12: clip 1.0, LayerScale 1e-5).

  python -m beit_jax.main --config=configs/beit_large_pretrain.py:/path/to/encoder.pkl --workdir=gs://.../beit_l

Fine-tuned after 800 epochs the paper reports 85.2% top-1 on ImageNet-1K at 224 px. Shard the parameters
(e.g. --config.mesh.fsdp=8) on accelerators with less than 32 GB.

On a TPU slice, append it (`:ENCODER,v5p-32`): bf16 compute, batch 2048 data-parallel over every chip. Compiled
ahead of time with `python -m beit_jax.compile_for --config=configs/beit_large_pretrain.py:,SLICE` (2026-11-25,
jax 0.10.2 / libtpu 0.0.42.1; expected images/s at 50% MFU):
  v5p-32 (16 chips)  42.1 GiB per chip of 95 (3.8 arguments + 38.4 temporaries), 874 TFLOP/step, ~8,600 img/s
  v5e-64 (64 chips)  11.6 GiB per chip of 16 (3.7 + 7.9), 880 TFLOP/step, ~14,700 img/s; with fsdp=64
                     (--config.mesh.data=1 --config.mesh.fsdp=64) 9.0 GiB, the state 62x smaller per chip
  v4-32  (16 chips)  see BENCHMARKS.md
"""
from beit_jax import configs


def get_config(arg: str = ""):
  dalle_encoder, _, tpu_slice = arg.partition(",")
  c = configs.large_recipe(configs.pretrain(), "beit_large_patch16_224")
  c.tokenizer = {"name": "dalle", "encoder": dalle_encoder, "decoder": None}
  c.data.mean_std = "imagenet"
  if tpu_slice:
    configs.on_pod(c, tpu_slice)
  return c
