"""Lets torchvision's Python model code import with the CPU build of torch (test set-up only).

The torchvision 0.28.0 wheel on the registry is built against CUDA torch: with torch
2.13.0+cpu its compiled library fails to load, and ``import torchvision`` then stops at
``operator torchvision::nms does not exist``, because torchvision registers fake (meta)
kernels for ``nms`` and ``qnms`` at import, which needs their schemas. timm and Lightning
import torchvision too. Declaring those two schemas here, before torchvision is imported,
is enough for the models the tests build: their training forward needs no compiled
operator (nms runs only in detection post-processing, in eval). torchvision.ops.nms and
the other compiled operators still raise torchvision's own "Couldn't load custom C++ ops",
so nothing silently computes wrongly.

Import this module before torchvision, timm or lightning. Where torchvision's compiled
library loads (a matching build), it does nothing.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

# The schemas torchvision's compiled library would register and its import relies on.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to declare
    for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C.*")):
        try:
            torch.ops.load_library(library)
        except OSError:
            return False
    return hasattr(torch.ops.torchvision, "nms")


if not _compiled_ops_load():
    _library = torch.library.Library("torchvision", "DEF")  # kept alive: it owns the schemas
    for _schema in _SCHEMAS:
        _library.define(_schema)
