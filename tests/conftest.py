"""Shared test set-up.

Eight virtual CPU devices let the sharding tests build real meshes on this machine; the flag must be set
before jax is imported anywhere, which conftest.py guarantees.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

# The loop tests compile the same small programs in several runs and subprocesses: a persistent compilation
# cache (shared by the xdist workers and the subprocesses, which inherit the variable) compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/beit_jax_test_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def timm():
  from beit_jax.convert.timm_compat import import_timm  # pylint: disable=import-outside-toplevel
  return import_timm()


def randomize_torch(module, seed: int = 0):
  """Fills every parameter with random values of a realistic scale, so parity tests compare real numbers
  (zero-initialised tables, unit norms and 0.001 heads would hide layout mistakes)."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if "relative_position_bias_table" in name:
        p.copy_(0.5 * r)
      elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * r)
      elif name.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2", "lambda_1", "lambda_2"):
        p.copy_(0.5 + 0.1 * r)
      else:
        p.copy_(0.1 * r)
  return module.eval()


def torch_state_dict(module) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def max_abs_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def assert_parity(ours, ref, atol: float = 1e-5, what: str = "output"):
  """Asserts max |ours - ref| <= atol on an output of magnitude ~1 (checked, so atol means something)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  scale = float(np.max(np.abs(ref)))
  diff = max_abs_diff(ours, ref)
  print(f"{what}: max abs diff {diff:.3g} (max |ref| {scale:.3g})")
  assert 0.1 < scale < 100, f"{what}: reference magnitude {scale} makes the tolerance meaningless"
  assert diff <= atol, f"{what}: max abs diff {diff} > {atol}"


# -- the pre-training loop tests' tokenizer and config (test_pretrain.py, test_multiprocess.py) ---------------
@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
  """A small DALL-E encoder with random weights: fixed targets for loop mechanics (the demo trains a real one)."""
  path = tmp_path_factory.mktemp("tok") / "encoder.safetensors"
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import dalle  # pylint: disable=import-outside-toplevel
  tok = dalle.DalleTokenizer(dalle.DalleConfig(n_hid=64, n_blk_per_group=1, vocab_size=512), decoder=False,
                             rngs=nnx.Rngs(0))
  dalle.save_safetensors(tok.encoder, path, "encoder")
  return path


def tiny_config(tokenizer_file, **kw):
  """The pre-training config of the loop tests: a tiny BEiT on 32x32 Fashion-MNIST, 4 steps of batch 16."""
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  c = configs.pretrain()
  c.model.name = "beit_test_tiny"
  c.model.overrides = {"drop_path_rate": 0.1}
  c.tokenizer.encoder = str(tokenizer_file)
  c.data.source = "fashion_mnist_files"
  c.data.image_size = c.data.tokenizer_size = 32
  c.data.mask = {"num_masked": 6, "min_block": 2, "min_aspect": 0.3, "kind": "blockwise"}
  c.batch_size, c.total_steps, c.log_every, c.ckpt_every = 16, 4, 2, 2
  c.optim.warmup_steps = 1
  for k, v in kw.items():
    c[k] = v
  return c
