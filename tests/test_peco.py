"""PeCo tokenizer pieces: the vector quantizer (L2 and BEiT v2's normalised EMA), the VQGAN encoder/decoder and
tokenizer, the taming losses, the perceptual loss over a frozen BEiT and the PatchGAN discriminator.

Expected values are computed by hand (numpy) from the definitions in taming-transformers and BEiT v2
(spec section D), on inputs small enough to check on paper.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from beit_jax.tokenizers import losses, vq
from beit_jax.tokenizers.discriminator import NLayerDiscriminator
from beit_jax.tokenizers.vqgan import PecoConfig, create_tokenizer, get_config


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def quantizer(num_codes, dim, codebook=None, **kw):
  q = vq.VectorQuantizer(num_codes, dim, rngs=nnx.Rngs(0), **kw)
  if codebook is not None:
    q.codebook[...] = jnp.asarray(codebook, jnp.float32)
  return q


# -- quantizer: "l2" ---------------------------------------------------------------------------------------------
def test_l2_ids_are_the_brute_force_nearest_codes():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(64, 8)).astype(np.float32)
  z = rng.normal(size=(3, 5, 7, 8)).astype(np.float32)
  q = quantizer(64, 8, codebook)
  z_q, ids, _ = q(z, update=False)
  dist = ((z.reshape(-1, 1, 8).astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
  want = dist.argmin(-1).reshape(3, 5, 7)
  assert ids.shape == (3, 5, 7) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ids), want)
  np.testing.assert_allclose(np.asarray(z_q), codebook[want], atol=1e-6)  # forward value = the codes


def test_straight_through_gradient_is_identity_on_z():
  rng = np.random.default_rng(1)
  q = quantizer(16, 4, rng.normal(size=(16, 4)))
  z = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  grad = jax.grad(lambda z: jnp.sum(q(z, update=False)[0] * w))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(w), atol=1e-6)


def test_l2_loss_and_its_gradients_on_two_codes():
  codebook = np.array([[0.0, 0.0], [1.0, 1.0]])
  z = jnp.array([[0.2, 0.1], [0.9, 1.3]], jnp.float32)
  q = quantizer(2, 2, codebook, mode="l2", beta=0.25)
  _, ids, aux = q(z, update=False)
  np.testing.assert_array_equal(np.asarray(ids), [0, 1])
  diff = np.array([[0.2, 0.1], [-0.1, 0.3]])  # z - e
  # ||sg(z) - e||^2 + 0.25 ||z - sg(e)||^2, as means over the 4 elements
  np.testing.assert_allclose(float(aux["loss"]), 1.25 * np.mean(diff ** 2), rtol=1e-6)
  assert float(aux["loss"]) == pytest.approx(0.046875, rel=1e-6)

  g_q, g_z = nnx.grad(lambda q, z: q(z, update=False)[2]["loss"], argnums=(0, 1))(q, z)
  g_code = g_q["codebook"][...]
  # beta weighs the commitment (encoder) term, 1 the codebook term (VQ-VAE; not taming's legacy placement).
  np.testing.assert_allclose(np.asarray(g_code), -2 * diff / 4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_z), 0.25 * 2 * diff / 4, atol=1e-6)
  assert float(aux["usage"]) == 1.0 and float(aux["perplexity"]) == pytest.approx(2.0)


def test_l2_codebook_is_a_param_and_ema_state_is_not():
  q = quantizer(8, 4, mode="l2")
  assert [p for p, _ in nnx.to_flat_state(nnx.state(q, nnx.Param))] == [("codebook",)]
  assert [p for p, _ in nnx.to_flat_state(nnx.state(q, vq.CodebookEMA))] == [("cluster_size",)]


# -- quantizer: "cosine_ema" -------------------------------------------------------------------------------------
CODES = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
BATCH = np.array([[2.0, 0.2], [1.0, -0.1], [0.1, 3.0]])  # -> codes 0, 0, 1; code 2 unused


def test_cosine_ema_update_matches_hand_computation():
  decay = 0.9
  q = quantizer(3, 2, CODES, mode="cosine_ema", decay=decay)
  assert not nnx.state(q, nnx.Param)  # the EMA codebook is no optimizer's business
  z_q, ids, aux = q(jnp.asarray(BATCH, jnp.float32))  # train mode by default
  np.testing.assert_array_equal(np.asarray(ids), [0, 0, 1])
  zn = unit(BATCH)
  # lookup and loss use the codebook before the update; z_q is in normalised space
  np.testing.assert_allclose(np.asarray(z_q), CODES[[0, 0, 1]], atol=1e-6)
  np.testing.assert_allclose(float(aux["loss"]), np.mean((CODES[[0, 0, 1]] - zn) ** 2), rtol=1e-5)
  mean0 = unit(zn[:2].mean(0))
  want = np.stack([unit(decay * CODES[0] + (1 - decay) * mean0),
                   unit(decay * CODES[1] + (1 - decay) * zn[2]),
                   CODES[2]])
  np.testing.assert_allclose(np.asarray(q.codebook[...]), want, atol=1e-6)
  assert np.array_equal(np.asarray(q.codebook[...])[2], CODES[2].astype(np.float32))  # unused: exactly kept
  np.testing.assert_allclose(np.asarray(q.cluster_size[...]), (1 - decay) * np.array([2, 1, 0]), atol=1e-7)


def test_cosine_ema_does_not_update_in_eval_mode_or_with_update_false():
  q = quantizer(3, 2, CODES, mode="cosine_ema")
  q.eval()
  q(jnp.asarray(BATCH, jnp.float32))
  nnx.view(q, deterministic=False)(jnp.asarray(BATCH, jnp.float32), update=False)
  np.testing.assert_array_equal(np.asarray(q.codebook[...]), CODES.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(q.cluster_size[...]), 0.0)
  nnx.view(q, deterministic=False)(jnp.asarray(BATCH, jnp.float32))  # a train-mode view shares the state
  assert not np.allclose(np.asarray(q.codebook[...]), CODES)


@pytest.mark.parametrize("mode", ["cosine_ema", "l2"])
def test_dead_code_is_restarted_to_an_encoder_output_of_the_batch(mode):
  codes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  q = quantizer(4, 2, codes, mode=mode, decay=0.99, dead_code_threshold=0.5)
  q.cluster_size[...] = jnp.array([1.0, 1.0, 1.0, 0.0])  # code 3 is dead; the others stay above 0.5
  z = jnp.asarray(BATCH, jnp.float32)
  q(z, key=jax.random.key(3))
  new = np.asarray(q.codebook[...])
  candidates = unit(BATCH) if mode == "cosine_ema" else BATCH
  assert np.min(np.abs(candidates - new[3]).max(-1)) < 1e-6, (new[3], candidates)
  np.testing.assert_array_equal(new[2], codes[2])  # unused but alive: kept
  if mode == "l2":  # the learned codebook moves only by restarts
    np.testing.assert_array_equal(new[:3], codes[:3])
  # A restarted code's count is 2 x the threshold: it may idle ln 2 / (1 - decay) steps before its next restart.
  np.testing.assert_allclose(np.asarray(q.cluster_size[...]), [0.99 + 0.02, 0.99 + 0.01, 0.99, 1.0], atol=1e-6)
  # Without key= the quantizer draws from its own 'codebook' stream.
  q.cluster_size[...] = jnp.array([1.0, 1.0, 1.0, 0.0])
  q.codebook[...] = jnp.asarray(codes, jnp.float32)
  q(z)
  assert np.min(np.abs(candidates - np.asarray(q.codebook[...])[3]).max(-1)) < 1e-6


def _dense_and_rare(rng, dense=960, rare=64, dim=8, noise=0.01):
  """A batch like Fashion-MNIST's encodings: most rows in one tight cluster (black background), the rest spread
  over 8 well-separated clusters (the garments)."""
  centres = unit(rng.standard_normal((9, dim)))
  rows = [centres[0] + noise * rng.standard_normal((dense, dim))]
  rows += [centres[1 + i % 8] + 0.01 * rng.standard_normal((1, dim)) for i in range(rare)]
  return unit(np.concatenate(rows)).astype(np.float32), centres


@pytest.mark.parametrize("mode", ["cosine_ema", "l2"])
def test_kmeans_init_gives_a_dense_cluster_few_codes(mode):
  """The first update with kmeans_init sets the codebook by k-means++ on the batch: 9 clusters, 9 codes, one
  each, however dense the first one is. Random rows (what restarting every code of a fresh codebook did) put
  ~15 of 16 codes into the dense cluster, leaving most of the others without a code of their own."""
  flat, centres = _dense_and_rare(np.random.default_rng(0))
  q = quantizer(9, flat.shape[1], mode=mode, kmeans_init=True)
  _, ids, _ = q(jnp.asarray(flat))  # the first update: counts all 0 -> k-means
  codes = np.asarray(q.codebook[...])
  nearest_centre = np.argmax(unit(codes) @ centres.T, axis=1)
  assert sorted(nearest_centre) == list(range(9)), nearest_centre  # one code per cluster
  np.testing.assert_allclose(np.asarray(q.cluster_size[...]).sum(), flat.shape[0])  # the counts of the assignment
  # The second update moves the codebook as usual (no second k-means).
  before = codes.copy()
  q(jnp.asarray(flat))
  if mode == "cosine_ema":
    assert not np.array_equal(before, np.asarray(q.codebook[...]))
    np.testing.assert_allclose(unit(np.asarray(q.codebook[...])), unit(before), atol=1e-3)
  ids = np.asarray(q.quantize(jnp.asarray(flat))[1])
  assert len(np.unique(ids[:960])) == 1  # the background: one code


def test_restarts_go_where_the_quantisation_error_is():
  """D^2 restarts: rows already on a code (error 0) are never drawn; the far rows are. Uniform restarts (the
  old rule) drew from the dense cluster 15 of 16 times."""
  flat, centres = _dense_and_rare(np.random.default_rng(1), dense=1000, rare=8, noise=0.0)
  codes = np.concatenate([unit(flat[:1].astype(np.float64)), unit(-centres[1:4])])  # code 0 on the dense cluster
  for seed in range(20):
    q = quantizer(4, flat.shape[1], codes, mode="cosine_ema", decay=0.99, dead_code_threshold=0.5)
    q.cluster_size[...] = jnp.array([1.0, 0.0, 0.0, 0.0])  # codes 1-3 are dead
    q(jnp.asarray(flat), key=jax.random.key(seed))
    new = np.asarray(q.codebook[...])[1:]
    dist_to_dense = np.linalg.norm(new - unit(centres[0]), axis=1)
    assert np.all(dist_to_dense > 0.5), (seed, dist_to_dense)  # each restarted code is on a rare row
    assert len({tuple(np.round(r, 4)) for r in new}) == 3  # three different rows (without replacement)


def test_kmeans_codebook_matches_lloyd_by_hand():
  """Two obvious clusters on a line: k-means puts one code on each mean, counts their sizes."""
  flat = jnp.asarray([[0.0], [0.1], [0.2], [5.0], [5.2]], jnp.float32)
  codes, counts = vq.kmeans_codebook(flat, 2, jax.random.key(0))
  order = np.argsort(np.asarray(codes)[:, 0])
  np.testing.assert_allclose(np.asarray(codes)[order, 0], [0.1, 5.1], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts)[order], [3, 2])


# -- losses ------------------------------------------------------------------------------------------------------
def test_gan_losses_and_adaptive_weight_by_hand():
  real, fake = jnp.array([[2.0, 0.5]]), jnp.array([[-2.0, 0.3]])
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.65))
  assert float(losses.generator_adv_loss(fake)) == pytest.approx(0.85)
  g_nll, g_g = jnp.array([[3.0], [4.0]]), jnp.array([0.0, 2.0])
  assert float(losses.adaptive_weight(g_nll, g_g, 0.8)) == pytest.approx(5.0 / (2.0 + 1e-4) * 0.8, rel=1e-6)
  assert float(losses.adaptive_weight(g_nll, jnp.zeros(2), 0.8)) == pytest.approx(1e4 * 0.8)  # clipped
  grad = jax.grad(lambda g: losses.adaptive_weight(g, g_g))(g_nll)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)  # a constant to the optimiser
  factor = jax.jit(losses.disc_factor, static_argnums=1)
  assert [float(factor(s, 5)) for s in (0, 4, 5, 100)] == [0.0, 0.0, 1.0, 1.0]


def test_pixel_losses():
  x, y = jnp.array([0.0, 1.0, 0.5, 0.2]), jnp.array([0.5, 0.0, 0.5, 0.4])
  assert float(losses.pixel_loss(x, y)) == pytest.approx((0.5 + 1.0 + 0.0 + 0.2) / 4)
  assert float(losses.pixel_loss(x, y, "l2")) == pytest.approx((0.25 + 1.0 + 0.0 + 0.04) / 4)
  with pytest.raises(ValueError, match="kind"):
    losses.pixel_loss(x, y, "l3")


@pytest.fixture(scope="module")
def perceptual():
  return losses.PerceptualLoss.from_name("beit_test_tiny", layers=(1, 2))


def test_perceptual_loss_zero_on_identical_images_and_positive_otherwise(perceptual):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)  # grayscale 28 px -> RGB 32 px inside
  y = jnp.clip(x + 0.1 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), 0, 1)
  loss = jax.jit(perceptual)
  assert float(loss(x, x)) == 0.0
  assert float(loss(x, y)) > 1e-6
  with pytest.raises(ValueError, match="layers"):
    losses.PerceptualLoss(nnx.merge(perceptual.graphdef, perceptual.state), layers=(3,))  # 2 blocks


def test_perceptual_features_are_the_networks_hidden_states(perceptual):
  x = jnp.asarray(np.random.default_rng(1).random((2, 28, 28, 1)), jnp.float32)
  prepared = perceptual.prepare(x)
  manual = (jnp.repeat(jax.image.resize(x, (2, 32, 32, 1), "bilinear"), 3, axis=-1) - 0.5) / 0.5
  np.testing.assert_allclose(np.asarray(prepared), np.asarray(manual), atol=1e-6)
  model = nnx.merge(perceptual.graphdef, perceptual.state)
  _, hidden = model(manual, return_hidden_states=True)
  feats = perceptual.features(x)
  assert len(feats) == 2 and feats[0].shape == (2, 16, 32)
  np.testing.assert_allclose(np.asarray(feats[1]), np.asarray(hidden[2][:, 1:]), atol=1e-6)


def test_normalised_perceptual_distance_by_hand(perceptual):
  """normalize=True: per layer, the mean over tokens of sum_c (f/|f| - g/|g|)^2, written out in numpy from
  the network's own features; invariant to the features' scale, so in [0, 4] per layer."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)
  norm = losses.PerceptualLoss(nnx.merge(perceptual.graphdef, perceptual.state), layers=perceptual.layers,
                               normalize=True)
  want = 0.0
  for f, g in zip(perceptual.features(x), perceptual.features(y)):
    f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    want += np.mean(np.sum((unit(f) - unit(g)) ** 2, axis=-1))
  got = float(jax.jit(norm)(x, y))
  print(f"normalised perceptual distance {got:.6f}, by hand {want:.6f}; plain {float(perceptual(x, y)):.6f}")
  assert abs(got - want) < 1e-5 * max(1.0, want) and 0 < got <= 4 * len(perceptual.layers)
  assert float(norm(x, x)) == 0.0


