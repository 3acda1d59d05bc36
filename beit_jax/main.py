"""The entry point: `python -m beit_jax.main --config=configs/<file>.py --workdir=DIR [--config.key=value ...]`.

`config.mode` picks the loop (a readable trainer per mode):
  tokenizer     train a PeCo perceptual VQ tokenizer                 beit_jax/train/tokenizer.py
  pretrain      BEiT / PeCo masked image modeling                    beit_jax/train/pretrain.py
  finetune      classification fine-tuning from `config.init`        beit_jax/train/finetune.py
  eval          top-1/top-5 of the classifier `config.init` names    beit_jax/train/finetune.py
  linear_probe  one linear probe per block of a frozen backbone      beit_jax/train/linear_probe.py
  segmentation  UperNet on a BEiT backbone (ADE20K)                 beit_jax/train/segmentation.py
  seg_eval      sliding-window mIoU of the segmenter `config.init`  beit_jax/train/segmentation.py

Multi-host: with `--distributed` (or BEIT_JAX_DISTRIBUTED=1; on Cloud TPU and SLURM jax finds the rest of the
set-up itself), `jax.distributed.initialize()` runs before anything touches a device.

SIGTERM (a preemption notice) is taken over as the process starts, before jax is imported: at any moment of
start-up, compile or training it ends the run cleanly, exit status 0, with a checkpoint where there is a step to
save (train/preemption.py); the rerun resumes. With `--distributed`, jax's preemption service takes the signal
over at `jax.distributed.initialize()` and every process stops after the same step.

The console shows one progress line per `config.log_every` steps and a last line saying where the model and the
metrics are; the libraries' INFO lines go to workdir/log.txt (train/console.py; `--verbose` shows them too).
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from beit_jax.train import console, preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go (a rerun resumes from it)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "every library's INFO lines on the console too (else in workdir/log.txt)")


def main(argv):
  del argv
  console.quiet(_VERBOSE.value)  # before jax: its backend set-up logs at INFO
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value or os.environ.get("BEIT_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  console.log_to(_WORKDIR.value, jax.process_index())
  logging.info("process %d/%d, %d devices: %s", jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  from beit_jax.train import modes  # pylint: disable=import-outside-toplevel  (jax, after install())
  modes.run(_CONFIG.value, _WORKDIR.value)


def cli():  # console script `beit-train`
  preemption.install()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  cli()
