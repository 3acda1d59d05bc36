"""Parity with timm's BEiT and with SciPy / PyTorch resizing (code we did not write), identical random weights."""
import numpy as np
import pytest
import torch
from scipy import interpolate

from beit_jax import convert, models
from beit_jax.models import layers, posemb
from conftest import assert_parity, max_abs_diff, randomize_torch, torch_state_dict

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True)


def timm_beit(timm, seed=0, **kw):
  args = dict(TINY, img_size=32, num_classes=7, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
  args.update(kw)
  return randomize_torch(timm.models.beit.Beit(**args), seed)


def load_ours(ref_model, **overrides):
  """Ours from timm's state dict; with no relative table the head count is not in the tensors, so it is
  passed, as a user would (`num_heads=`)."""
  sd = convert.to_timm_names(torch_state_dict(ref_model))
  cfg = convert.infer_config(sd)
  if cfg.num_heads != ref_model.blocks[0].attn.num_heads:
    assert not (cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias)
    cfg = cfg.replace(num_heads=ref_model.blocks[0].attn.num_heads)
  return convert.load_state_dict(sd, cfg.replace(**overrides))


def run_timm(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def images(size, seed=0):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(global_pool="token", init_values=None),
    dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
    dict(use_rel_pos_bias=False, use_abs_pos_emb=True, qkv_bias=False, init_values=None),
    dict(num_classes=0),
], ids=["per_layer_avg", "token_no_layerscale", "shared", "abs_pos_no_qkv_bias", "backbone"])
def test_timm_forward(timm, kw):
  ref_model = timm_beit(timm, **kw)
  ours = load_ours(ref_model)
  x = images(32)
  if kw.get("num_classes", 7) == 0:  # timm returns pooled features; ours the token sequence
    assert_parity(ours.pool(ours(x)), run_timm(ref_model, x), what="pooled features")
  else:
    assert_parity(ours(x), run_timm(ref_model, x), what="logits")


def test_relative_position_index_matches_timm(timm):
  for grid in [(4, 4), (14, 14), (3, 5)]:
    ref = timm.models.beit.gen_relative_position_index(grid).numpy()
    np.testing.assert_array_equal(layers.relative_position_index(grid), ref)


def test_resolution_change_linear_matches_timm(timm):
  """224 -> 384 with timm's linear resize of the relative tables (`checkpoint_filter_fn`)."""
  tiny = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2)
  src = timm_beit(timm, seed=1, img_size=224, **{**TINY, **tiny})
  dst = timm.models.beit.Beit(img_size=384, num_classes=7, use_abs_pos_emb=False, use_rel_pos_bias=True,
                              init_values=0.1, **{**TINY, **tiny}).eval()
  dst.load_state_dict(timm.models.beit.checkpoint_filter_fn(src.state_dict(), dst), strict=True)
  sd = torch_state_dict(src)
  ours = convert.load_state_dict(sd, convert.infer_config(convert.to_timm_names(sd)).replace(img_size=384),
                                 rel_pos_interp="linear")
  assert ours.blocks[0].attn.rel_pos.table.shape == (47 * 47 + 3, 2)
  assert_parity(ours(images(384)), run_timm(dst, images(384)), what="logits at 384 after 224->384 (linear)")


