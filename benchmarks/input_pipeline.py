"""Host input pipeline throughput: pre-training batches from ImageNet-shaped JPEGs, against JPEG decoding alone
and the PyTorch original's pipeline, in the same run; and mask generation.

  python benchmarks/input_pipeline.py                     # 1 and 2 threads, 1024 JPEGs, batches of 64
  python benchmarks/input_pipeline.py --threads 1 --images 80 --batch 16 --steps 2   # a quick look

Writes --images JPEGs with ImageNet's commonest shapes (500x375 landscape and 375x500 portrait, 2:1, quality 90,
4:2:0; random crops of skimage's photos resized), then measures, each in a process of its own pinned to the first
T cores (T = each of --threads), images/s of:
  * decode/tf:   tf.io.decode_jpeg of the whole files in tf.data (T threads): the ceiling of a pipeline that
                 decodes every pixel (ours decodes only the crop, so it can pass it);
  * decode/pil:  PIL's Image.open(...).convert("RGB") (unilm's loader), in T processes: the peer's ceiling;
  * ours:        beit_jax's pre-training pipeline (pipelines.train_batches + pretrain_transform + blockwise masks):
                 fused decode-and-crop, colour jitter, flip, 224 bicubic + 112 lanczos views, float32 normalised
                 (the default);
  * ours/uint8:  the same with uint8=True, tokenizer_view="device" (uint8 224 px view; the 112 px view made on
                 the device, device.pretrain_inputs);
  * ours/imagenet: the ImageNet configs' default, uint8=True with both views from the host;
  * ours/crop:   resize="device": the host decodes the crop and pads it into a 512 px canvas, uint8, with its
                 jitter and flip draws; both views are made on the device (device.crop_views), not timed here;
  * unilm:       the PyTorch original: unilm beit's DataAugmentationForBEiT (ColorJitter(0.4, 0.4, 0.4),
                 RandomHorizontalFlip, RandomResizedCropAndInterpolationWithTwoPic 224 bicubic + 112 lanczos,
                 ToTensor + Normalize, DALL-E's map_pixels, MaskingGenerator(14x14, 75, min 16)) over an
                 ImageFolder-style PIL loader, through torch's DataLoader (T = 1: in the main process; T > 1: T
                 worker processes), torchvision's transforms where torchvision imports (with the CPU-torch shim),
                 else the same PIL operations written out (PEER_OPS).
and blockwise masks/s on one core (beit_jax's vectorised generator vs the original per-block loop).
"""
from __future__ import annotations

import os

# Masks/s is a per-core figure: keep numpy's BLAS (the masks' summed-area tables are small matmuls) to one
# thread, as in a tf.data worker. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import argparse
import datetime
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = ((375, 500), (375, 500), (500, 375))  # (height, width): ImageNet's commonest, landscape 2:1 portrait
# Ours: the pretrain_transform keywords of each variant.
OURS = {"ours": {}, "ours/uint8": dict(uint8=True, tokenizer_view="device"), "ours/imagenet": dict(uint8=True),
        "ours/crop": dict(uint8=True, resize="device")}
