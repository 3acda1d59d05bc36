"""BEiT-L/16 pre-training on ImageNet-1K with DALL-E tokens (BEiT Table 12: clip 1.0, LayerScale 1e-5).

  python -m beit_jax.main --config=configs/beit_large_pretrain.py:/path/to/encoder.pkl --workdir=gs://.../beit_l

Fine-tuned after 800 epochs the paper reports 85.2% top-1 on ImageNet-1K at 224 px. Shard the parameters
(e.g. --config.mesh.fsdp=8) on accelerators with less than 32 GB.

On a TPU slice, append it (`:ENCODER,v5p-32`): bf16 compute, batch 2048 data-parallel over every chip (on
v5e, whose chips hold 16 GiB, --config.mesh.data=1 --config.mesh.fsdp=64 shards the state).
`python -m beit_jax.compile_for --config=configs/beit_large_pretrain.py:,SLICE` compiles it ahead of time for the
slice; BENCHMARKS.md (pod table) has its memory per chip, FLOPs per step and expected images/s per slice.
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
