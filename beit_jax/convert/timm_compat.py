"""Importing timm next to the CPU torch wheel.

The only torchvision that pins torch==2.13.0 on the registries is a CUDA build; its `_meta_registrations`
registers fakes for `torchvision::nms`/`qnms` without checking that the C++ ops loaded, so `import torchvision`
(and with it `import timm`) fails with "operator torchvision::nms does not exist". Defining the two op schemas
first lets it import; BEiT needs none of torchvision's C++ ops. Used by the parity tests and benchmarks only.
"""


_LIBRARY = None  # kept alive: torch drops a Library's definitions when the object is collected


def import_timm():
  global _LIBRARY  # pylint: disable=global-statement
  import torch  # pylint: disable=import-outside-toplevel
  if _LIBRARY is None:
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
  for op in ("nms", "qnms"):
    try:
      _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a real torchvision, or a second call)
      pass
  import timm  # pylint: disable=import-outside-toplevel
  return timm
