"""Tokenizer encode throughput: beit_jax's DALL-E encoder and PeCo encoder, and OpenAI's `dall_e` PyTorch
encoder on the same (random) weights, in one run.

  python benchmarks/tokenizer.py [--batch 8] [--steps 3] [--peco peco_vqgan_f16]

DALL-E encodes BEiT's 112 px tokenizer view into 14x14 ids (8192 codes); the PeCo f16 tokenizer encodes the
224 px view into 14x14 ids. Prints images/s (median over --steps after a warm-up) and the ratio to dall_e.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def timed(fn, steps):
  fn()  # warm-up (and compile)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--peco", default="peco_vqgan_f16")
  p.add_argument("--no_torch", action="store_true")
  args = p.parse_args()
  from beit_jax.tokenizers import dalle, vqgan  # pylint: disable=import-outside-toplevel
  print(f"# {datetime.date.today()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  rng = np.random.default_rng(0)
  rows = []

  tok = dalle.DalleTokenizer(dalle.DalleConfig(), decoder=False, rngs=nnx.Rngs(0))
  x112 = rng.random((args.batch, 112, 112, 3), dtype=np.float32)
  enc = jax.jit(lambda t, x: t.encode(x))
  ours = timed(lambda: jax.block_until_ready(enc(tok, x112)), args.steps)
  rows.append(("beit_jax DALL-E encoder, 112 px -> 14x14", args.batch / ours))

  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel
    import dall_e  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
    ref = dall_e.Encoder().eval()
    with torch.no_grad():  # the same weights as ours
      sd = {k: torch.from_numpy(v.copy()) for k, v in dalle.export_state_dict(tok.encoder, "encoder").items()}
      ref.load_state_dict(sd)  # (copies the arrays)
    xt = dall_e.map_pixels(torch.from_numpy(x112.transpose(0, 3, 1, 2).copy()))
    def run_torch():
      with torch.no_grad():
        return ref(xt).argmax(1)
    t_ref = timed(run_torch, args.steps)
    ids_ref = run_torch().numpy()
    agree = float(np.mean(ids_ref == np.asarray(enc(tok, x112))))
    rows.append((f"dall_e (PyTorch) encoder, same weights (ids agree {agree:.4f})", args.batch / t_ref))

  peco = vqgan.create_tokenizer(args.peco)
  size = peco.input_size
  xp = rng.random((args.batch, size, size, peco.config.channels), dtype=np.float32)
  penc = jax.jit(lambda t, x: t.encode(x))
  t_peco = timed(lambda: jax.block_until_ready(penc(peco, xp)), args.steps)
  rows.append((f"beit_jax PeCo {args.peco} encoder, {size} px -> {peco.grid[0]}x{peco.grid[1]}", args.batch / t_peco))

  width = max(len(r[0]) for r in rows)
  for name, ips in rows:
    print(f"{name:<{width}}  {ips:8.2f} images/s")
  if not args.no_torch:
    print(f"beit_jax / dall_e DALL-E encoder: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
  main()
