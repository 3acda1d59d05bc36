"""Host input pipeline throughput: pre-training batches from JPEGs, and mask generation.

  python benchmarks/input_pipeline.py                      # 224 px views from 256..500 px JPEGs
  python benchmarks/input_pipeline.py --threads 1          # tf.data on one core: images/s per core

Measures, in one run:
  * the pre-training pipeline (read, signature check, JPEG decode, colour jitter, flip, one random-resized crop
    resized to 224 bicubic + 112 lanczos, normalise, batch, blockwise masks) on a folder of real photos
    (skimage.data crops written as JPEGs), images/s with tf.data limited to --threads threads;
  * blockwise masks/s on one core: beit_jax's vectorised generator vs the original per-block Python loop
    (`masking.reference_blockwise_mask`), and their masked-count statistics.
"""
from __future__ import annotations

import os

# Masks/s is a per-core figure: keep numpy's BLAS (the masks' summed-area tables are small matmuls) to one
# thread, as in a tf.data worker. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import argparse
import datetime
import platform
import random
import tempfile
import time

import numpy as np


def write_jpegs(root: str, n: int) -> None:
  import skimage.data  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, "train", f"class{i % 4}")
    os.makedirs(d, exist_ok=True)
    p = photos[i % len(photos)]
    size = rng.integers(256, 501, 2)
    img = tf.image.resize(p, size, antialias=True)
    jpeg = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8), quality=90)
    tf.io.write_file(os.path.join(d, f"{i:05d}.jpg"), jpeg)


def bench_pipeline(root: str, batch: int, threads: int, steps: int) -> float:
  from beit_jax.data import pipelines, sources  # pylint: disable=import-outside-toplevel
  src = sources.get_source(f"folder:{root}", "train")
  transform = pipelines.pretrain_transform(seed=0)
  it = pipelines.train_batches(src, transform, host_batch=batch, seed=0, masks=pipelines.MaskSpec(),
                               threads=threads or None)
  for _ in range(3):  # warm-up: thread pools, autotuning
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  dt = time.perf_counter() - t0
  assert b["image"].shape == (batch, 224, 224, 3) and b["tokenizer_image"].shape == (batch, 112, 112, 3)
  return steps * batch / dt


def bench_masks(n: int) -> dict:
  from beit_jax.data import masking  # pylint: disable=import-outside-toplevel
  masking.blockwise_masks(0, np.arange(256))  # warm-up
  t0 = time.perf_counter()
  ours = np.concatenate([masking.blockwise_masks(0, np.arange(i, i + 256)) for i in range(0, n, 256)])
  t_ours = time.perf_counter() - t0
  rng = random.Random(0)
  m = n // 4
  t0 = time.perf_counter()
  ref = np.stack([masking.reference_blockwise_mask(rng) for _ in range(m)])
  t_ref = time.perf_counter() - t0
  c_ours, c_ref = ours.sum((1, 2)), ref.sum((1, 2))
  return dict(ours=len(ours) / t_ours, ref=m / t_ref, mean_ours=c_ours.mean(), mean_ref=c_ref.mean(),
              p75_ours=np.mean(c_ours == 75), p75_ref=np.mean(c_ref == 75))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--threads", type=int, default=0, help="tf.data threads (0: all cores)")
  p.add_argument("--masks", type=int, default=65536)
  args = p.parse_args()
  if args.threads:  # before TensorFlow runs anything: its thread pools are fixed at start-up
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} cores, "
        f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
  m = bench_masks(args.masks)
  print(f"blockwise masks/s (1 thread, 256 per call): beit_jax {m['ours']:,.0f}  original loop {m['ref']:,.0f}  "
        f"ratio {m['ours'] / m['ref']:.1f}x")
  print(f"  masked count mean {m['mean_ours']:.2f} vs {m['mean_ref']:.2f}; P(75) {m['p75_ours']:.3f} vs "
        f"{m['p75_ref']:.3f}")
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    ips = bench_pipeline(root, args.batch, args.threads, args.steps)
  cores = args.threads or os.cpu_count()
  print(f"pre-training pipeline (JPEG 256-500 px -> 224 + 112 views + mask): {ips:,.0f} images/s on {cores} "
        f"thread(s) = {ips / cores:,.0f} images/s per core")


if __name__ == "__main__":
  main()
