"""Fine-tuning, evaluation and linear probing on real Fashion-MNIST; layer decay against unilm's formula."""
import jax
import numpy as np
import pytest
from flax import nnx

from beit_jax import configs, convert, model_files, models
from beit_jax.data import mixup
from beit_jax.models.heads import probe_features
from beit_jax.train import finetune, linear_probe, metrics, optim, pretrain, sharding, weights
from conftest import tiny_config


def unilm_layer_id(name: str, depth: int) -> int:
  """unilm beit/optim_factory.py get_num_layer_for_vit, verbatim in logic, on unilm/timm parameter names."""
  num_max_layer = depth + 2
  if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_max_layer - 1


@pytest.mark.parametrize("layout", ["finetune", "pretrain"])
def test_layer_decay_scales_match_unilm_for_every_parameter(layout):
  kw = (dict(num_classes=10) if layout == "finetune" else
        dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_mask_token=True, vocab_size=64))
  model = models.create_model("beit_test_small", **kw)  # 4 blocks
  params = nnx.state(model, nnx.Param)
  scales = optim.layer_decay_scales(params, depth=4, decay=0.65)
  flat = dict(nnx.to_flat_state(nnx.State(scales)))
  checked = set()
  for path, _ in nnx.to_flat_state(params):
    name, _ = convert.pytorch._entry(path)  # pylint: disable=protected-access  (our param -> its unilm name)
    scale = flat[path].get_value() if hasattr(flat[path], "get_value") else flat[path]
    assert abs(float(scale) - 0.65 ** (4 + 1 - unilm_layer_id(name, 4))) < 1e-12, (name, scale)
    checked.add(unilm_layer_id(name, 4))
  assert checked == {0, 1, 2, 3, 4, 5}


def ft_config(init="", **kw):
  c = configs.finetune()
  c.init = init
  c.model.name = "beit_test_tiny"
  c.model.overrides = {"drop_path_rate": 0.1}
  c.data.source, c.data.split, c.data.image_size, c.data.crop_pct = "fashion_mnist_files", "train", 32, 1.0
  c.data.augment = {"crop_scale": (0.5, 1.0), "rand_augment": (2, 5.0, 0.5), "erase_prob": 0.25}
  c.eval_split = "test[:2000]"
  c.batch_size, c.total_steps, c.log_every, c.ckpt_every = 64, 300, 100, 300
  c.optim.lr, c.optim.warmup_steps, c.optim.layer_decay = 3e-3, 15, 0.75
  c.mesh = {"data": 8}
  for k, v in kw.items():
    c[k] = v
  return c


def test_finetune_from_scratch_learns_and_eval_mode_agrees(tmp_path, tokenizer_file):
  out = finetune.train_and_evaluate(ft_config(ema_decay=0.99, eval_every=100, eval_every_split="test[:500]"),
                                    tmp_path / "ft")
  m = out["metrics"]
  print("fine-tune from scratch, 300 steps of 64:", {k: round(v, 4) for k, v in m.items()})
  assert m["eval_count"] == 2000  # every held-out example once, none padded in
  # The learning curve: a point every 100 steps on the curve split, in images seen.
  curve = metrics.read_history(tmp_path / "ft")
  print("learning curve:", curve)
  assert [(h["step"], h["examples"], h["split"]) for h in curve] == [(s, 64 * s, "test[:500]") for s in (100, 200, 300)]
  assert curve[-1]["top1"] > curve[0]["top1"] and m["curve_top1"] == curve[-1]["top1"]
  # The whole recipe (mixup/cutmix, RandAugment, erasing, layer decay) on a 2-block, 32-wide ViT: slow to
  # start (a plain Adam loop on the same model reaches 52% after 150 steps without any augmentation), but
  # several times chance (0.10) within 300 steps.
  assert m["eval_top1"] > 0.3 and m["eval_top5"] > m["eval_top1"]
  assert "eval_ema_top1" in m
  # The saved classifier (the EMA weights, as saved) through `mode=eval`: the loop's EMA figure exactly.
  c = ft_config(init=f"checkpoint:{tmp_path / 'ft' / 'model'}", mode="eval")
  ev = finetune.evaluate_checkpoint(c, tmp_path / "eval")["metrics"]
  assert abs(ev["eval_top1"] - m["eval_ema_top1"]) < 1e-6, (ev, m)
  pre = tmp_path / "pre"
  pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=2, ckpt_every=2), pre)
  with pytest.raises(ValueError, match="no classification head of 10 classes"):  # a backbone is not a classifier
    finetune.evaluate_checkpoint(ft_config(init=f"checkpoint:{pre / 'model'}", mode="eval"), tmp_path / "e2")


