"""UperNet on a BEiT backbone (issue 11): shapes, BEiT's feature taps, and learning on composited Fashion-MNIST.

The data are made here (`composites`): a Fashion-MNIST item enlarged to 56 px at a random place on a 64 px black
canvas; its pixels brighter than 0.2 labelled with its class + 1, the background 0, label boundaries 255 (ignored,
as ADE20K's boundary pixels are). A first try with two 28 px items per canvas learned the background (IoU 95%) but
not the garments (2.3%) in 300 steps: at 8 px patches a 28 px item is too few tokens for a model from scratch."""
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from beit_jax import models
from beit_jax.data.sources import FASHION_MNIST_DIR
from beit_jax.models import segmentation
from beit_jax.train import seg_eval

NUM_CLASSES = 11  # background + 10 garments


def fmnist(split="train"):
  def read(name):
    with gzip.open(f"{FASHION_MNIST_DIR}/{name}.gz", "rb") as f:
      data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  prefix = "train" if split == "train" else "t10k"
  return read(f"{prefix}-images-idx3-ubyte").astype(np.float32) / 255, read(f"{prefix}-labels-idx1-ubyte")


def composites(images, labels, n, seed, size=64, scale=2):
  """One Fashion-MNIST item per canvas, enlarged `scale` times (nearest), at a random place on a black `size`
  px canvas; its pixels brighter than 0.2 labelled class + 1, the rest 0, label boundaries 255 (ignored)."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, size, size), np.float32)
  y = np.zeros((n, size, size), np.int32)
  s = 28 * scale
  for i in range(n):
    k = rng.integers(len(images))
    r, c = rng.integers(0, size - s + 1, 2)
    item = np.kron(images[k], np.ones((scale, scale), np.float32))
    x[i, r:r + s, c:c + s] = item
    y[i, r:r + s, c:c + s][item > 0.2] = labels[k] + 1
  edge = np.zeros_like(y, bool)  # label boundaries (4-neighbour changes) ignored
  edge[:, 1:] |= y[:, 1:] != y[:, :-1]
  edge[:, :, 1:] |= y[:, :, 1:] != y[:, :, :-1]
  y[edge] = 255
  return np.repeat(x[..., None], 3, -1), y


def make(seed=0):
  backbone = models.create_model("beit_test_small", seed=seed)  # 64 px, 8 px patches (8x8 grid), width 64, depth 4
  return segmentation.UperNet(backbone, segmentation.SegConfig(num_classes=NUM_CLASSES, aux_channels=32),
                              rngs=nnx.Rngs(seed))


def test_shapes_and_feature_taps():
  model = make()
  assert model.cfg.out_indices == (0, 1, 2, 3)  # depth 4: blocks 1/4, 1/2, 3/4, 4/4 (B: 3/5/7/11)
  assert segmentation.OUT_INDICES[12] == (3, 5, 7, 11) and segmentation.OUT_INDICES[24] == (7, 11, 15, 23)
  x = jnp.zeros((2, 64, 64, 3))
  levels = model.adapter(model.features(x))
  assert [lvl.shape[1] for lvl in levels] == [32, 16, 8, 4]  # 4x, 2x, 1x, 1/2x of the 8x8 grid
  logits, aux = model(x)
  assert logits.shape == aux.shape == (2, 32, 32, NUM_CLASSES) and logits.dtype == jnp.float32  # 4x the grid
  # PyTorch's adaptive average pool on uneven bins (7 -> 3: [0:3], [2:5], [4:7]).
  v = jnp.arange(7.0).reshape(1, 7, 1, 1) * jnp.ones((1, 1, 7, 1))
  np.testing.assert_allclose(segmentation.adaptive_avg_pool(v, 3)[0, :, 0, 0], [1.0, 3.0, 5.0])
  with pytest.raises(ValueError, match="no head"):
    segmentation.UperNet(models.create_model("beit_test_small", num_classes=3), segmentation.SegConfig(),
                         rngs=nnx.Rngs(0))


def test_composited_fashion_mnist_labels():
  x, y = composites(*fmnist("test"), 16, seed=1)
  assert x.shape == (16, 64, 64, 3) and y.shape == (16, 64, 64)
  assert set(np.unique(y)) <= set(range(NUM_CLASSES)) | {255}
  assert ((y > 0) & (y < 255)).mean() > 0.1 and (y == 0).mean() > 0.2  # garments and background both present
  assert (x[..., 0][y == 0] <= 0.2).all()  # background: black canvas or the dim fringe of an item


def test_a_tiny_upernet_learns_to_segment_composited_fashion_mnist():
  """A randomly initialised beit_test_small + UperNet, 200 AdamW steps of 16 (~80 s on 2 cores): the held-out
  mIoU is several times the all-background segmenter's, and the garments are not just background."""
  images, labels = fmnist("train")
  x_train, y_train = composites(images[:20000], labels[:20000], 4096, seed=0)
  x_test, y_test = composites(*fmnist("test"), 256, seed=1)
  model = make()
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 200), weight_decay=0.05)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rest, x, y):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest, copy=True)  # train mode: BatchNorm statistics and dropout move
      loss, main = segmentation.seg_loss(*m(x), y)
      return loss, (main, nnx.state(m, nnx.Not(nnx.Param)))
    (_, (main, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rest, main

  rng = np.random.default_rng(0)
  for _ in range(200):
    idx = rng.integers(0, len(x_train), 16)
    params, opt_state, rest, main = step(params, opt_state, rest, x_train[idx], y_train[idx])
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  predict = jax.jit(lambda x: jnp.argmax(segmentation.resize(model(x)[0], (64, 64)), -1))
  conf = seg_eval.confusion(np.asarray(predict(x_test)), y_test, NUM_CLASSES)
  miou, iou = seg_eval.mean_iou(conf), seg_eval.iou_per_class(conf)
  bg_only = seg_eval.mean_iou(seg_eval.confusion(np.zeros_like(y_test), y_test, NUM_CLASSES))
  print(f"200 steps x 16: train loss {float(main):.3f}; held-out mIoU {100 * miou:.1f}% (all-background "
        f"{100 * bg_only:.1f}%), background IoU {100 * iou[0]:.1f}%, garments {100 * np.nanmean(iou[1:]):.1f}%, "
        f"pixel accuracy {100 * seg_eval.pixel_accuracy(conf):.1f}%")
  assert miou > 3 * bg_only and np.nanmean(iou[1:]) > 0.1
