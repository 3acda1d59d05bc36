"""A small PeCo tokenizer on Fashion-MNIST, on CPU (the first half of `make demo`).

  python -m beit_jax.main --config=configs/fmnist_tokenizer.py --workdir=/tmp/demo/tokenizer_run

Expect ~2-5 minutes on 2 CPU cores (the perceptual loss costs as much again); the held-out PSNR, codebook usage
and the codes it spends on black background are in BENCHMARKS.md.
The config argument picks the perceptual network: none (a small random-weight BEiT: the loop's mechanics
only), `:pixel` (no perceptual loss: the pixel-only VQ baseline), or `:checkpoint:DIR` / `:pytorch:PATH`, a
trained self-supervised transformer, as PeCo (e.g. a pre-training run's workdir/model: the `make demo` chain
uses the BEiT it pre-trained on pixel-VQ ids).
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
  if arg in ("", "pixel"):
    c.loss.perceptual.source, c.loss.perceptual.layers = "name:beit_test_tiny", (1, 2)
  else:  # a trained network: the demo's beit_fmnist has 4 blocks; PeCo takes features from several depths
    c.loss.perceptual.source, c.loss.perceptual.layers = arg, (2, 4)
    # Unit-normalised features (LPIPS-style). On the demo's BEiT (LayerScale 0.1) the plain distance between
    # test images and a pixel-VQ tokenizer's reconstructions is 0.0016 against a pixel L1 of 0.054: at weight
    # 0.5 it would not move the codebook. Normalised it is 0.10, at weight 0.5 on a par with the pixel term.
    c.loss.perceptual.normalize = True
  c.loss.disc_start = 10 ** 9  # no GAN in a few CPU minutes
  c.batch_size = 64
  c.total_steps = 300
  c.optim.lr, c.optim.warmup_steps = 2e-3, 30
  c.log_every, c.eval_every, c.ckpt_every = 50, 300, 300
  return c
