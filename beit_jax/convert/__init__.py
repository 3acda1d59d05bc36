"""PyTorch interop: load unilm / timm / HF BEiT checkpoints, export timm state dicts.

torch is imported lazily, only to read pickled `.pth`/`.bin` files.
"""
from beit_jax.convert.pytorch import (ConversionError, UnsafeCheckpointError, export_state_dict, infer_config,
                                      load_pytorch_checkpoint, load_state_dict, read_state_dict,
                                      save_timm_safetensors, to_timm_names)

__all__ = ["ConversionError", "UnsafeCheckpointError", "export_state_dict", "infer_config",
           "load_pytorch_checkpoint", "load_state_dict", "read_state_dict", "save_timm_safetensors",
           "to_timm_names"]
