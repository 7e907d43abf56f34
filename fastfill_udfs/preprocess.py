"""What a model expects of an image (`models.preprocess` in config): size, channels, mean/std.

Decoding and resizing run on the host (PIL) so that a batch of images of any size and mode
stacks into one uint8 array; the float conversion and normalisation run on the model's device
(`BatchEmbedder(preprocess=spec.normalizer())`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Preprocess:
    """size: (height, width) to resize to, or None to keep each image's size; channels: 1
    (grayscale) or 3 (RGB); mean/std: per channel, applied to values in [0, 1]."""

    size: Optional[tuple[int, int]] = None
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"models.preprocess.channels must be 1 or 3, got {self.channels}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"models.preprocess.size must be [height, width] (positive) or [], "
                             f"got {list(self.size)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"models.preprocess.{name} needs 1 or {self.channels} values "
                                 f"(channels), got {list(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"models.preprocess.std must be positive, got {list(self.std)}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "Preprocess":
        """From the config's `models.preprocess` mapping; raises ValueError naming the key."""
        size = section.get("size") or None
        return cls(tuple(int(s) for s in size) if size else None, int(section["channels"]),
                   tuple(float(m) for m in section["mean"]), tuple(float(s) for s in section["std"]))

    def decode(self, data: Any, item_id: Any = None) -> np.ndarray:
        """Encoded bytes -> uint8 [H, W, channels] at `size`; raises ImageDecodeError (naming
        `item_id`) for bytes that are not an image."""
        from fastfill_udfs.data import decode_image

        img = decode_image(data, item_id=item_id, size=self.size, grayscale=self.channels == 1)
        img = np.round(img * 255.0).astype(np.uint8)
        return img[..., None] if img.ndim == 2 else img

    def normalizer(self):
        """The on-device step for BatchEmbedder: (x - mean) / std (None when it is identity)."""
        if all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std):
            return None
        mean, std = self.mean, self.std

        def normalize(x):
            from fastfill_udfs.inference import normalize_channels

            return normalize_channels(x, mean, std)
        return normalize

    def as_dict(self) -> dict:
        return {"size": list(self.size or []), "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}


def stack_by_shape(images: Sequence[np.ndarray]) -> dict[tuple, list[int]]:
    """Positions of `images` grouped by shape (images kept at their own size may differ)."""
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    return groups