PIPELINES = ("decode/tf", "decode/pil", *OURS, "unilm")
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def write_jpegs(root: str, n: int, quality: int = 90) -> None:
  """n JPEGs of SHAPES under root/train/class<k>/, random crops of skimage photos resized (varied content)."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, "train", f"class{i % 4}")
    os.makedirs(d, exist_ok=True)
    p = photos[i % len(photos)]
    ph, pw = p.shape[:2]
    h, w = SHAPES[i % len(SHAPES)]
    ch = int(rng.integers(ph // 2, ph + 1))
    cw = min(pw, max(8, int(round(ch * w / h * rng.uniform(0.9, 1.1)))))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    img = Image.fromarray(p[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    img.save(os.path.join(d, f"{i:05d}.jpg"), quality=quality)


def _files(root: str) -> list[str]:
  out = []
  for dirpath, _, names in os.walk(os.path.join(root, "train")):
    out += [os.path.join(dirpath, n) for n in names if n.endswith(".jpg")]
  return sorted(out)


def _timed(it, batch: int, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):  # thread pools, autotuning, worker start-up
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t0)


# -- ours ------------------------------------------------------------------------------------------------------------
def _tf_threads(threads: int):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(threads)  # before TensorFlow runs anything
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  return tf


def bench_decode_tf(root: str, batch: int, threads: int, steps: int) -> float:
  tf = _tf_threads(threads)
  files = _files(root)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  ds = (tf.data.Dataset.from_tensor_slices(files).repeat()
        .map(lambda p: tf.shape(tf.io.decode_jpeg(tf.io.read_file(p), channels=3)), num_parallel_calls=threads)
        .batch(batch).prefetch(2).with_options(options))
  return _timed(iter(ds), batch, steps)


def bench_ours(root: str, batch: int, threads: int, steps: int, variant: str = "ours") -> float:
  _tf_threads(threads)
  from beit_jax.data import pipelines, sources  # pylint: disable=import-outside-toplevel
  src = sources.get_source(f"folder:{root}", "train")
  kw = OURS[variant]
  transform = pipelines.pretrain_transform(seed=0, **kw)
  it = pipelines.train_batches(src, transform, host_batch=batch, seed=0, masks=pipelines.MaskSpec(),
                               threads=threads)
  first = next(it)
  assert first["mask"].shape == (batch, 14, 14)
  if kw.get("resize") == "device":
    assert first["crop"].shape == (batch, 512, 512, 3) and "image" not in first
  else:
    assert first["image"].shape == (batch, 224, 224, 3)
    assert ("tokenizer_image" not in first) if kw.get("tokenizer_view") == "device" else (
        first["tokenizer_image"].shape == (batch, 112, 112, 3))
  return _timed(it, batch, steps)


# -- the PyTorch original (unilm beit/datasets.py, transforms.py, masking_generator.py) -------------------------------
def _pil_loader(path: str):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    img = Image.open(f)
    return img.convert("RGB")


class PEER_OPS:  # pylint: disable=invalid-name
  """torchvision's PIL-path operations, written out for when torchvision does not import (the same PIL calls)."""

  @staticmethod
  def color_jitter(img, strength: float):
    import torch  # pylint: disable=import-outside-toplevel
    from PIL import ImageEnhance  # pylint: disable=import-outside-toplevel
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for k in torch.randperm(4).tolist():  # torchvision ColorJitter.get_params: 4 ops in a random order, hue off
      if k < 3:
        img = ops[k](img).enhance(float(torch.empty(1).uniform_(1 - strength, 1 + strength)))
    return img

  @staticmethod
  def to_tensor(img):
    import torch  # pylint: disable=import-outside-toplevel
    return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