def test_uint8_images_normalised_on_device_train_as_the_float_ones(tmp_path):
  """data.uint8 (the ImageNet configs' default): the images leave the host as uint8 and the step normalises them
  (mixup/cutmix after, with the same draws); the float path differs only by the host's rounding (<= 0.5 / 255
  per pixel), so 4 steps end at nearly the same loss and parameters. (With random erasing on, the 300-step run
  above trains through the device's erasing.)"""
  def run(uint8, name):
    c = ft_config(total_steps=4, log_every=4, ckpt_every=4, eval_split="", mesh={"data": 1}, num_devices=1)
    c.data.uint8 = uint8
    c.data.augment.erase_prob = 0.0
    c.optim.warmup_steps = 1
    return finetune.train_and_evaluate(c, tmp_path / name)
  f32, u8 = run(False, "float"), run(True, "uint8")
  p = lambda r: jax.tree.map(np.asarray, jax.device_get(r["state"]["params"]))
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p(f32), p(u8))))
  print("loss float", f32["metrics"]["loss"], "uint8", u8["metrics"]["loss"], f"params max abs diff {diff:.2e}")
  # Parameters: within the learning rate (3e-3): Adam's normalised steps move a parameter whose gradient is
  # near 0 by up to lr a step either way, whatever tiny difference decides its sign (2026-12-02: 9.8e-4).
  assert abs(f32["metrics"]["loss"] - u8["metrics"]["loss"]) < 2e-3 and diff < 3e-3


def test_finetune_starts_from_the_pretrained_backbone(tmp_path, tokenizer_file):
  """A pre-training run's model -> fine-tuning: the shared table copied into every block, the backbone's
  weights as pre-trained, the MIM head dropped, a fresh classification head at 0.001 of its init scale."""
  pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=2, ckpt_every=2), tmp_path / "pre")
  pre = nnx.state(model_files.load_model(tmp_path / "pre" / "model"), nnx.Param)
  cfg = weights.classifier_config(ft_config(), num_classes=10)
  model = weights.classifier(f"checkpoint:{tmp_path / 'pre' / 'model'}", cfg, seed=0)
  assert model.rel_pos is None and model.head is not None
  for block in model.blocks:
    np.testing.assert_array_equal(np.asarray(block.attn.rel_pos.table[...]), np.asarray(pre["rel_pos"]["table"]))
  np.testing.assert_array_equal(np.asarray(model.patch_kernel[...]), np.asarray(pre["patch_kernel"]))
  np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.fc2.kernel[...]),
                                np.asarray(pre["blocks"][1]["mlp"]["fc2"]["kernel"]))
  head = np.asarray(model.head.kernel[...])  # trunc_normal(std=0.02) x 0.001 (head_init_scale)
  assert 0.7 * 2e-5 < head.std() < 1.3 * 2e-5 and np.abs(head).max() < 2e-5 * 6, head.std()
  # At a new resolution (32 -> 48 px: a 4x4 -> 6x6 patch grid) the tables are resized on the way in; the
  # resize itself is checked against timm and SciPy in test_parity_timm.py.
  big = weights.classifier(f"checkpoint:{tmp_path / 'pre' / 'model'}", cfg.replace(img_size=48), seed=0)
  assert big.blocks[0].attn.rel_pos.table.shape == (11 * 11 + 3, cfg.num_heads)
  assert big(np.zeros((2, 48, 48, 3), np.float32)).shape == (2, 10)
  with pytest.raises(FileNotFoundError, match="config.init"):
    weights.classifier(f"checkpoint:{tmp_path / 'nowhere'}", cfg, seed=0)
  with pytest.raises(ValueError, match="config.init"):
    weights.classifier("imagenet", cfg, seed=0)


def test_linear_probe_of_every_block(tmp_path):
  c = configs.linear_probe()
  c.model.name = "beit_test_tiny"
  c.data.source, c.data.image_size, c.data.crop_pct = "fashion_mnist_files", 32, 1.0
  # No crop: random crops move a random network's features more than its probe can follow in 150 steps
  # (crop_scale (0.5, 1) gives 0.28 here), and this test compares the loop with a plain one on fixed features.
  c.data.augment = {"crop_scale": (1.0, 1.0), "rand_augment": None, "erase_prob": 0.0}
  c.eval_split = "test[:1000]"
  c.batch_size, c.total_steps, c.log_every, c.ckpt_every = 64, 150, 50, 150
  c.optim.lr = 3e-2  # 150 steps instead of the protocol's 50 epochs: larger steps
  c.mesh = {"data": 8}
  out = linear_probe.train_and_evaluate(c, tmp_path)
  m = out["metrics"]
  print("linear probes of a random beit_test_tiny:", {k: round(v, 4) for k, v in m.items()})
  assert out["blocks"] == (1, 2) and {"eval_top1_block1", "eval_top1_block2"} <= set(m)
  # Chance is 0.10. On the same (random, 64-dim) features a plain optax AdamW probe of 150 steps of 64 reached
  # 0.44 and a closed-form ridge classifier on 3000 examples 0.52, the ceiling of any linear probe; this loop
  # measured 0.43.
  assert m["eval_top1"] == max(m["eval_top1_block1"], m["eval_top1_block2"]) > 0.35
  assert m["eval_count"] == 1000


