"""Linear probes of every block of the demo's small BEiT on Fashion-MNIST, on CPU.

  python -m beit_jax.main --config=configs/fmnist_linear_probe.py:/tmp/beit_demo/pretrain_run/model \\
      --workdir=/tmp/beit_demo/probe_run

The argument is a model folder (a pre-training run's workdir/model); without one the probe runs on a randomly
initialised beit_fmnist (the floor). Prints the held-out top-1 of each block's probe and the best block.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.linear_probe()
  c.init = f"checkpoint:{init}" if init else ""
  c.model.name = "beit_fmnist"
  c.model.overrides = {"drop_path_rate": 0.0, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}
  c.data.source = "fashion_mnist_files"
  c.data.image_size = 32
  c.data.crop_pct = 1.0
  c.data.augment = {"crop_scale": (0.5, 1.0), "rand_augment": None, "erase_prob": 0.0}
  c.batch_size = 256
  c.total_steps = 400
  c.optim.lr = 4e-3
  c.log_every, c.ckpt_every = 100, 400
  c.eval_split = "test"
  return c
