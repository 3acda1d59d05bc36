"""Importing timm / transformers next to the CPU build of torch.

The only torchvision wheel on the package index is a CUDA build whose C++ ops cannot load with the CPU torch;
its import then dies registering fake kernels for `torchvision::nms` and `qnms`, ops that never got defined.
timm and transformers' vision models import torchvision, so both fail. Defining those two schemas first lets
torchvision import; BEiT needs none of its C++ ops. Used by the parity tests, the benchmarks and conversion
scripts, never by the model code.
"""

_LIBRARY = None  # kept alive: torch drops a Library's definitions when the object is collected


def install_torchvision_shim() -> None:
  """Makes `import torchvision` work with the CPU torch (idempotent; harmless with a matching torchvision)."""
  global _LIBRARY  # pylint: disable=global-statement
  import torch  # pylint: disable=import-outside-toplevel
  if _LIBRARY is None:
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
  for op in ("nms", "qnms"):
    try:
      _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a real torchvision, or a second call)
      pass


def import_timm():
  install_torchvision_shim()
  import timm  # pylint: disable=import-outside-toplevel
  return timm


def import_transformers():
  install_torchvision_shim()
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers
