"""Which timm models SimMIM supports, with their patch size and stride, readable without torch.

``patch_size`` is the side in pixels of one token where the mask token is substituted: the
patch size for transformers, the stem's stride (4) for ConvNets; ``stride`` is the total
stride of the final feature map (the decoder's PixelShuffle factor, 32 for Swin and ConvNets).

The API validates specs without importing torch or timm, so the facts it needs live in
``model_catalog.json``. Regenerate it after a timm upgrade::

    python -m simmim_service.model_catalog --write
"""

from __future__ import annotations

import argparse
import difflib
import json
import warnings
from functools import cache
from pathlib import Path
from typing import Any

CATALOG_PATH = Path(__file__).with_name("model_catalog.json")
PATTERNS = ("vit_*", "deit*", "eva*", "swin*", "resnet*", "convnext_*")
SUPPORTED_CLASSES = {"VisionTransformer": "vit", "VisionTransformerDistilled": "vit", "Eva": "eva",
                     "SwinTransformer": "swin", "SwinTransformerV2": "swin",
                     "ResNet": "resnet", "ResNetV2": "resnetv2", "ConvNeXt": "convnext"}
CONVNET_FAMILIES = ("resnet", "resnetv2", "convnext")


@cache
def load_catalog() -> dict[str, Any]:
    """``{"timm_version": ..., "models": {name: {family, patch_size, stride, image_size}}}``."""
    data: dict[str, Any] = json.loads(CATALOG_PATH.read_text())
    return data


def lookup(name: str) -> dict[str, Any] | None:
    """The catalog entry of a supported model, or None."""
    entry: dict[str, Any] | None = load_catalog()["models"].get(name)
    return entry


def suggestions(name: str) -> list[str]:
    """Up to five supported names close to ``name``."""
    return difflib.get_close_matches(name, list(load_catalog()["models"]), n=5, cutoff=0.6)


def describe(name: str) -> dict[str, Any] | None:
    """Instantiate ``name`` on the meta device (no memory) and read its geometry."""
    import timm
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model: Any = timm.create_model(name, pretrained=False, num_classes=0)
    family = SUPPORTED_CLASSES.get(type(model).__name__)
    if family is None:
        return None
    if family in CONVNET_FAMILIES:
        return _describe_convnet(name, family)
    patch = int(model.patch_embed.patch_size[0])
    stride = int(model.feature_info[-1]["reduction"]) if family == "swin" else patch
    return {"family": family, "patch_size": patch, "stride": stride,
            "image_size": int(model.patch_embed.img_size[0])}


def _describe_convnet(name: str, family: str) -> dict[str, Any] | None:
    """Geometry of a ConvNet as our adapter sees it; None when it cannot be built with the
    default ``model.convnet_remask`` (if re-masking were the default, EvoNorm and
    FilterResponseNorm models would be left out: they have no visible-only statistics)."""
    import torch

    from simmim.backbones import create_encoder, timm_kwargs
    from simmim.config import CONVNET_REMASK_DEFAULT
    from simmim.errors import ConfigError

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            encoder = create_encoder(name, convnet_remask=CONVNET_REMASK_DEFAULT, **timm_kwargs(name, 224))
        except ConfigError:
            return None
    return {"family": family, "patch_size": encoder.patch_size, "stride": encoder.stride,
            "image_size": int(encoder.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])}


def build_catalog() -> dict[str, Any]:
    """Describe every timm model matching ``PATTERNS`` (about a minute on a laptop CPU)."""
    import timm

    names = sorted({n for p in PATTERNS for n in timm.list_models(p)})
    models, unsupported = {}, []
    for name in names:
        entry = describe(name)
        if entry is None:
            unsupported.append(name)
        else:
            models[name] = entry
    return {"timm_version": timm.__version__, "models": models, "unsupported": unsupported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {CATALOG_PATH.name}")
    args = parser.parse_args()
    catalog = build_catalog()
    text = json.dumps(catalog, indent=1, sort_keys=True) + "\n"
    if args.write:
        CATALOG_PATH.write_text(text)
    print(f"{len(catalog['models'])} supported, {len(catalog['unsupported'])} unsupported")


if __name__ == "__main__":
    main()
