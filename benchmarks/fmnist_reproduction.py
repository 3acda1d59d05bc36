"""BEiT's and PeCo's central claims in miniature on Fashion-MNIST: the `make demo` chain at its full scale
(1%, 10% and all labels, 3 seeds), with the machine and date, for BENCHMARKS.md.

  python benchmarks/fmnist_reproduction.py [--workdir=/tmp/fmnist_reproduction] [--scale=full] [--table_only]

The chain's own driver (beit_jax/experiments/miniature.py: what runs, and why each arm is honest) with its flags,
full scale and its own workdir by default; a rerun with the same workdir resumes. Time and figures: BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import os
import platform

from absl import app, flags

from beit_jax.experiments import miniature
from beit_jax.train import preemption


def main(argv):
  import jax  # pylint: disable=import-outside-toplevel
  print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
  miniature.main(argv)


if __name__ == "__main__":
  flags.FLAGS.set_default("workdir", "/tmp/fmnist_reproduction")
  flags.FLAGS.set_default("scale", "full")
  preemption.install()  # as `make demo`: SIGTERM stops the running stage cleanly and the rerun resumes it
  app.run(main)
