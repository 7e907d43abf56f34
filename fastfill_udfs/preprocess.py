"""What a model expects of an image (`models.preprocess` in config): size or shorter-side resize
plus centre crop, channels, mean/std; and the decoding of encoded image bytes to that form.

Two decoders give the same uint8 [H, W, C] images (to within rounding of the resize):
* the host: PIL, on a pool of threads (PIL releases the GIL while it decodes and resizes), so
  one Python worker uses every core it is given;
* a CUDA device (`torchvision.io.decode_jpeg(device="cuda")`, nvJPEG, and the resize and crop on
  the device), for JPEGs when the model runs on a GPU: the host then only hands over bytes.
Images of any size and mode stack into one uint8 batch; the float conversion and normalisation
run on the model's device (`BatchEmbedder(preprocess=spec.normalizer())`)."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

DECODE_DEVICES = ("auto", "cpu", "cuda")
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Preprocess:
    """size: (height, width) to resize to, or None; resize_shorter: > 0 scales each image so its
    shorter side has this many pixels, keeping its aspect ratio (instead of `size`; 0 = off);
    center_crop: (height, width) cut from the centre after resizing, or None; channels: 1
    (grayscale) or 3 (RGB); mean/std: per channel, applied to values in [0, 1].

    The resize is bilinear with antialiasing (PIL's), the shorter-side size and the crop's
    offsets are computed as torchvision's `Resize(int)` and `CenterCrop` do, so
    `resize_shorter=256, center_crop=(224, 224)` is the usual ImageNet evaluation transform."""

    size: Optional[tuple[int, int]] = None
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize_shorter: int = 0
    center_crop: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"models.preprocess.channels must be 1 or 3, got {self.channels}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"models.preprocess.size must be [height, width] (positive) or [], "
                             f"got {list(self.size)}")
        if isinstance(self.resize_shorter, bool) or not isinstance(self.resize_shorter, int) \
                or self.resize_shorter < 0:
            raise ValueError(f"models.preprocess.resize_shorter must be an int >= 0 (0 = off), "
                             f"got {self.resize_shorter!r}")
        if self.resize_shorter and self.size is not None:
            raise ValueError(f"models.preprocess.size ({list(self.size)}) and "
                             f"models.preprocess.resize_shorter ({self.resize_shorter}) are "
                             "exclusive: set size to [] to resize by the shorter side")
        crop = self.center_crop
        if crop is not None:
            if len(crop) != 2 or min(crop) <= 0:
                raise ValueError(f"models.preprocess.center_crop must be [height, width] "
                                 f"(positive) or [], got {list(crop)}")
            room = self.size or ((self.resize_shorter,) * 2 if self.resize_shorter else None)
            if room is not None and (crop[0] > room[0] or crop[1] > room[1]):
                raise ValueError(f"models.preprocess.center_crop {list(crop)} does not fit in "
                                 f"the resized image ({list(room)} at the least)")
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
        def ints(key):
            values = section.get(key) or None
            if values is None:
                return None
            if not isinstance(values, (list, tuple)) or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError(f"models.preprocess.{key} must be a list of ints, got {values!r}")
            return tuple(values)
        return cls(ints("size"), int(section["channels"]),
                   tuple(float(m) for m in section["mean"]), tuple(float(s) for s in section["std"]),
                   section.get("resize_shorter", 0), ints("center_crop"))

    # ------------------------------------------------------------------ geometry
    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a `height` x `width` image after the resize step."""
        if self.size is not None:
            return self.size
        if not self.resize_shorter:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize_shorter * long / short)  # torchvision truncates
        return (new_long, self.resize_shorter) if width <= height else \
            (self.resize_shorter, new_long)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of the centre crop of a resized image of
        `height` x `width` (the whole image without a crop). Raises ValueError when the crop
        does not fit."""
        if self.center_crop is None:
            return 0, 0, height, width
        ch, cw = self.center_crop
        if ch > height or cw > width:
            raise ValueError(f"a {height}x{width} image (after resizing) is smaller than "
                             f"models.preprocess.center_crop {list(self.center_crop)}")
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the model receives for a `height` x `width` image."""
        return self.crop_box(*self.resized_hw(height, width))[2:]

    # ------------------------------------------------------------------ host decoding
    def _pil_resize(self, im):
        from PIL import Image

        hw = self.resized_hw(im.height, im.width)
        if (im.height, im.width) != hw:
            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
        return im

    def decode(self, data: Any, item_id: Any = None) -> np.ndarray:
        """Encoded bytes -> uint8 [H, W, channels], resized and cropped; raises ImageDecodeError
        (naming `item_id`) for bytes that are not an image or an image the crop does not fit."""
        from fastfill_udfs.data.images import ImageDecodeError, decode_uint8

        img = decode_uint8(data, item_id=item_id, grayscale=self.channels == 1,
                           transform=self._pil_resize)
        try:
            top, left, ch, cw = self.crop_box(img.shape[0], img.shape[1])
        except ValueError as exc:
            who = f"item {item_id!r}" if item_id is not None else "image"
            raise ImageDecodeError(f"{who}: {exc}") from None
        if (ch, cw) != img.shape[:2]:
            img = np.ascontiguousarray(img[top:top + ch, left:left + cw])
        return img[..., None] if img.ndim == 2 else img

    def decode_many(self, images: Sequence[Any], ids: Sequence[Any], *,
                    workers: int = 1) -> tuple[list, list]:
        """Decode `images` on `workers` host threads: (uint8 arrays, None where it failed;
        reasons, None where it decoded)."""
        def one(pair):
            from fastfill_udfs.data.images import ImageDecodeError

            item_id, data = pair
            try:
                return self.decode(data, item_id=item_id), None
            except ImageDecodeError as exc:
                return None, str(exc)
        pairs = list(zip(ids, images))
        if workers > 1 and len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
                out = list(pool.map(one, pairs))
        else:
            out = [one(p) for p in pairs]
        return [o[0] for o in out], [o[1] for o in out]

    # ------------------------------------------------------------------ device decoding
    def decode_many_on_device(self, images: Sequence[Any], ids: Sequence[Any], device, *,
                              workers: int = 1) -> tuple[list, list]:
        """Like `decode_many`, but JPEGs are decoded, resized and cropped on `device` (a CUDA
        device; torchvision's nvJPEG decoder): (uint8 [H, W, C] device tensors, None where it
        failed; reasons). Anything that is not a JPEG, or that the device decoder rejects, is
        decoded on the host (so it gets the host's reason) and moved to the device."""
        import torch
        import torchvision
        from torchvision.io import ImageReadMode

        device = torch.device(device)
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        out: list = [None] * len(images)
        reasons: list = [None] * len(images)
        jpeg = [i for i, b in enumerate(images)
                if isinstance(b, (bytes, bytearray, memoryview)) and bytes(b[:3]) == _JPEG_MAGIC]
        host = sorted(set(range(len(images))) - set(jpeg))
        if jpeg:
            datas = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg]
            try:
                with warnings.catch_warnings():  # deprecated for TorchCodec since 0.29
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = torchvision.io.decode_jpeg(datas, mode=mode, device=device)
            except RuntimeError:  # one bad file fails the whole call: decode those on the host
                decoded = None
                host = sorted(host + jpeg)
            if decoded is not None:
                for i, chw in zip(jpeg, decoded):
                    out[i] = self.resize_crop_tensor(chw, item_id=ids[i])
        if host:
            arrays, why = self.decode_many([images[i] for i in host], [ids[i] for i in host],
                                           workers=workers)
            for i, arr, reason in zip(host, arrays, why):
                reasons[i] = reason
                if arr is not None:
                    out[i] = torch.from_numpy(arr).to(device)
        return out, reasons

    def resize_crop_tensor(self, chw, item_id: Any = None):
        """A decoded uint8 [C, H, W] tensor (any device) -> uint8 [H', W', C] resized (bilinear,
        antialiased, rounded) and centre-cropped, on the same device. Raises ImageDecodeError
        naming `item_id` when the crop does not fit."""
        import torch

        from fastfill_udfs.data.images import ImageDecodeError

        h, w = int(chw.shape[-2]), int(chw.shape[-1])
        rh, rw = self.resized_hw(h, w)
        try:
            top, left, ch, cw = self.crop_box(rh, rw)
        except ValueError as exc:
            who = f"item {item_id!r}" if item_id is not None else "image"
            raise ImageDecodeError(f"{who}: {exc}") from None
        x = chw
        if (rh, rw) != (h, w):
            x = torch.nn.functional.interpolate(
                chw[None].float(), size=(rh, rw), mode="bilinear", align_corners=False,
                antialias=True)[0].round_().clamp_(0, 255).to(torch.uint8)
        return x[:, top:top + ch, left:left + cw].permute(1, 2, 0).contiguous()

    # ------------------------------------------------------------------ on the model's device
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
                "mean": list(self.mean), "std": list(self.std),
                "resize_shorter": self.resize_shorter,
                "center_crop": list(self.center_crop or [])}


