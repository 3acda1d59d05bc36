"""BEiT-L/16 pre-training on ImageNet-1K with DALL-E tokens (BEiT Table 12: clip 1.0, LayerScale 1e-5).

  python -m beit_jax.main --config=configs/beit_large_pretrain.py:/path/to/encoder.pkl --workdir=gs://.../beit_l

Fine-tuned after 800 epochs the paper reports 85.2% top-1 on ImageNet-1K at 224 px. Shard the parameters
(e.g. --config.mesh.fsdp=8) on accelerators with less than 32 GB.
"""
from beit_jax import configs

# Parameters + optimizer state sharded this many ways per TPU slice (absent: 1, pure data parallel).
FSDP: dict[str, int] = {}


def get_config(arg: str = ""):
  dalle_encoder, _, tpu_slice = arg.partition(",")
  c = configs.pretrain()
  c.model.name = "beit_large_patch16_224"
  c.model.overrides = {"drop_path_rate": 0.1, "layer_scale_init": 1e-5}
  c.tokenizer = {"name": "dalle", "encoder": dalle_encoder, "decoder": None}
  c.data.mean_std = "imagenet"
  c.optim.clip_grad = 1.0
  if tpu_slice:
    configs.on_pod(c, tpu_slice, fsdp=FSDP.get(tpu_slice, 1))
  return c