def test_perceptual_loss_gradient_reaches_x_hat_only(perceptual):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.random((2, 28, 28, 1)), jnp.float32)
  g_x, g_y, g_state = jax.jit(jax.grad(perceptual, argnums=(0, 1, 2)))(x, y, perceptual.state)
  assert float(jnp.abs(g_y).max()) > 0
  np.testing.assert_array_equal(np.asarray(g_x), 0.0)
  for leaf in jax.tree.leaves(g_state):  # stop_gradient on the network: nothing to apply to it
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert not isinstance(perceptual, nnx.Module)  # never part of a tokenizer's (optimised) state


# -- encoder / decoder / tokenizer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  return create_tokenizer("peco_test_tiny")


def test_tiny_encoder_decoder_shapes(tiny):
  x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)), jnp.float32)
  z = tiny.encoder(x)
  assert z.shape == (2, 14, 14, 16) and z.dtype == jnp.float32
  assert tiny.decoder(z).shape == (2, 28, 28, 1)
  assert tiny.grid == (14, 14) and tiny.vocab_size == 64 and tiny.input_size == 28


def test_tiny_encode_decode_ids_and_range(tiny):
  x = jnp.asarray(np.random.default_rng(1).random((2, 28, 28, 1)), jnp.float32)
  before = np.asarray(tiny.quantizer.cluster_size[...]).copy()
  ids = tiny.encode(x)
  assert ids.shape == (2, 14, 14) and ids.dtype == jnp.int32
  assert 0 <= int(ids.min()) and int(ids.max()) < 64
  np.testing.assert_array_equal(np.asarray(tiny.quantizer.cluster_size[...]), before)  # encode never updates
  _, aux = tiny(x, update=False)
  np.testing.assert_array_equal(np.asarray(aux["ids"]), np.asarray(ids))
  images = tiny.decode(ids)
  assert images.shape == (2, 28, 28, 1)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  with pytest.raises(ValueError, match=r"\[B, 28, 28, 1\]"):
    tiny.encode(jnp.zeros((1, 32, 32, 1)))


