"""BEiT-B/16 pre-training on ImageNet-1K with DALL-E tokens: the paper's recipe (BEiT Table 12).

  python -m beit_jax.main --config=configs/beit_base_pretrain.py:/path/to/encoder.pkl --workdir=gs://.../beit_b

Batch 2048, AdamW (0.9, 0.999) lr 1.5e-3 (cosine to 1e-5, 10 warm-up epochs), weight decay 0.05, clip 3.0,
drop path 0.1, LayerScale 0.1, 800 epochs (~500k steps): 5 days on 16 V100s in the paper. Expect a training
loss near 6.3 and masked-token accuracy near 0.05 after 300 epochs (unilm#383); fine-tuned, 83.2% top-1 on
ImageNet-1K (800 epochs; 82.86 after 300, paper Table 4). The argument is OpenAI's DALL-E encoder
(encoder.pkl, or its conversion to .safetensors with beit_jax.tokenizers.dalle.save_safetensors).

On a TPU slice, append it (`:ENCODER,v5p-32`): bf16 compute, batch 2048 data-parallel over every chip. Compiled
ahead of time with `python -m beit_jax.compile_for --config=configs/beit_base_pretrain.py:,SLICE` (2026-11-25,
jax 0.10.2 / libtpu 0.0.42.1; expected images/s at 50% MFU):
  v5p-32 (16 chips)  18.2 GiB per chip of 95 (1.3 arguments + 16.9 temporaries), 327 TFLOP/step, ~23,000 img/s
  v5e-64 (64 chips)   5.1 GiB per chip of 16 (1.3 + 3.9),                          330 TFLOP/step, ~39,000 img/s
  v4-32  (16 chips)   see BENCHMARKS.md
"""
from beit_jax import configs


def get_config(arg: str = ""):
  dalle_encoder, _, tpu_slice = arg.partition(",")
  c = configs.pretrain()
  c.tokenizer = {"name": "dalle", "encoder": dalle_encoder, "decoder": None}
  # The IN-1K command of the BEiT README uses ImageNet's mean/std.
  c.data.mean_std = "imagenet"
  if tpu_slice:
    configs.on_pod(c, tpu_slice)
  return c
