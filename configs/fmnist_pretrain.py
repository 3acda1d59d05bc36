"""BEiT/PeCo pre-training of a small ViT on Fashion-MNIST with a PeCo tokenizer trained by
configs/fmnist_tokenizer.py (the second half of `make demo`), on CPU.

  python -m beit_jax.main --config=configs/fmnist_pretrain.py:/tmp/demo/tokenizer_run/tokenizer \\
      --workdir=/tmp/demo/pretrain_run

The argument is the tokenizer checkpoint folder. Expect a few minutes on 2 CPU cores; the masked-token
accuracy reached (against chance and against always predicting the most frequent token) is in BENCHMARKS.md.
"""
from beit_jax import configs


def get_config(tokenizer_checkpoint: str = ""):
  c = configs.pretrain()
  c.model.name = "beit_fmnist"  # 32 px, 4 px patches: an 8x8 grid, as the tokenizer's 8x8 ids
  c.model.overrides = {"drop_path_rate": 0.0, "layer_scale_init": 0.1}
  c.tokenizer = {"name": "peco", "checkpoint": tokenizer_checkpoint}
  c.data.source = "fashion_mnist_files"
  c.data.image_size = c.data.tokenizer_size = 32
  c.data.tokenizer_resize = "bicubic"
  c.data.color_jitter = 0.0  # grey images
  # 40% of 64 patches in blocks of >= 4 (BEiT: 75 of 196 in blocks of >= 16)
  c.data.mask = {"num_masked": 26, "min_block": 4, "min_aspect": 0.3, "kind": "blockwise"}
  c.batch_size = 128
  c.total_steps = 400
  c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-3, 1e-5, 40
  c.log_every, c.ckpt_every = 50, 200
  c.eval_split = "test"
  return c
