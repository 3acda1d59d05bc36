"""The tokenizer training loop on real Fashion-MNIST: both step variants, metrics, the saved tokenizer."""
import numpy as np

from beit_jax import configs, tokenizers
from beit_jax.train import tokenizer as tokenizer_loop


def tiny_config():
  c = configs.tokenizer()
  c.tokenizer.name = "peco_test_tiny"  # 28 px grey -> 14x14 ids from 64 codes
  c.data.source = "fashion_mnist_files"
  c.data.split, c.data.eval_split, c.data.channels = "train", "test[:512]", 1
  c.loss.perceptual.source = "name:beit_test_tiny"
  c.loss.perceptual.layers = (1, 2)
  c.loss.perceptual_weight = 0.1
  c.loss.disc_start = 3  # steps 1-3 without, 4-6 with the GAN terms
  c.loss.disc = {"ndf": 8, "n_layers": 2}
  c.batch_size, c.total_steps = 16, 6
  c.optim.lr, c.optim.warmup_steps = 1e-3, 1
  c.log_every, c.eval_every, c.ckpt_every = 3, 6, 3
  c.mesh = {"data": 8}
  return c


def test_tokenizer_loop_trains_saves_and_resumes(tmp_path):
  out = tokenizer_loop.train_and_evaluate(tiny_config(), tmp_path)
  m = out["metrics"]
  for key in ("psnr", "perceptual", "d_loss", "g_loss", "d_weight", "eval_psnr", "eval_usage", "eval_perplexity"):
    assert key in m and np.isfinite(m[key]), (key, m)
  assert 0 < m["eval_usage"] <= 1 and 1 <= m["eval_perplexity"] <= 64
  tok = tokenizers.load("peco", checkpoint=tmp_path / "tokenizer")
  images = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
  ids = np.asarray(tok.encode(images))
  assert ids.shape == (2, 14, 14) and ids.dtype == np.int32 and ids.max() < 64
  np.testing.assert_array_equal(ids, np.asarray(out["tokenizer"].encode(images)))
  again = tokenizer_loop.train_and_evaluate(tiny_config(), tmp_path)  # finished: resumes at the end, reports
  assert abs(again["metrics"]["eval_psnr"] - m["eval_psnr"]) < 1e-4
