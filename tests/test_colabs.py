"""The notebooks in colabs/ run top to bottom (nbclient, a real kernel, CPU); a failing cell fails the test.

token_prediction.ipynb trains its tokenizer and BEiT for a few steps here (no demo workdir), and its
official-checkpoint part runs on files in the official formats with random weights: a DALL-E encoder/decoder
under the `dall_e` names and a BEiT pre-training state dict under unilm/timm names.
"""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
  nb = nbformat.read(COLABS / name, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: outputs not stripped"
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLABS.parent)}},
                   extra_arguments=[]).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def text_of(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def images_of(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_masking_notebook():
  nb = execute("masking.ipynb", {})
  out = text_of(nb)
  assert "masked count mean" in out and images_of(nb) == 4, out[-2000:]


def test_token_prediction_notebook(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax import convert, models  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import dalle  # pylint: disable=import-outside-toplevel
  tok = dalle.DalleTokenizer(dalle.DalleConfig(n_hid=32, n_blk_per_group=1, vocab_size=128), rngs=nnx.Rngs(0))
  dalle.save_safetensors(tok.encoder, tmp_path / "encoder.safetensors", "encoder")
  dalle.save_safetensors(tok.decoder, tmp_path / "decoder.safetensors", "decoder")
  # 64 px in 16 px patches: a 4x4 grid, as DALL-E's 8x downsampling of the 32 px tokenizer view
  beit = models.create_model("beit_test_tiny", img_size=64, patch_size=16, use_shared_rel_pos_bias=True,
                             use_rel_pos_bias=False, use_mask_token=True, vocab_size=128)
  convert.save_timm_safetensors(beit, tmp_path / "beit_pt.safetensors")
  nb = execute("token_prediction.ipynb", {
      "BEIT_DEMO_DIR": str(tmp_path / "demo"), "BEIT_COLAB_STEPS": "8",
      "DALLE_ENCODER": str(tmp_path / "encoder.safetensors"), "DALLE_DECODER": str(tmp_path / "decoder.safetensors"),
      "BEIT_CHECKPOINT": str(tmp_path / "beit_pt.safetensors")})
  out = text_of(nb)
  assert "training a tokenizer and a BEiT here" in out and "masked-token accuracy on these 8 images" in out, out
  assert out.count("masked-token accuracy") == 2 and images_of(nb) == 2, out[-2000:]
  assert (tmp_path / "demo" / "beit_pretrain" / "model").is_dir()
