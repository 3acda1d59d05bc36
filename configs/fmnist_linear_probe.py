"""Linear probes of every block of the demo's small BEiT on Fashion-MNIST, on CPU.

  python -m beit_jax.main --config=configs/fmnist_linear_probe.py:/tmp/beit_demo/beit_pretrain/model \\
      --workdir=/tmp/beit_demo/probe_run

The argument is a model folder (a pre-training run's workdir/model); without one the probe runs on a randomly
initialised beit_fmnist (the floor). Each block's probe is a logistic regression on the frozen features of
every training image (computed once, `probe.features="precomputed"`), trained full-batch to convergence
(300 steps: the training loss moves by < 1% over the last 100); prints the held-out top-1 of each block and the
best. ~2 minutes on 2 cores, most of it the 70,000 forward passes.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.linear_probe()
  c.init = f"checkpoint:{init}" if init else ""
  c.model.name = "beit_fmnist"
  c.model.overrides = {"drop_path_rate": 0.0, **configs.ABS_POS_LAYOUT}
  c.data.source = "fashion_mnist_files"
  c.data.image_size = 28
  c.data.crop_pct = 1.0
  c.probe.features = "precomputed"
  c.batch_size = 1000  # the feature pass; the probe steps are full-batch
  c.total_steps = 300
  c.optim.lr = 1e-2
  c.log_every, c.ckpt_every = 100, 300
  c.eval_split = "test"
  return c