def test_f16_shapes_abstractly():
  tok = nnx.eval_shape(lambda: create_tokenizer("peco_vqgan_f16"))
  # attention after each res block at 14x14 only (level 4), and in the middle
  assert [len(level.attn) for level in tok.encoder.levels] == [0, 0, 0, 0, 2]
  assert [len(level.attn) for level in tok.decoder.levels] == [0, 0, 0, 0, 3]
  assert tok.encoder.mid.attn_1 is not None and tok.quantizer.codebook.shape == (8192, 256)
  graphdef, state = nnx.split(tok)

  def run(state, images):
    tok = nnx.merge(graphdef, state)
    return tok.encoder(images), tok(images), tok.encode(images), tok.decode(tok.encode(images))
  z, (recon, aux), ids, dec = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert z.shape == (2, 14, 14, 256)
  assert recon.shape == dec.shape == (2, 224, 224, 3)
  assert ids.shape == aux["ids"].shape == (2, 14, 14) and ids.dtype == jnp.int32


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="attn_resolutions"):
    PecoConfig(attn_resolutions=(16,))  # 224 px never has a 16x16 level
  with pytest.raises(ValueError, match="input_size"):
    get_config("peco_test_tiny", input_size=27)
  with pytest.raises(ValueError, match="quantizer"):
    get_config("peco_test_tiny", quantizer="kmeans")
  with pytest.raises(ValueError, match="unknown PecoConfig field"):
    get_config("peco_test_tiny", codebook_size=8)
  with pytest.raises(ValueError, match="peco_test_tiny"):
    create_tokenizer("peco_test_tiy")


