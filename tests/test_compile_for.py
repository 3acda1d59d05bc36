"""Ahead-of-time compilation of the real train steps: `python -m beit_jax.compile_for` (issue 9).

The cpu:N tests run everywhere (8 host devices from conftest); the TPU-topology tests need libtpu
(`pip install "jax[tpu]==<jax version>"`, no TPU) and are marked slow: minutes of compile each on 2 cores.
"""
import importlib.util

import pytest

from beit_jax import compile_for, configs
from conftest import tiny_config


def finetune_config(model="beit_base_patch16_224", batch=8):
  c = configs.finetune()
  c.model.name, c.batch_size = model, batch
  return c


def test_finetune_step_flops_match_the_analytic_model_count():
  """XLA's count of the compiled BEiT-B fine-tuning step vs the analytic matmul count x3 (models.flops)."""
  r = compile_for.compile_for(finetune_config(), "cpu:1")
  ratio = r["xla_flops_per_device"] / r["model_flops_per_step"]
  print(compile_for.report(r))
  assert 0.95 < ratio < 1.10, ratio


def test_pretrain_step_under_fsdp_on_8_devices(tokenizer_file):
  """The tiny pre-training config compiled for 8 devices with fsdp=8: the train state is sharded (per-device
  bytes well under the total), the report names the mesh, and no chip is known for CPU devices."""
  c = tiny_config(tokenizer_file)
  c.model.overrides = {"width": 256, "num_heads": 4}
  c.mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  r = compile_for.compile_for(c, "cpu:8")
  text = compile_for.report(r)
  print(text)
  assert "'fsdp': 8" in text and "fits" not in r
  assert r["state_bytes_per_device"] < 0.2 * r["state_bytes_total"]
  assert 0.9 < r["xla_flops_per_device"] * 8 / r["model_flops_per_step"] < 1.2


def test_segmentation_step_shards_the_heads_under_fsdp():
  """The UperNet step of the ADE20K recipe, at a small width, compiled for 8 devices with fsdp=8: backbone,
  adapter and head convolutions are sharded (their output channels over fsdp), only BatchNorm statistics,
  classifiers and the relative position tables stay whole."""
  from configs import beit_base_upernet_ade20k  # pylint: disable=import-outside-toplevel
  c = beit_base_upernet_ade20k.get_config()
  c.model.overrides = {"img_size": 64, "width": 128, "depth": 4, "num_heads": 2}
  c.data.image_size = c.data.crop_size = 64
  c.seg.aux_channels, c.batch_size, c.eval.stride = 64, 8, 43
  c.mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  r = compile_for.compile_for(c, "cpu:8")
  print(compile_for.report(r))
  assert r["mode"] == "segmentation" and "fits" not in r
  assert r["state_bytes_per_device"] < 0.2 * r["state_bytes_total"]


def test_linear_probe_step_compiles_with_the_backbone_frozen():
  """The paper's probe step (each step's crops through the frozen backbone), a small BEiT on 2 devices: XLA's
  count is the backbone's forward alone (no backbone gradients: those would triple it), the probe state is only the probes, and the
  precomputed probe, which has no training step, is refused by name."""
  c = configs.load("beit_base_linear_probe")
  c.model.name, c.batch_size, c.data.image_size, c.data.num_classes = "beit_test_tiny", 8, 32, 10
  c.model.overrides = {"width": 256, "num_heads": 4}  # wide enough for the matmuls to be the FLOPs
  c.mesh = {"data": 2, "fsdp": 1, "tensor": 1}
  r = compile_for.compile_for(c, "cpu:2")
  print(compile_for.report(r))
  assert r["mode"] == "linear_probe"
  assert 0.9 < r["xla_flops_per_device"] * 2 / r["model_flops_per_step"] < 1.3
  c.probe.features = "precomputed"
  with pytest.raises(SystemExit, match="probe.features='precomputed'"):
    compile_for.compile_for(c, "cpu:2")


def test_bad_batch_and_topology_are_named():
  c = finetune_config(model="beit_test_tiny", batch=6)
  c.data.image_size = 32
  c.mesh = {"data": 4, "fsdp": 1, "tensor": 1}
  with pytest.raises(SystemExit, match="config.batch_size=6 is not divisible by the data-parallel size 4"):
    compile_for.compile_for(c, "cpu:4")
  with pytest.raises(SystemExit, match="cpu:64: this process has 8 CPU devices"):
    compile_for.compile_for(c, "cpu:64")


_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _LIBTPU, reason="needs libtpu (pip install 'jax[tpu]==<jax version>')")
@pytest.mark.parametrize("topology", ["v5e:4x4", "v5p:2x2x2"])
def test_beit_base_pretraining_compiles_for_a_tpu_topology_with_fsdp(topology, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  c = configs.pretrain()
  c.tokenizer = {"name": "dalle", "encoder": "", "decoder": None}
  c.batch_size = 256
  c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  r = compile_for.compile_for(c, topology)
  print(compile_for.report(r))
  n = r["devices"]
  assert r["fits"]
  # Parameters and optimizer state split n ways (the few vectors that do not divide stay replicated).
  assert r["state_bytes_total"] / r["state_bytes_per_device"] == pytest.approx(n, rel=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not _LIBTPU, reason="needs libtpu (pip install 'jax[tpu]==<jax version>')")
def test_finetune_step_flops_on_a_tpu_topology_match_the_analytic_count(monkeypatch):
  """The TPU compiler's count of the BEiT-B step vs the analytic one (the pre-training step adds the tokenizer,
  whose convolutions the TPU compiler counts differently inside the step than alone: see BENCHMARKS.md)."""
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  c = finetune_config(batch=256)
  c.model.overrides = {**dict(c.model.overrides), "dtype": "bfloat16"}
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  r = compile_for.compile_for(c, "v5e:4x4")
  print(compile_for.report(r))
  assert 0.9 < r["xla_flops_per_device"] * r["devices"] / r["model_flops_per_step"] < 1.1
