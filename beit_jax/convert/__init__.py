"""PyTorch interop: load unilm / timm / HF BEiT checkpoints (and BEiT UperNet segmentation checkpoints), export
timm state dicts.

torch is imported lazily, only to read pickled `.pth`/`.bin` files.
"""
from beit_jax.convert.pytorch import (ConversionError, UnsafeCheckpointError, export_state_dict, infer_config,
                                      load_pytorch_checkpoint, load_state_dict, read_state_dict,
                                      save_timm_safetensors, to_timm_names)
from beit_jax.convert.segmentation import (export_segmentation_state_dict, load_segmentation_checkpoint,
                                           load_segmentation_state_dict, to_mmseg_names)

__all__ = ["ConversionError", "UnsafeCheckpointError", "export_segmentation_state_dict", "export_state_dict",
           "infer_config", "load_pytorch_checkpoint", "load_segmentation_checkpoint",
           "load_segmentation_state_dict", "load_state_dict", "read_state_dict", "save_timm_safetensors",
           "to_mmseg_names", "to_timm_names"]