@pytest.fixture(scope="module")
def fashion_mnist():
  from beit_jax.data.sources import get_source  # pylint: disable=import-outside-toplevel
  ds = get_source("fashion_mnist_files", "train").read().take(64).batch(64)
  return next(iter(ds.as_numpy_iterator()))["image"].astype(np.float32) / 255.0


def test_tiny_tokenizer_learns_fashion_mnist(tiny, fashion_mnist):
  tok = nnx.clone(tiny)  # the fixture stays untrained for the other tests
  opt = nnx.Optimizer(tok, optax.adam(2e-3), wrt=nnx.Param)
  x = jnp.asarray(fashion_mnist)

  @nnx.jit
  def step(tok, opt):
    def loss_fn(tok):
      recon, aux = tok(x)
      pixel = losses.pixel_loss(x, recon)
      return pixel + aux["loss"], pixel
    (loss, pixel), grads = nnx.value_and_grad(loss_fn, has_aux=True)(tok)
    opt.update(tok, grads)
    return loss, pixel

  history = np.array([[float(v) for v in step(tok, opt)] for _ in range(30)])
  print("loss", history[:, 0].round(3), "\npixel", history[:, 1].round(3))
  # The codebook term first grows (the encoder outgrows the +-1/K codebook init) then falls; the total ends lower.
  assert history[-1, 0] < 0.8 * history[0, 0]
  assert history[-1, 1] < 0.5 * history[0, 1]


