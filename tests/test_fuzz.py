"""Property-based fuzzing (hypothesis) of what users type: masking parameters, model configs, mesh specs.
Every input either works, with the documented properties, or raises a ValueError that names the bad field; no
other exception and no silent nonsense. It found four bugs when first run: negative block offsets and an
overflowing block side in the blockwise masking (min_block above the budget, an extreme min_aspect), and an
mlp_ratio that rounds the MLP to 0 units accepted by BeitConfig, and a mesh axis of size 0 dividing by zero."""
import os

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from beit_jax.data import masking
from beit_jax.models import beit
from beit_jax.train import sharding

# CI replays the same examples every run (a red CI must mean a change broke something); elsewhere each run
# explores new ones. BEIT_FUZZ_EXAMPLES=5000 for a longer hunt.
FAST = settings(max_examples=int(os.environ.get("BEIT_FUZZ_EXAMPLES", 200)), deadline=None,
                derandomize=os.environ.get("CI") == "true", suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(h=st.integers(-1, 16), w=st.integers(-1, 16), num_masked=st.integers(-2, 300), min_block=st.integers(-1, 40),
       min_aspect=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["blockwise", "random"]))
def test_masking_parameters(h, w, num_masked, min_block, min_aspect, seed, kind):
  try:
    if kind == "blockwise":
      masks = masking.blockwise_masks(seed, np.arange(4), (h, w), num_masked, min_block, min_aspect)
    else:
      masks = masking.random_masks(seed, np.arange(4), (h, w), num_masked)
  except ValueError as e:
    assert any(name in str(e) for name in ("grid", "num_masked", "min_block", "min_aspect")), str(e)
    return
  assert masks.shape == (4, h, w) and masks.dtype == bool
  counts = masks.reshape(4, -1).sum(1)
  assert (counts >= 1).all() and (counts <= num_masked).all(), counts  # never empty: the loss would be 0/0
  if kind == "random":
    assert (counts == num_masked).all()
  again = (masking.blockwise_masks(seed, np.arange(4), (h, w), num_masked, min_block, min_aspect)
           if kind == "blockwise" else masking.random_masks(seed, np.arange(4), (h, w), num_masked))
  np.testing.assert_array_equal(masks, again)  # a pure function of (seed, index): resumable


_FIELDS = {
    "img_size": st.one_of(st.integers(-8, 512), st.just("224"), st.floats(0, 300)),
    "patch_size": st.integers(-2, 40), "width": st.integers(-4, 96), "depth": st.integers(-1, 3),
    "num_heads": st.integers(-1, 16), "mlp_ratio": st.one_of(st.floats(-1, 8), st.just(float("nan"))),
    "layer_scale_init": st.floats(-1, 1), "drop_path_rate": st.floats(-0.5, 1.5),
    "num_classes": st.integers(-2, 10), "vocab_size": st.integers(-2, 10),
    "global_pool": st.sampled_from(["avg", "token", "max", ""]), "dtype": st.sampled_from(["float32", "bf16", "bfloat16"]),
    "attention_impl": st.sampled_from([None, "xla", "cudnn", "flash"]), "remat": st.sampled_from(["none", "dots", "all"]),
    "init_style": st.sampled_from(["pretrain", "finetune", "jax"]),
}


@FAST
@given(st.fixed_dictionaries({}, optional=_FIELDS))
def test_beit_config_values(fields):
  try:
    cfg = beit.BeitConfig(**fields)
  except ValueError as e:
    assert "BeitConfig." in str(e), str(e)
    return
  assert cfg.img_size % cfg.patch_size == 0 and cfg.width % cfg.num_heads == 0 and cfg.mlp_dim > 0


@FAST
@given(spec=st.dictionaries(st.sampled_from(["data", "fsdp", "tensor", "model", "pipe"]), st.integers(-3, 9),
                            max_size=4), devices=st.integers(1, 16))
def test_mesh_specs(spec, devices):
  try:
    shape = sharding.mesh_shape(spec, devices)
  except ValueError as e:
    assert "config.mesh" in str(e), str(e)
    return
  assert int(np.prod(shape)) == devices and all(s >= 1 for s in shape)
