"""Importing timm next to the CPU torch wheel.

The only torchvision that pins torch==2.13.0 on the registries is a CUDA build; its `_meta_registrations`
registers fakes for `torchvision::nms`/`qnms` without checking that the C++ ops loaded, so `import torchvision`
(and with it `import timm`) fails with "operator torchvision::nms does not exist". Defining the two op schemas
first lets it import; BEiT needs none of torchvision's C++ ops. Used by the parity tests and benchmarks only.
"""


def import_timm():
  import torch  # pylint: disable=import-outside-toplevel
  lib = torch.library.Library("torchvision", "FRAGMENT")  # pylint: disable=unused-variable
  for op in ("nms", "qnms"):
    try:
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a real torchvision, or a second call)
      pass
  import timm  # pylint: disable=import-outside-toplevel
  return timm