# -- discriminator -----------------------------------------------------------------------------------------------
def test_patchgan_discriminator_layout_init_and_batchnorm_modes():
  d = nnx.eval_shape(lambda: NLayerDiscriminator(3, 64, 3, rngs=nnx.Rngs(0)))
  logits = jax.eval_shape(lambda s, x: nnx.merge(*s)(x), nnx.split(d), jax.ShapeDtypeStruct((1, 256, 256, 3),
                                                                                            jnp.float32))
  assert logits.shape == (1, 30, 30, 1)  # pix2pix's 70x70 PatchGAN on 256 px
  assert [c.kernel.shape[-1] for c in d.convs] == [128, 256, 512] and d.convs[0].bias is None
  d = NLayerDiscriminator(1, 16, 2, rngs=nnx.Rngs(0))
  kernel = np.asarray(d.convs[1].kernel[...])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
  scale = np.asarray(d.norms[1].scale[...])
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1)), jnp.float32)
  run = nnx.jit(lambda d, x: d(x))
  assert run(d, x).shape == (4, 5, 5, 1)
  running = np.asarray(d.norms[0].mean[...]).copy()
  assert np.abs(running).max() != 0  # train mode (the default) moved the running mean
  d.eval()
  run(d, x)
  np.testing.assert_array_equal(np.asarray(d.norms[0].mean[...]), running)


