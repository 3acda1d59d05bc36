"""`beit-convert SRC DST`: PyTorch BEiT checkpoint -> beit_jax (orbax), or beit_jax -> timm safetensors.

  beit-convert beit_base_patch16_224_pt22k_ft22kto1k.pth ckpt/beit_b16      # unilm/timm/HF -> orbax folder
  beit-convert hf_folder_or_model.safetensors ckpt/beit_b16 --img-size 384  # resize position tables
  beit-convert ckpt/beit_b16 beit_b16_timm.safetensors                      # orbax folder -> timm state dict
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from beit_jax import model_files
from beit_jax.convert import pytorch


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="beit-convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help=".pth/.bin/.safetensors/HF folder, or a beit_jax orbax checkpoint folder")
  p.add_argument("dst", help="orbax checkpoint folder, or a .safetensors file (timm names) to export to")
  p.add_argument("--img-size", type=int, help="target resolution; position tables are resized")
  p.add_argument("--rel-pos-interp", choices=("cubic", "linear"), default="cubic",
                 help="relative position table resizing: BEiT's cubic (default) or timm's linear")
  p.add_argument("--per-layer-rel-pos", action="store_true",
                 help="copy a shared relative position table into every block (fine-tuning layout)")
  p.add_argument("--num-classes", type=int, help="replace the head with a fresh one of this many classes")
  p.add_argument("--num-heads", type=int, help="attention heads, when the checkpoint cannot tell")
  return p


def _is_orbax(path: pathlib.Path) -> bool:
  return path.is_dir() and not any((path / f).exists() for f in pytorch._WEIGHT_FILES)  # pylint: disable=protected-access


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
  overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes),
                                 ("num_heads", args.num_heads)) if v is not None}
  if args.per_layer_rel_pos:
    overrides.update(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
  if _is_orbax(src):
    if dst.suffix != ".safetensors":
      raise SystemExit(f"beit-convert: from a beit_jax checkpoint the destination must be .safetensors, got {dst}")
    model = model_files.load_model(src)
    pytorch.save_timm_safetensors(model, dst)
  else:
    model = pytorch.load_pytorch_checkpoint(src, rel_pos_interp=args.rel_pos_interp, **overrides)
    if dst.suffix == ".safetensors":
      pytorch.save_timm_safetensors(model, dst)
    else:
      if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"beit-convert: {dst} exists and is not empty; refusing to overwrite")
      model_files.save_model(dst, model)
  cfg = model.config
  print(f"wrote {dst}: {cfg.depth} blocks, width {cfg.width}, {cfg.num_heads} heads, {cfg.img_size}px, "
        f"classes={cfg.num_classes} vocab={cfg.vocab_size}")
  return 0


def run():  # console-script entry
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    sys.exit(main())
  except (pytorch.ConversionError, FileNotFoundError, ValueError) as e:
    sys.exit(f"beit-convert: {e}")


if __name__ == "__main__":
  run()
