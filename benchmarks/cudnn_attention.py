"""Is cuDNN's fused attention right for BEiT, the gradient of the relative position bias included? (GPU only)

  python benchmarks/cudnn_attention.py [--batch 8]

BEiT adds a learned bias [H, T, T] to every attention logit and trains it, so the bias needs a gradient, which
cuDNN computes in its own backward kernel (dbias); JAX issues #27184 and #30593 report wrong or missing bias
gradients in some versions. This compares `jax.nn.dot_product_attention(implementation="cudnn")` with our XLA
attention (`beit_jax.models.beit.dot_product_attention`) at BEiT-B/L shapes (T = 197 tokens, head dim 64), both
in bf16, against the XLA path in f32: the output and the gradients of q, k, v and the bias. cuDNN passes where
its errors are within 2x the XLA bf16 path's own (+1e-3). Set attention_impl="cudnn" only where it passes;
`benchmarks/train_step.py --attention=cudnn` times it.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from beit_jax.models.beit import dot_product_attention

NAMES = ("out", "dq", "dk", "dv", "dbias")


def value_and_grads(impl: str, dtype):
  def f(q, k, v, bias, ct):
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5
    if impl == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, bias=bias[None].astype(dtype), scale=scale, implementation="cudnn")
    else:
      out = dot_product_attention(q, k, v, bias, scale)
    out = out.astype(jnp.float32)
    return jnp.sum(out * ct), out
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


def relative_errors(impl, args, ref):
  (_, out), grads = value_and_grads(impl, jnp.bfloat16)(*args)
  return {n: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
          for n, a, b in zip(NAMES, (out, *grads), ref)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  args = p.parse_args()
  if jax.default_backend() != "gpu":
    print(f"needs a GPU (JAX runs on {jax.default_backend()})")
    return 2
  ok = True
  for heads in (12, 16):  # BEiT-B, BEiT-L
    ks = jax.random.split(jax.random.key(heads), 5)
    shape = (args.batch, 197, heads, 64)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in (ks[0], ks[1], ks[2], ks[4]))
    bias = 0.5 * jax.random.normal(ks[3], (heads, 197, 197), jnp.float32)
    inputs = (q, k, v, bias, ct)
    (_, ref_out), ref_grads = value_and_grads("xla", jnp.float32)(*inputs)
    ref = (ref_out, *ref_grads)
    errs = {}
    for impl in ("xla", "cudnn"):
      try:
        errs[impl] = relative_errors(impl, inputs, ref)
      except Exception as e:  # pylint: disable=broad-except  (an unsupported shape or version: report it)
        print(f"H={heads} {impl}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        errs[impl] = None
        continue
      print(f"H={heads} bf16 {impl:<6} max |error| / max |f32 value|: "
            + ", ".join(f"{n} {e:.2e}" for n, e in errs[impl].items()))
    if errs["cudnn"] is None or errs["xla"] is None:
      ok = False
      continue
    bad = [n for n in NAMES if errs["cudnn"][n] > 2 * errs["xla"][n] + 1e-3]
    print(f"H={heads}: cuDNN " + ("PASSES" if not bad else f"FAILS on {bad}"))
    ok &= not bad
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