def device_decoder_available() -> bool:
    """Whether torchvision (with its image extension) is importable, for decoding on CUDA."""
    try:
        import torchvision.io  # noqa: F401

        return hasattr(torchvision.io, "decode_jpeg")
    except Exception:  # ImportError, or a torchvision built for another torch (OSError, ...)
        return False


def choose_decode_device(preference: str, model_device) -> str:
    """Where images are decoded: "cuda" (on `model_device`) or "cpu".

    `preference` (`backfill.decode_device`): "auto" decodes on the model's device when that is
    a CUDA device and torchvision's GPU decoder can be imported, else on the host; "cpu" always
    on the host; "cuda" on the model's device, raising ValueError naming the key when the model
    does not run on CUDA or torchvision is missing."""
    if preference not in DECODE_DEVICES:
        raise ValueError(f"backfill.decode_device must be one of {DECODE_DEVICES}, "
                         f"got {preference!r}")
    on_cuda = getattr(model_device, "type", str(model_device).split(":")[0]) == "cuda"
    if preference == "cpu":
        return "cpu"
    if preference == "auto":
        return "cuda" if on_cuda and device_decoder_available() else "cpu"
    if not on_cuda:
        raise ValueError(f"backfill.decode_device is 'cuda' but the model runs on "
                         f"{model_device} (backfill.device): decode on 'cpu' or 'auto'")
    if not device_decoder_available():
        raise ValueError("backfill.decode_device is 'cuda' but torchvision (its nvJPEG decoder) "
                         "cannot be imported: pip install torchvision, or set it to 'cpu'")
    return "cuda"


def host_workers() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