# -- where the perceptual network comes from: a PyTorch checkpoint, or one of our own runs ----------------------
def test_perceptual_network_from_a_timm_checkpoint_gives_timms_block_outputs(tmp_path, timm):
  """`pytorch:PATH`: a timm BEiT's state dict on disk -> the features are timm's own block outputs."""
  import torch  # pylint: disable=import-outside-toplevel
  from conftest import assert_parity, randomize_torch  # pylint: disable=import-outside-toplevel
  ref = randomize_torch(timm.models.beit.Beit(
      img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, use_abs_pos_emb=False,
      use_rel_pos_bias=True, init_values=0.1), seed=3)
  torch.save(ref.state_dict(), tmp_path / "ssl_vit.pth")
  perceptual = losses.PerceptualLoss.from_pytorch(tmp_path / "ssl_vit.pth", layers=(1, 3),
                                                  model_overrides={"num_heads": 2})
  x = np.random.default_rng(4).random((2, 28, 28, 1)).astype(np.float32)
  prepared = np.asarray(perceptual.prepare(jnp.asarray(x)))
  outputs = []  # each block's output tokens, from forward hooks on timm's blocks
  hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach().numpy())) for b in ref.blocks]
  with torch.no_grad():
    ref.forward_features(torch.from_numpy(prepared.transpose(0, 3, 1, 2).copy()))
  for h in hooks:
    h.remove()
  feats = perceptual.features(jnp.asarray(x))
  for f, l in zip(feats, (1, 3)):
    assert_parity(f, outputs[l - 1][:, 1:], atol=1e-5, what=f"block {l} features vs timm")


def test_perceptual_network_from_our_checkpoint_and_the_loop_config(tmp_path):
  """`checkpoint:DIR` (a model saved by `model_files.save_model`, as pre-training saves it) through the tokenizer
  loop's config parsing: the same features as the model that was saved; a missing path or kind is named."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from beit_jax import models  # pylint: disable=import-outside-toplevel
  from beit_jax import model_files  # pylint: disable=import-outside-toplevel
  from beit_jax.train import tokenizer as tokenizer_loop  # pylint: disable=import-outside-toplevel
  model = models.create_model("beit_test_tiny", seed=5)
  model_files.save_model(tmp_path / "ssl", model)
  config = ml_collections.ConfigDict({"loss": {"perceptual_weight": 1.0, "perceptual": {
      "source": f"checkpoint:{tmp_path / 'ssl'}", "layers": (2,)}}})
  loaded = tokenizer_loop.perceptual_loss(config)
  x = jnp.asarray(np.random.default_rng(6).random((2, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(loaded.features(x)[0]),
                                np.asarray(losses.PerceptualLoss(model, (2,)).features(x)[0]))
  config.loss.perceptual.source = f"checkpoint:{tmp_path / 'nowhere'}"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tokenizer_loop.perceptual_loss(config)
  config.loss.perceptual.source = "dino:vit_small"
  with pytest.raises(ValueError, match="perceptual.source"):
    tokenizer_loop.perceptual_loss(config)