def _beit_geometric_grid(src, dst):
  # The sample positions of unilm `run_class_finetuning.py`, written out again independently of ours.
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  dis = np.cumsum([1.0] + [q ** (i + 1) for i in range(src // 2 - 1)])
  return np.concatenate([-dis[::-1], [0.0], dis])


@pytest.mark.parametrize("src_grid,dst_grid", [((14, 14), (24, 24)), ((4, 4), (6, 6)), ((24, 24), (14, 14))])
def test_cubic_rel_pos_resize_matches_scipy_bicubic_spline(src_grid, dst_grid):
  """BEiT's `interp2d(kind="cubic")` is an interpolating bicubic spline: SciPy's RectBivariateSpline(s=0)."""
  heads = 3
  rng = np.random.default_rng(0)
  src_n, dst_n = 2 * src_grid[0] - 1, 2 * dst_grid[0] - 1
  table = rng.standard_normal((src_n * src_n + 3, heads)).astype(np.float32)
  ours = posemb.resize_rel_pos_table(table, dst_grid, "cubic")
  assert ours.shape == (dst_n * dst_n + 3, heads)
  pos = _beit_geometric_grid(src_n, dst_n)
  t = dst_n // 2
  targets = np.arange(-t, t + 0.1, 1.0)
  for h in range(heads):
    spline = interpolate.RectBivariateSpline(pos, pos, table[:-3, h].reshape(src_n, src_n), kx=3, ky=3, s=0)
    ref = spline(targets, targets)
    diff = max_abs_diff(ours[:-3, h].reshape(dst_n, dst_n), ref)
    assert diff < 1e-5, f"head {h}: {diff}"
  np.testing.assert_array_equal(ours[-3:], table[-3:])  # the [CLS] rows are kept


def test_abs_pos_resize_matches_torch_bicubic():
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32)
  ours = posemb.resize_abs_pos_embed(pos, (24, 24))
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
  assert max_abs_diff(ours[:, 1:], ref) < 1e-5
  np.testing.assert_array_equal(ours[:, :1], pos[:, :1])


def test_shared_table_expands_to_per_layer_for_finetuning(timm):
  """A pre-trained shared table becomes a copy per block; outputs equal timm's shared model."""
  ref_model = timm_beit(timm, seed=2, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
  sd = torch_state_dict(ref_model)
  cfg = convert.infer_config(convert.to_timm_names(sd)).replace(use_rel_pos_bias=True,
                                                                  use_shared_rel_pos_bias=False)
  ours = convert.load_state_dict(sd, cfg)
  assert ours.rel_pos is None
  for block in ours.blocks:
    np.testing.assert_array_equal(np.asarray(block.attn.rel_pos.table[...]),
                                  sd["rel_pos_bias.relative_position_bias_table"])
  assert_parity(ours(images(32)), run_timm(ref_model, images(32)), what="per-layer copy of a shared table")


def test_beit_base_parameter_count(timm):
  abstract = nnx_abstract("beit_base_patch16_224", num_classes=1000)
  ours = sum(int(np.prod(v.shape)) for v in jax_leaves(abstract))
  with torch.device("meta"):
    ref = sum(p.numel() for p in timm.create_model("beit_base_patch16_224", pretrained=False).parameters())
  print(f"BEiT-B/16 parameters: ours {ours:,}, timm {ref:,}")
  assert ours == ref
  assert round(ours / 1e6, 1) == 86.5


def nnx_abstract(name, **kw):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.state(nnx.eval_shape(lambda: models.create_model(name, **kw)), nnx.Param)


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


@pytest.mark.parametrize("kw", [dict(), dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)],
                         ids=["per_layer", "shared"])
def test_gradients_match_timm_autograd(timm, kw):
  """Every parameter's gradient equals torch autograd's through timm on identical weights: the backward pass,
  including the CPU-only gradient paths (the residual-stream boundary, the batch sum of the bias as a dot)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  ref_model = timm_beit(timm, seed=3, **kw)
  ours = load_ours(ref_model)
  x = images(32)
  weights = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)

  ref_model.zero_grad()
  logits = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  (logits * torch.from_numpy(weights)).sum().backward()
  torch_grads = {n: p.grad.numpy() for n, p in ref_model.named_parameters()}
  # The converter maps a state dict of gradients into our layout as it maps weights.
  ref = nnx.state(load_ours_from(torch_grads, ours.config), nnx.Param)

  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
  loss = lambda p: (nnx.merge(graphdef, p, rest)(x) * weights).sum()
  grads = jax.jit(jax.grad(loss))(params)
  diffs = jax.tree.map(lambda a, b: max_abs_diff(a, b), grads, ref)
  worst = max(jax.tree.leaves(diffs))
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref))
  print(f"max abs gradient diff vs timm autograd ({kw or 'per-layer'}): {worst:.2e} (largest gradient {scale:.2e})")
  assert worst < 1e-5 * max(scale, 1.0)


def load_ours_from(sd, cfg):
  return convert.load_state_dict(convert.to_timm_names(sd), cfg)
