"""Named BEiT variants and `create_model`.

Names follow timm: `beit_{size}_patch{p}_{resolution}`. Every variant is the fine-tuning layout of
`beit/modeling_finetune.py` (relative position table per block, no absolute position embedding, LayerScale
0.1 for tiny/small/base and 1e-5 for large/huge); a pre-training config overrides what it needs
(`use_shared_rel_pos_bias=True, use_rel_pos_bias=False, vocab_size=8192, use_mask_token=True,
init_style="pretrain"`). `beit_test_*` are tiny sizes for tests and CPU demos.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any

from flax import nnx

from beit_jax.models.beit import Beit, BeitConfig, make_rngs

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(name: str, **fields):
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} registered twice")
  BeitConfig(**fields)  # validate at import time
  _REGISTRY[name] = fields


_SIZES = {  # width, depth, heads, LayerScale init (BEiT README: 0.1 base, 1e-5 large)
    "tiny": (192, 12, 3, 0.1),
    "small": (384, 12, 6, 0.1),
    "base": (768, 12, 12, 0.1),
    "large": (1024, 24, 16, 1e-5),
    "huge": (1280, 32, 16, 1e-5),  # ViT-H/14 as in PeCo's 88.3% result
}
for _size, (_w, _d, _h, _ls) in _SIZES.items():
  _patch, _resolutions = (14, (224, 448)) if _size == "huge" else (16, (224, 384, 512))
  for _res in _resolutions:
    register(f"beit_{_size}_patch{_patch}_{_res}", img_size=_res, patch_size=_patch, width=_w, depth=_d,
             num_heads=_h, layer_scale_init=_ls)

# ViT-g/14 (width 1408, depth 40, MLP 6144: Zhai et al., "Scaling Vision Transformers") in BEiT's layout: no
# paper trains a BEiT this size; it is here to show the ceiling of a pod slice (BENCHMARKS.md, issue 9).
register("beit_giant_patch14_224", img_size=224, patch_size=14, width=1408, depth=40, num_heads=16,
         mlp_ratio=6144 / 1408, layer_scale_init=1e-5)

register("beit_test_tiny", img_size=32, patch_size=8, width=32, depth=2, num_heads=2)
register("beit_test_small", img_size=64, patch_size=8, width=64, depth=4, num_heads=4)
# The demo's model: Fashion-MNIST at its own 28 px in 4 px patches (a 7x7 grid), small enough for a 2-core CPU.
register("beit_fmnist", img_size=28, patch_size=4, width=128, depth=4, num_heads=4)


def list_models(pattern: str = "*") -> list[str]:
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides) -> BeitConfig:
  """The BeitConfig of a named variant with `overrides` applied (unknown fields raise)."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    raise ValueError(f"unknown model {name!r}" + (f"; did you mean {close}?" if close else "")
                     + f" Known: models.list_models() ({len(_REGISTRY)} names)")
  return BeitConfig(**_REGISTRY[name]).replace(**overrides)


def create_model(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, **overrides) -> Beit:
  """Builds a named variant, e.g. `create_model("beit_base_patch16_224", num_classes=1000)`."""
  return Beit(get_config(name, **overrides), rngs=rngs if rngs is not None else make_rngs(seed))
