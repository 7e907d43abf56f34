"""models.preprocess: resize (fixed size or shorter side), centre crop, decoding on the host
threads and on the device path (checked on CPU), and where images get decoded."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastfill_udfs.config import ConfigError, load_config
from fastfill_udfs.data import ImageDecodeError
from fastfill_udfs.preprocess import Preprocess, choose_decode_device

IMAGENET = dict(channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                resize_shorter=256, center_crop=(224, 224))


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tiny() -> np.ndarray:
    """2 x 8 RGB; both rows equal, so halving the height averages equal values."""
    row = np.array([70, 0, 0, 0, 0, 56, 0, 0], np.uint8)
    img = np.zeros((2, 8, 3), np.uint8)
    img[..., 0], img[..., 1] = row, 2 * row
    return img


# Halving 8 columns with PIL's antialiased bilinear filter (support 2 input pixels): output
# column x is centred on input 2x + 1; input pixel j weighs 1 - |j + 0.5 - (2x + 1)| / 2, so
# the weights are (3, 3, 1)/7 at the left edge, (1, 3, 3, 1)/8 inside, (1, 3, 3)/7 at the right:
# red = [3*70/7, 0, 3*56/8, 56/7] = [30, 0, 21, 8]; green is twice that.
TINY_HALVED_RED = [30, 0, 21, 8]


def test_resize_shorter_side_by_hand():
    out = Preprocess(channels=3, resize_shorter=1).decode(_png(_tiny()))
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == TINY_HALVED_RED
    assert out[0, :, 1].tolist() == [2 * v for v in TINY_HALVED_RED]
    assert out[0, :, 2].tolist() == [0, 0, 0, 0]


def test_centre_crop_by_hand():
    # resized to 1 x 4, a 1 x 1 crop starts at round((4 - 1) / 2) = round(1.5) = 2 (torchvision)
    out = Preprocess(channels=3, resize_shorter=1, center_crop=(1, 1)).decode(_png(_tiny()))
    assert out.shape == (1, 1, 3) and out[0, 0].tolist() == [21, 42, 0]
    # no resize: a 3 x 5 image cropped to 3 x 3 keeps columns 1..3
    img = np.arange(45, dtype=np.uint8).reshape(3, 5, 3)
    out = Preprocess(channels=3, center_crop=(3, 3)).decode(_png(img))
    np.testing.assert_array_equal(out, img[:, 1:4])


def test_geometry_matches_torchvision_conventions():
    pre = Preprocess(**IMAGENET)
    assert pre.resized_hw(375, 500) == (256, 341)      # int(256 * 500 / 375) = 341
    assert pre.resized_hw(500, 333) == (384, 256)      # int(256 * 500 / 333) = 384
    assert pre.crop_box(256, 341) == (16, 58, 224, 224)  # round(117 / 2) = 58 (half to even)
    assert pre.output_hw(300, 225) == (224, 224)
    assert Preprocess(size=(28, 28)).output_hw(500, 375) == (28, 28)  # today's default
    assert Preprocess().output_hw(7, 9) == (7, 9)


def test_size_default_behaviour_is_unchanged():
    img = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    pre = Preprocess(size=(12, 10), channels=3)
    want = np.asarray(Image.fromarray(img).resize((10, 12), Image.BILINEAR))
    np.testing.assert_array_equal(pre.decode(_png(img)), want)


def test_real_sized_jpeg_to_imagenet_input():
    out = Preprocess(**IMAGENET).decode(_jpeg(375, 500))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_host_threads_give_the_same_images_and_reasons():
    pre = Preprocess(**IMAGENET)
    datas = [_jpeg(300, 400, s) for s in range(5)] + [b"not an image"]
    ids = [f"i{k}" for k in range(6)]
    one, why1 = pre.decode_many(datas, ids, workers=1)
    many, why2 = pre.decode_many(datas, ids, workers=3)
    assert why1[:5] == why2[:5] == [None] * 5
    assert "'i5': cannot decode" in why1[5] and "'i5': cannot decode" in why2[5]
    for a, b in zip(one[:5], many[:5]):
        np.testing.assert_array_equal(a, b)
    assert one[5] is None and many[5] is None


def test_device_path_agrees_with_the_host_path_on_cpu():
    pytest.importorskip("torchvision")
    pre = Preprocess(**IMAGENET)
    datas = [_jpeg(375, 500, 1), _jpeg(500, 333, 2), _png(np.full((300, 300, 3), 9, np.uint8)),
             b"\xff\xd8\xff truncated jpeg"]
    ids = ["a", "b", "png", "bad"]
    host, _ = pre.decode_many(datas, ids)
    dev, reasons = pre.decode_many_on_device(datas, ids, "cpu")
    assert reasons[:3] == [None] * 3 and "'bad'" in reasons[3] and dev[3] is None
    for h, d in zip(host[:3], dev[:3]):
        assert isinstance(d, torch.Tensor) and tuple(d.shape) == h.shape == (224, 224, 3)
        diff = np.abs(d.numpy().astype(int) - h)
        assert diff.max() <= 2 and diff.mean() < 0.5   # the same decoder; the resize rounds


def test_device_resize_by_hand():
    chw = torch.from_numpy(_tiny()).permute(2, 0, 1)
    out = Preprocess(channels=3, resize_shorter=1).resize_crop_tensor(chw)
    assert out[0, :, 0].tolist() == TINY_HALVED_RED


def test_crop_larger_than_the_image_names_the_item():
    pre = Preprocess(channels=3, center_crop=(40, 40))
    with pytest.raises(ImageDecodeError, match="'small'.*center_crop"):
        pre.decode(_png(np.zeros((30, 50, 3), np.uint8)), item_id="small")


@pytest.mark.parametrize("kwargs, key", [
    (dict(size=(28, 28), resize_shorter=32), "resize_shorter"),
    (dict(resize_shorter=-1), "resize_shorter"),
    (dict(resize_shorter=200, center_crop=(224, 224)), "center_crop"),
    (dict(size=(20, 20), center_crop=(24, 10)), "center_crop"),
    (dict(center_crop=(0, 5)), "center_crop"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"models.preprocess.{key}"):
        Preprocess(**kwargs)


def test_from_config():
    cfg = load_config([], ["models.preprocess.size=[]", "models.preprocess.resize_shorter=256",
                           "models.preprocess.center_crop=[224, 224]",
                           "models.preprocess.channels=3"])
    pre = Preprocess.from_config(cfg.get_path("models.preprocess"))
    assert (pre.size, pre.resize_shorter, pre.center_crop) == (None, 256, (224, 224))
    default = Preprocess.from_config(load_config([]).get_path("models.preprocess"))
    assert (default.size, default.resize_shorter, default.center_crop) == ((28, 28), 0, None)
    with pytest.raises(ValueError, match="models.preprocess.center_crop"):
        Preprocess.from_config({**cfg.get_path("models.preprocess"), "center_crop": ["a", 1]})
    with pytest.raises(ConfigError, match="models.preprocess.resize_shorter"):
        load_config([], ["models.preprocess.resize_shorter=wide"])


def test_decoding_stays_on_the_host_without_cuda():
    cpu = torch.device("cpu")
    assert choose_decode_device("auto", cpu) == "cpu"
    assert choose_decode_device("cpu", cpu) == "cpu"
    with pytest.raises(ValueError, match="backfill.decode_device is 'cuda'"):
        choose_decode_device("cuda", cpu)
    with pytest.raises(ValueError, match="backfill.decode_device must be one of"):
        choose_decode_device("gpu", cpu)


def test_decoding_goes_to_the_gpu_with_cuda(monkeypatch):
    import fastfill_udfs.preprocess as prep

    monkeypatch.setattr(prep, "device_decoder_available", lambda: True)
    assert choose_decode_device("auto", torch.device("cuda:0")) == "cuda"
    assert choose_decode_device("cpu", torch.device("cuda:0")) == "cpu"
    monkeypatch.setattr(prep, "device_decoder_available", lambda: False)
    assert choose_decode_device("auto", torch.device("cuda:0")) == "cpu"
    with pytest.raises(ValueError, match="torchvision"):
        choose_decode_device("cuda", torch.device("cuda:0"))
