"""A small PeCo tokenizer on Fashion-MNIST, on CPU (the first half of `make demo`).

  python -m beit_jax.main --config=configs/fmnist_tokenizer.py --workdir=/tmp/demo/tokenizer_run

Expect a few minutes on 2 CPU cores; the held-out PSNR and codebook usage it reaches are in BENCHMARKS.md.
The perceptual network is a small random-weight BEiT here (no pre-trained weights offline); point
loss.perceptual.source at a real checkpoint ("pytorch:PATH" or "checkpoint:DIR") for the real thing.
`:pixel` as config argument turns the perceptual loss off (the pixel-only VQ baseline).
"""
from beit_jax import configs


def get_config(arg: str = ""):
  c = configs.tokenizer()
  c.tokenizer.name = "peco_fmnist_small"
  c.tokenizer.overrides = {"channels": 3}  # the pipelines give RGB (grey repeated), as for every other data set
  c.data.source = "fashion_mnist_files"
  c.data.split, c.data.eval_split = "train", "test"
  c.data.crop_scale = (0.6, 1.0)
  c.loss.perceptual_weight = 0.0 if arg == "pixel" else 0.5
  c.loss.perceptual.source = "name:beit_test_tiny"
  c.loss.perceptual.layers = (1, 2)
  c.loss.disc_start = 10 ** 9  # no GAN in a few CPU minutes
  c.batch_size = 64
  c.total_steps = 300
  c.optim.lr, c.optim.warmup_steps = 2e-3, 30
  c.log_every, c.eval_every, c.ckpt_every = 50, 300, 300
  return c