class TwoPicCrop:
  """unilm's RandomResizedCropAndInterpolationWithTwoPic: one box, two resized crops (PIL resampling)."""

  def __init__(self, size=224, second_size=112, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    self.size, self.second_size, self.scale, self.ratio = size, second_size, scale, ratio

  def get_params(self, img):
    width, height = img.size
    area = width * height
    for _ in range(10):
      target_area = random.uniform(*self.scale) * area
      aspect = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
      w = int(round(math.sqrt(target_area * aspect)))
      h = int(round(math.sqrt(target_area / aspect)))
      if w <= width and h <= height:
        return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(self.ratio):
      w, h = width, int(round(width / min(self.ratio)))
    elif in_ratio > max(self.ratio):
      h, w = height, int(round(height * max(self.ratio)))
    else:
      w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w

  def __call__(self, img):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    i, j, h, w = self.get_params(img)
    crop = img.crop((j, i, j + w, i + h))  # torchvision F.resized_crop on a PIL image: crop, then resize
    return (crop.resize((self.size, self.size), Image.BICUBIC),
            crop.resize((self.second_size, self.second_size), Image.LANCZOS))


class DataAugmentationForBEiT:
  """unilm beit/datasets.py's DataAugmentationForBEiT for a DALL-E tokenizer (args: input_size 224,
  second_input_size 112, train_interpolation bicubic, second_interpolation lanczos, num_mask_patches 75,
  min_mask_patches_per_block 16, inception mean/std)."""

  def __init__(self):
    self.torchvision = False
    try:
      from beit_jax.convert.timm_compat import install_torchvision_shim  # pylint: disable=import-outside-toplevel
      install_torchvision_shim()
      from torchvision import transforms  # pylint: disable=import-outside-toplevel
      self.jitter, self.flip = transforms.ColorJitter(0.4, 0.4, 0.4), transforms.RandomHorizontalFlip(p=0.5)
      self.to_tensor, self.normalize = transforms.ToTensor(), transforms.Normalize(*INCEPTION)
      self.torchvision = True
    except Exception:  # pylint: disable=broad-except
      import torch  # pylint: disable=import-outside-toplevel
      from PIL import Image  # pylint: disable=import-outside-toplevel
      mean, std = (torch.tensor(v).view(3, 1, 1) for v in INCEPTION)
      self.jitter = lambda img: PEER_OPS.color_jitter(img, 0.4)
      self.flip = lambda img: img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img
      self.to_tensor, self.normalize = PEER_OPS.to_tensor, lambda t: t.sub_(mean).div_(std)
    self.crop = TwoPicCrop()
    from beit_jax.data import masking  # pylint: disable=import-outside-toplevel
    self.mask = lambda: masking.reference_blockwise_mask(random)  # unilm's MaskingGenerator, per-block loop

  def __call__(self, image):
    for_patches, for_visual_tokens = self.crop(self.flip(self.jitter(image)))
    visual = self.to_tensor(for_visual_tokens) * (1 - 2 * 0.1) + 0.1  # DALL-E map_pixels
    return self.normalize(self.to_tensor(for_patches)), visual, self.mask()


class _Folder:
  """torchvision ImageFolder's __getitem__ over the files: (transform(pil_loader(path)), class)."""

  def __init__(self, files, transform):
    self.files, self.transform = files, transform

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    return self.transform(_pil_loader(self.files[i])), i % 4


def _forever(loader):
  while True:
    yield from loader


def bench_unilm(root: str, batch: int, threads: int, steps: int) -> tuple[float, bool]:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  aug = DataAugmentationForBEiT()
  files = _files(root)
  loader = torch.utils.data.DataLoader(_Folder(files, aug), batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=0 if threads == 1 else threads,
                                       persistent_workers=threads > 1)
  it = _forever(loader)
  (patches, visual, masks), _ = next(it)
  assert patches.shape == (batch, 3, 224, 224) and visual.shape == (batch, 3, 112, 112)
  assert masks.shape == (batch, 14, 14)
  return _timed(it, batch, steps), aug.torchvision


def _decode_pil_one(path: str) -> int:
  return _pil_loader(path).size[0]


def bench_decode_pil(root: str, batch: int, threads: int, steps: int) -> float:
  files = _files(root)
  n = batch * steps
  work = (files * (n // len(files) + 2))[:n + batch]
  if threads == 1:
    for p in work[:batch]:
      _decode_pil_one(p)
    t0 = time.perf_counter()
    for p in work[batch:]:
      _decode_pil_one(p)
    return n / (time.perf_counter() - t0)
  import multiprocessing  # pylint: disable=import-outside-toplevel
  with multiprocessing.get_context("fork").Pool(threads) as pool:
    pool.map(_decode_pil_one, work[:batch * threads])
    t0 = time.perf_counter()
    pool.map(_decode_pil_one, work[batch:], chunksize=8)
    return n / (time.perf_counter() - t0)


# -- masks -----------------------------------------------------------------------------------------------------------
def bench_masks(n: int) -> dict:
  from beit_jax.data import masking  # pylint: disable=import-outside-toplevel
  masking.blockwise_masks(0, np.arange(256))  # warm-up
  t0 = time.perf_counter()
  ours = np.concatenate([masking.blockwise_masks(0, np.arange(i, i + 256)) for i in range(0, n, 256)])
  t_ours = time.perf_counter() - t0
  rng = random.Random(0)
  m = max(n // 4, 1)
  t0 = time.perf_counter()
  ref = np.stack([masking.reference_blockwise_mask(rng) for _ in range(m)])
  t_ref = time.perf_counter() - t0
  c_ours, c_ref = ours.sum((1, 2)), ref.sum((1, 2))
  return dict(ours=len(ours) / t_ours, ref=m / t_ref, mean_ours=c_ours.mean(), mean_ref=c_ref.mean(),
              p75_ours=np.mean(c_ours == 75), p75_ref=np.mean(c_ref == 75))


# -- one measurement per process ---------------------------------------------------------------------------------
def worker(args) -> dict:
  """One (pipeline, threads) measurement in this process, pinned to the first `threads` cores."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if cores and len(cores) >= args.threads:
    os.sched_setaffinity(0, cores[:args.threads])
  pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  out = {"pipeline": args.worker, "threads": args.threads, "cores": pinned}
  if args.worker == "decode/tf":
    out["images_per_s"] = bench_decode_tf(args.root, args.batch, args.threads, args.steps)
  elif args.worker == "decode/pil":
    out["images_per_s"] = bench_decode_pil(args.root, args.batch, args.threads, args.steps)
  elif args.worker in OURS:
    out["images_per_s"] = bench_ours(args.root, args.batch, args.threads, args.steps, args.worker)
  elif args.worker == "unilm":
    out["images_per_s"], out["torchvision"] = bench_unilm(args.root, args.batch, args.threads, args.steps)
  else:
    raise ValueError(f"--worker {args.worker!r}: one of {PIPELINES}")
  return out


def _cpu_name() -> str:
  try:
    return open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].splitlines()[0].strip()
  except (OSError, IndexError):
    return platform.processor()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=1024,
                 help="JPEGs to write: at least batch x (steps + 3), so that every measurement stays in one epoch "
                      "(ours builds its tf.data pipeline once per epoch)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed batches per measurement (after 2 warm-up ones)")
  p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each pinned to that many cores")
  p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"any of {', '.join(PIPELINES)}")
  p.add_argument("--masks", type=int, default=65536, help="masks for the masks/s figure (0: skip)")
  p.add_argument("--json", default="", help="also write the figures here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--root", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    args.threads = int(args.threads)
    print(json.dumps(worker(args)))
    return

  if args.images < args.batch * (args.steps + 3):
    p.error(f"--images {args.images} < batch x (steps + 3) = {args.batch * (args.steps + 3)}: a measurement would "
            "cross an epoch (and time the next epoch's pipeline being built)")
  threads = [int(t) for t in args.threads.split(",")]
  names = [n for n in args.pipelines.split(",") if n]
  bad = sorted(set(names) - set(PIPELINES))
  if bad:
    p.error(f"--pipelines: unknown {bad}; the pipelines are {PIPELINES}")
  print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()} {os.cpu_count()} cores, {_cpu_name()}")
  print(f"# {args.images} JPEGs of {sorted(set(SHAPES))} (h, w), quality 90; batches of {args.batch}, "
        f"{args.steps} timed")
  results = {"date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "machine": _cpu_name(), "cores": os.cpu_count(),
             "args": {k: v for k, v in vars(args).items() if k not in ("worker", "root")}, "runs": []}
  if args.masks:
    m = bench_masks(args.masks)
    results["masks"] = m
    print(f"blockwise masks/s (1 thread, 256 per call): beit_jax {m['ours']:,.0f}  original loop {m['ref']:,.0f}  "
          f"ratio {m['ours'] / m['ref']:.1f}x; masked count mean {m['mean_ours']:.2f} vs {m['mean_ref']:.2f}, "
          f"P(75) {m['p75_ours']:.3f} vs {m['p75_ref']:.3f}")
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    for t in threads:
      row = {}
      for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(t), "--root", root,
               "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
          raise RuntimeError(f"{name} with {t} thread(s) failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results["runs"].append(r)
        row[name] = r
      ceiling = row.get("decode/tf", {}).get("images_per_s")
      print(f"\n{t} thread(s), pinned to cores {next(iter(row.values()))['cores']}:")
      for name, r in row.items():
        ips = r["images_per_s"]
        extra = [f"{ips / t:,.0f} per core"]
        if ceiling and name != "decode/tf":
          extra.append(f"{ips / ceiling:.2f}x TF's whole-JPEG decode")
        if "unilm" in row and name.startswith("ours"):
          extra.append(f"{ips / row['unilm']['images_per_s']:.2f}x unilm's")
        if name == "unilm":
          extra.append("torchvision transforms" if r.get("torchvision") else "PEER_OPS (no torchvision)")
        print(f"  {name:13s} {ips:8,.1f} images/s  ({'; '.join(extra)})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
