"""Decode JPEGs and apply the SimMIM augmentation on the training device.

CPU decoding (PIL, ~170 img/s per core for a 500x375 JPEG with the crop) cannot feed a fast
GPU. With ``data.decode: gpu`` the DataLoader workers only read the file bytes and draw, from
the sample's own generator and in the same order as the CPU path, the crop box and the flip
(and the mask); :class:`DeviceAugment` then decodes the batch's JPEGs with
``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA) and crops, resizes (bicubic with
antialiasing, PIL's filter), flips and normalises each image on the device.

The two paths draw identical crop boxes and flips; pixels differ only by interpolation and
IDCT rounding (and by libjpeg's DCT downscaling, which the CPU path uses for crops more than
twice the output size). Files the device path cannot take (non-JPEG, EXIF-rotated, CMYK)
arrive already decoded by the workers; a JPEG that fails to decode on the device is redone on
the CPU path in this process, which also skips it if it is unreadable, exactly as the CPU path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from simmim.data.dataset import PretrainDataset

log = logging.getLogger(__name__)


def _decode_jpeg() -> Any:
    from torchvision.io import decode_jpeg

    return decode_jpeg


class DeviceAugment:
    """Turns an ``encoded`` batch (see ``collate_pretrain``) into a normal batch on ``device``.

    Args:
        dataset: The dataset the batch came from (``encoded=True``): its augmentation gives
            the output size, mean and std, and it redoes samples that fail to decode.
        device: Where to decode and augment (``cuda``, or ``cpu`` for tests).
    """

    def __init__(self, dataset: PretrainDataset, device: torch.device | str) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        aug = dataset.augment
        self.size = aug.image_size
        std = torch.tensor(aug.std, dtype=torch.float32)
        mean = torch.tensor(aug.mean, dtype=torch.float32)
        # the CPU path's arithmetic: pixels * (1 / (255 std)) - mean / std
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (mean / std).view(1, 3, 1, 1).to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with ``image`` float32 (B,3,S,S) on the device instead of ``encoded``;
        ``mask`` moved to the device too. A batch without ``encoded`` passes unchanged."""
        items = batch.pop("encoded", None)
        if items is None:
            return batch
        jpeg_at = [i for i, item in enumerate(items) if "jpeg" in item]
        decoded = self.decode([items[i]["jpeg"] for i in jpeg_at])
        out = torch.empty(len(items), 3, self.size, self.size, device=self.device)
        done = torch.zeros(len(items), dtype=torch.bool)
        for i, image in zip(jpeg_at, decoded, strict=True):
            if image is None:
                continue
            out[i] = self.crop_resize(image, items[i]["box"], items[i]["flip"])[0]
            done[i] = True
        out.clamp_(0.0, 255.0).round_()  # PIL's resize output is uint8
        out.mul_(self.scale).sub_(self.shift)
        for i, item in enumerate(items):
            if done[i]:
                continue
            if "image" not in item:  # failed on the device: the CPU path, with its skipping
                sample = self.dataset.sample(item["epoch"], item["key_index"])
                batch["index"][i] = sample["index"]
                batch["skipped"] += int(sample["skipped"])
                item = {"image": sample["image"]}
            out[i] = item["image"].to(self.device, non_blocking=True)
        batch["image"] = out
        if "mask" in batch:
            batch["mask"] = batch["mask"].to(self.device, non_blocking=True)
        return batch

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """uint8 (3,H,W) RGB images on the device, in order; None where decoding failed."""
        if not data:
            return []
        from torchvision.io import ImageReadMode

        decode_jpeg = _decode_jpeg()
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad file fails the batch: find it
        out: list[torch.Tensor | None] = []
        for blob in data:
            try:
                out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as err:
                log.debug("device JPEG decode failed, redoing on the CPU path: %s", err)
                out.append(None)
        return out

    def crop_resize(self, image: torch.Tensor, box: tuple[float, float, float, float],
                    flip: bool) -> torch.Tensor:
        """(1,3,S,S) float32 in 0-255 (not rounded): ``box`` of uint8 ``image`` resized to S x S
        with antialiased bicubic (PIL's kernel), flipped horizontally when ``flip``."""
        left, top, right, bottom = (round(v) for v in box)
        crop = image[:, top:bottom, left:right].unsqueeze(0).float()
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False,
                            antialias=True)
        return out.flip(-1) if flip else out
