"""BEiT-B/16 pre-training on ImageNet-1K with DALL-E tokens: the paper's recipe (BEiT Table 12).

  python -m beit_jax.main --config=configs/beit_base_pretrain.py:/path/to/encoder.pkl --workdir=gs://.../beit_b

Batch 2048, AdamW (0.9, 0.999) lr 1.5e-3 (cosine to 1e-5, 10 warm-up epochs), weight decay 0.05, clip 3.0,
drop path 0.1, LayerScale 0.1, 800 epochs (~500k steps): 5 days on 16 V100s in the paper. Expect a training
loss near 6.3 and masked-token accuracy near 0.05 after 300 epochs (unilm#383); fine-tuned, 83.2% top-1 on
ImageNet-1K (800 epochs; 82.86 after 300, paper Table 4). The argument is OpenAI's DALL-E encoder
(encoder.pkl, or its conversion to .safetensors with beit_jax.tokenizers.dalle.save_safetensors).

On a TPU slice, append it (`:ENCODER,v5p-32`): bf16 compute, batch 2048 data-parallel over every chip.
`python -m beit_jax.compile_for --config=configs/beit_base_pretrain.py:,SLICE` compiles it ahead of time for the
slice and prints memory per chip, FLOPs per step and the images/s expected at 50% MFU; BENCHMARKS.md (pod table)
has those figures for v4, v5e and v5p slices, with the date and versions they were measured with.
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
