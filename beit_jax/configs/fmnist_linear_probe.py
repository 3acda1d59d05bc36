"""Linear probes of every block of the demo's small BEiT on Fashion-MNIST, on CPU.

  python -m beit_jax.main --config=configs/fmnist_linear_probe.py:/tmp/beit_demo/beit_pretrain/model \\
      --workdir=/tmp/beit_demo/probe_run

The argument is a model folder (a pre-training run's workdir/model); without one the probe runs on a randomly
initialised beit_fmnist (the floor). Each block's probe is a logistic regression on the frozen features of
every training image (computed once, `probe.features="precomputed"`), whitened and solved by full-batch L-BFGS
(scikit-learn's LogisticRegression with C = 1 / (l2 N) ~ 1.7 on PCA-whitened features); converged after ~100
iterations (a random-init probe: 80.2% at 100, 80.4% at 400). Prints the held-out top-1 of each block and the
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
  c.data.uint8 = False  # on CPU the device is the host: no transfer for uint8 to save
  c.probe.features = "precomputed"
  # The feature pass's batch (the probe steps are full-batch): on CPU 100 is twice as fast as 1000, whose
  # activations (tens of MB) are fresh allocations, page-faulted in on every call.
  c.batch_size = 100
  c.total_steps = 150  # L-BFGS iterations
  c.log_every, c.ckpt_every = 50, 150
  c.eval_split = "test"
  return c
