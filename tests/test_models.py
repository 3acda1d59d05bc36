"""The BEiT module itself: init, masking, heads, numerics, sharding metadata, errors."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from beit_jax import models
from beit_jax.models import BeitConfig, layers
from beit_jax.train import sharding

PRETRAIN = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, vocab_size=64, use_mask_token=True,
                init_style="pretrain")


def x_nhwc(size=32, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)), jnp.float32)


def test_pretrain_init_follows_beit():
  model = models.create_model("beit_test_small", **PRETRAIN)
  blocks = model.blocks
  qkv = np.asarray(blocks[0].attn.qkv[...])
  assert np.abs(qkv).max() <= 0.02 + 1e-7  # trunc_normal(std=.02, a=-.02, b=.02): cut at +-1 sigma
  assert 0.009 < qkv.std() < 0.012          # std of N(0, .02) truncated at 1 sigma = .02 * 0.538
  for l, block in enumerate(blocks, start=1):  # attn.proj and mlp.fc2 of block l divided by sqrt(2l)
    bound = 0.02 / np.sqrt(2 * l) + 1e-7
    assert np.abs(np.asarray(block.attn.proj[...])).max() <= bound
    assert np.abs(np.asarray(block.mlp.fc2.kernel[...])).max() <= bound
    assert np.abs(np.asarray(block.mlp.fc2.kernel[...])).max() > 0.9 * (bound - 1e-7)
    np.testing.assert_array_equal(np.asarray(block.gamma_1[...]), np.float32(0.1))
  np.testing.assert_array_equal(np.asarray(model.rel_pos.table[...]), 0.0)
  assert np.abs(np.asarray(model.mask_token[...])).max() <= 0.02 + 1e-7
  assert np.asarray(model.lm_head.kernel[...]).std() > 0.009


def test_finetune_head_init_scale_and_layer_scale_off():
  model = models.create_model("beit_test_small", num_classes=10, layer_scale_init=0.0)
  assert model.blocks[0].gamma_1 is None
  head = np.asarray(model.head.kernel[...])
  assert 1e-5 < head.std() < 3e-5  # N(0, .02) * 0.001
  assert model.fc_norm is not None and model.norm is None


def test_output_kinds():
  x = x_nhwc()
  assert models.create_model("beit_test_tiny")(x).shape == (2, 17, 32)
  assert models.create_model("beit_test_tiny", num_classes=3)(x).shape == (2, 3)
  mim = models.create_model("beit_test_tiny", **PRETRAIN)
  mask = np.zeros((2, 16), bool)
  mask[:, :5] = True
  logits = mim(x, bool_masked_pos=mask)
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  out, hidden = mim(x, bool_masked_pos=mask.reshape(2, 4, 4), return_hidden_states=True)
  np.testing.assert_allclose(out, logits, atol=1e-6)
  assert len(hidden) == 3 and hidden[0].shape == (2, 17, 32)


def test_mask_token_replaces_masked_patches_only():
  model = models.create_model("beit_test_tiny", **PRETRAIN)
  x = x_nhwc()
  mask = np.zeros((2, 16), bool)
  mask[0, 3] = True
  clean, masked = model.embed(x), model.embed(x, mask)
  np.testing.assert_array_equal(np.asarray(masked[1]), np.asarray(clean[1]))
  np.testing.assert_array_equal(np.asarray(masked[0, 1 + 3]), np.asarray(model.mask_token[...][0, 0]))
  np.testing.assert_array_equal(np.asarray(masked[0, 5:]), np.asarray(clean[0, 5:]))


def test_masked_logits_fixed_shape_and_weights():
  model = models.create_model("beit_test_tiny", **PRETRAIN)
  x = x_nhwc()
  mask = np.zeros((2, 16), bool)
  mask[0, [1, 4, 9]] = True
  mask[1, [0, 2, 3, 15]] = True
  full = np.asarray(model(x, bool_masked_pos=mask))
  logits, pos, w = jax.jit(lambda m, a, b: m.masked_logits(a, b, num_predict=5))(model, x, mask)
  assert logits.shape == (2, 5, 64)
  np.testing.assert_array_equal(np.asarray(w), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(pos)[0, :3], [1, 4, 9])
  for b in range(2):
    k = int(mask[b].sum())
    np.testing.assert_allclose(np.asarray(logits[b, :k]), full[b, mask[b]], atol=1e-5)


def test_drop_path_is_per_sample_and_off_in_eval():
  model = models.create_model("beit_test_tiny", num_classes=3, drop_path_rate=0.5)
  ref = models.create_model("beit_test_tiny", num_classes=3, drop_path_rate=0.0)
  x = x_nhwc(batch=8)
  model.eval()
  np.testing.assert_allclose(model(x), ref(x), atol=1e-6)  # same seed, same weights; eval = no drop
  model.train()
  a, b = np.asarray(model(x)), np.asarray(model(x))
  assert not np.allclose(a, b)                         # fresh drop masks on every call
  assert not np.allclose(a, np.asarray(ref(x)))


def test_bfloat16_compute_is_close_to_float32():
  f32 = models.create_model("beit_test_small", num_classes=10, head_init_scale=1.0)
  bf16 = models.create_model("beit_test_small", num_classes=10, head_init_scale=1.0, dtype="bfloat16")
  x = x_nhwc(64)
  run = jax.jit(lambda m, x: m(x))  # one compiled program each, not op-by-op dispatch
  a, b = np.asarray(run(f32, x)), np.asarray(run(bf16, x))
  assert b.dtype == np.float32 and bf16.blocks[0].attn.qkv[...].dtype == jnp.float32  # params stay f32
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())


def test_jit_over_split_state_matches_eager_and_grads_reach_every_param():
  model = models.create_model("beit_test_tiny", **PRETRAIN)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = x_nhwc()
  mask = np.random.default_rng(0).random((2, 16)) < 0.5

  @jax.jit
  def loss_fn(params, x, mask):
    m = nnx.merge(graphdef, params, rest)
    logits, _, w = m.masked_logits(x, mask, num_predict=16)
    return (jax.nn.logsumexp(logits, -1) * w).sum() / w.sum()

  eager = model.masked_logits(x, mask, num_predict=16)[0]
  jitted = jax.jit(lambda p: nnx.merge(graphdef, p, rest).masked_logits(x, mask, num_predict=16)[0])(params)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
  grads = jax.grad(loss_fn)(params, x, mask)
  for path, g in nnx.to_flat_state(grads):
    assert np.abs(np.asarray(g.get_value())).max() > 0, f"no gradient reaches {path}"


def test_every_param_has_logical_axes():
  model = models.create_model("beit_test_tiny", **PRETRAIN)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.ndim, (path, axes, var.shape)


def test_sharded_creation_on_a_mesh():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rules = [("mlp", "model"), ("heads", "model"), ("vocab", "model"), ("embed", None), ("head_dim", None),
           ("relpos", None), ("patch", None), ("channels", None), ("classes", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = models.create_model("beit_test_tiny", **PRETRAIN)
    assert model.blocks[0].mlp.fc1.kernel[...].sharding.spec == P(None, "model")
    assert model.blocks[0].attn.qkv[...].sharding.spec == P(None, None, "model", None)
    x = jax.device_put(x_nhwc(batch=8), jax.NamedSharding(mesh, P("data")))
    out = jax.jit(lambda m, x: m(x, bool_masked_pos=jnp.zeros((8, 16), bool)))(model, x)
  ref = models.create_model("beit_test_tiny", **PRETRAIN)(np.asarray(x), bool_masked_pos=np.zeros((8, 16), bool))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_tensor_parallel_gradient_gathers_nothing():
  # Megatron-style heads/MLP sharding needs only all-reduces. A kernel reshaped so that its sharded head axis
  # is no longer the major one (e.g. q, k, v fused into one [D, 3*H*Dh] matmul) makes GSPMD all-gather it (that
  # form fails here: tried). The trainers' own path: their mesh axes and rules, the state created sharded.
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  graphdef, params, rest = sharding.create_sharded(lambda: models.create_model("beit_test_tiny", num_classes=10),
                                                   mesh)
  assert params["blocks"][0]["attn"]["qkv"].get_value().sharding.spec[2] == "tensor"  # the heads are split
  x = jax.device_put(x_nhwc(batch=8), sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(lambda p, x: nnx.merge(graphdef, p, rest)(x).sum())).lower(params, x).compile().as_text()
  assert " all-reduce(" in hlo or " all-reduce-start(" in hlo
  assert " all-gather(" not in hlo and " all-gather-start(" not in hlo


def test_gelu_is_the_exact_one():
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.asarray([0.0, -0.5, 3.0])])
  ours, ref = layers.gelu(x), jax.nn.gelu(x, approximate=False)
  # 1 + erf(x) cancels in the negative tail (0 below x ~ -5.4, where erfc keeps ~1e-7): torch has the same.
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(layers.gelu))(x)),
                             np.asarray(jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)),
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(ours) - np.asarray(jax.nn.gelu(x, approximate=True))).max() > 1e-4  # not tanh's
  bf16 = layers.gelu(x.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)


def _autodiff_layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps) * scale + bias
  return y.astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_gradient_is_autodiffs(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((2, 5, 16)), dtype)
  scale, bias = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
  g = jnp.asarray(rng.standard_normal((2, 5, 16)), dtype)
  ours, vjp = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-6), x, scale, bias)
  ref, ref_vjp = jax.vjp(lambda *a: _autodiff_layer_norm(*a, 1e-6), x, scale, bias)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert ours.dtype == dtype
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
  for name, a, b in zip(("x", "scale", "bias"), vjp(g), ref_vjp(g)):
    assert a.dtype == b.dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol, err_msg=name)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"BeitConfig\.width=30: must be divisible by num_heads=4"):
    BeitConfig(width=30, num_heads=4)
  with pytest.raises(ValueError, match=r"BeitConfig\.img_size=30"):
    BeitConfig(img_size=30, patch_size=16)
  with pytest.raises(ValueError, match=r"unknown BeitConfig field\(s\) \['num_class'\]"):
    models.create_model("beit_test_tiny", num_class=10)
  with pytest.raises(ValueError, match=r"did you mean \['beit_base_patch16_224'"):
    models.create_model("beit_bsae_patch16_224")


def test_input_errors_are_clear():
  model = models.create_model("beit_test_tiny", num_classes=3)
  with pytest.raises(ValueError, match=r"NCHW given\? beit_jax takes NHWC"):
    model(jnp.zeros((2, 3, 32, 32)))
  with pytest.raises(ValueError, match="no mask token"):
    model(x_nhwc(), bool_masked_pos=np.zeros((2, 16), bool))
  mim = models.create_model("beit_test_tiny", **PRETRAIN)
  with pytest.raises(ValueError, match=r"bool_masked_pos must have shape \[B, 16\]"):
    mim(x_nhwc(), bool_masked_pos=np.zeros((2, 15), bool))


def test_registry_covers_the_family():
  names = models.list_models()
  for size in ("tiny", "small", "base", "large"):
    for res in (224, 384, 512):
      assert f"beit_{size}_patch16_{res}" in names
  assert "beit_huge_patch14_224" in names
  large = models.get_config("beit_large_patch16_384")
  assert (large.width, large.depth, large.num_heads, large.layer_scale_init, large.grid) == (1024, 24, 16, 1e-5,
                                                                                             (24, 24))


def test_import_does_not_pull_tensorflow_or_torch():
  code = ("import sys, beit_jax, beit_jax.models, beit_jax.convert, beit_jax.train.checkpoints; "
          "bad = [m for m in ('tensorflow', 'torch', 'timm', 'transformers') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_remat_policies_same_gradients_fewer_saved_residuals():
  """Rematerialisation changes what the backward pass keeps, never the numbers (drop path included: the same
  RNG streams give the same masks). What is kept is measured as the residual bytes that `jax.vjp` keeps for the
  backward pass, a property of the program on every backend; XLA:CPU's scheduler does not turn it into a
  smaller compiled temp buffer (its memory planning hoists the recomputation), GPU and TPU schedulers do."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  grads, kept = {}, {}
  for policy in ("none", "dots", "full"):
    graphdef, state = nnx.split(models.create_model("beit_test_tiny", seed=0, remat=policy, drop_path_rate=0.3))
    params, rest = nnx.split_state(state, nnx.Param, ...)

    def loss(params, rest):
      tokens, _ = nnx.merge(graphdef, params, rest, copy=True).encode(x)  # own Variables: pure
      return jnp.sum(jnp.square(tokens))

    grads[policy] = jax.jit(jax.grad(loss))(params, rest)
    _, backward = jax.vjp(loss, params, rest)  # a pytree (tree_util.Partial) whose leaves are the residuals
    kept[policy] = sum(leaf.nbytes for leaf in jax.tree.leaves(backward))
  for policy in ("dots", "full"):
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])))
    print(f"remat={policy}: max grad diff {diff:.2g}, residual bytes {kept[policy]} vs {kept['none']}")
    assert diff < 1e-5
  assert kept["full"] < kept["dots"] < kept["none"], kept
  with pytest.raises(ValueError, match="remat"):
    models.BeitConfig(remat="some")