def test_label_smoothing_applies_without_mixup():
  """config.label_smoothing with mixup off: the step's loss is the cross-entropy against targets smoothed by it
  (the step used 0.0 whenever mixup was off, whatever the config said)."""
  c = ft_config()
  c.mixup, c.label_smoothing = None, 0.1
  # A deterministic forward (the same in the step and here), and logits far from uniform (a full-scale head).
  c.model.overrides = {"drop_path_rate": 0.0, "head_init_scale": 1.0}
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg = weights.classifier_config(c, 10)
  graphdef, state, tx, lr_fn = finetune.create_state(c, cfg, mesh, 100)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32)}
  logits = nnx.merge(graphdef, state["params"], state["rest"])(batch["image"])
  logp = np.asarray(jax.nn.log_softmax(logits))
  smoothed = -(np.asarray(mixup.smooth_one_hot(batch["label"], 10, 0.1)) * logp).sum(-1).mean()
  plain = -logp[np.arange(8), batch["label"]].mean()
  step = finetune.jit_train_step(c, mesh, state, graphdef, tx, lr_fn, 10)
  with jax.set_mesh(mesh):
    _, out = step(state, batch, None)
  print(f"loss {float(out['loss']):.6f}, smoothed CE {smoothed:.6f}, plain CE {plain:.6f}")
  assert abs(float(out["loss"]) - smoothed) < 1e-5 and abs(smoothed - plain) > 1e-3


def test_linear_probe_on_precomputed_features_matches_sklearn(tmp_path):
  """probe.features="precomputed": the stored features are the backbone's on each training image (in the
  labels' order), and the full-batch L-BFGS probe on whitened features, folded back into a probe of the raw
  ones, solves the problem scikit-learn solves: LogisticRegression (C = 1 / (l2 N), the same objective) on
  PCA(whiten=True) features, the same held-out accuracy. (Adam on these random-network features had not
  converged after 3,000 full-batch steps: 54.2% against 58.4%.)"""
  from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
  from beit_jax.data import pipelines, sources  # pylint: disable=import-outside-toplevel
  c = configs.linear_probe()
  c.model.name = "beit_test_tiny"
  c.data.source, c.data.split, c.data.image_size, c.data.crop_pct = "fashion_mnist_files", "train[:3000]", 32, 1.0
  c.probe.features, c.probe.layers = "precomputed", (2,)
  c.eval_split = "test[:1000]"
  c.batch_size, c.total_steps, c.log_every, c.ckpt_every = 600, 100, 50, 100
  c.probe.l2 = 1e-4
  # 4 of the 8 virtual devices: with 8 on 2 cores, XLA:CPU deadlocks in the full-batch step's all-reduce (7 of 8
  # devices wait in the rendezvous while the 8th's matmul waits for a thread of the pool they hold).
  c.mesh, c.num_devices = {"data": 4}, 4
  out = linear_probe.train_and_evaluate(c, tmp_path)
  ours = out["metrics"]["eval_top1"]

  backbone = linear_probe.load_backbone(c)
  def direct(split):
    src = sources.get_source("fashion_mnist_files", split)
    b = next(pipelines.eval_batches(src, pipelines.eval_transform(image_size=32, crop_pct=1.0),
                                    host_batch=src.num_examples))
    _, hidden = backbone.encode(b["image"], return_hidden_states=True)
    return np.asarray(probe_features(hidden, (2,))[0]), b["label"]
  x, y = direct("train[:3000]")
  mesh = sharding.make_mesh({"data": 4}, jax.devices()[:4])
  bdef, bstate = sharding.place(backbone, mesh, filters=(...,))
  stored = linear_probe.precomputed_features(c, mesh, 600, bdef, bstate, blocks=(2,), use_cls=True, normalize=True)
  np.testing.assert_allclose(np.asarray(stored["features"])[:3000, 0], x, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(stored["label"])[:3000], y)
  xt, yt = direct("test[:1000]")
  ref = make_pipeline(PCA(whiten=True), LogisticRegression(C=1 / (1e-4 * len(y)), max_iter=10_000, tol=1e-8))
  ref = ref.fit(x.astype(np.float64), y).score(xt.astype(np.float64), yt)
  print(f"precomputed-feature probe {ours:.4f}, scikit-learn's logistic regression {ref:.4f}")
  # Within 10 of the 1,000 held-out images: the two solvers stop at slightly different points of a flat optimum
  # (2 images apart on an Intel Xeon, 5 on an AMD EPYC); an unconverged probe is 40 apart (above).
  assert round(abs(ours - ref) * len(yt)) <= 10 and ours > 0.4
