"""BatchEmbedder / select_device on CPU with a tiny conv model (the GPU path is exercised by
bench/bench_gpu_inference.py on a CUDA machine)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastfill_udfs.inference import (BatchEmbedder, imagenet_preprocess, normalize_input,
                                     select_device)


class TinyNet(nn.Module):
    def __init__(self, in_ch: int = 3, dim: int = 8, with_logits: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, dim)
        self.head = nn.Linear(dim, 5)
        self.with_logits = with_logits

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        emb = self.fc(h)
        return (emb, self.head(emb)) if self.with_logits else emb


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    m = TinyNet(**kw)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _plain_loop(model, x: torch.Tensor, bs: int = 4) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            o = model(x[i:i + bs])
            outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs).numpy()


@pytest.fixture
def uint8_images():
    return np.random.default_rng(0).integers(0, 256, size=(11, 12, 10, 3), dtype=np.uint8)


def _as_float_nchw(u8: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(u8).float() / 255.0
    return (t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)).contiguous()


def test_matches_plain_loop_uint8_nhwc(uint8_images):
    model = _model()
    ref = _plain_loop(model, _as_float_nchw(uint8_images))
    emb = BatchEmbedder(model, device="cpu", batch_size=4)
    out = emb(uint8_images)
    assert out.dtype == np.float32 and out.shape == (11, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert emb.precision == "fp32" and emb.channels_last is False  # CPU defaults
    assert emb.embedding_dim == 8


def test_matches_plain_loop_float_nchw(uint8_images):
    model = _model()
    x = _as_float_nchw(uint8_images)
    ref = _plain_loop(model, x)
    out = BatchEmbedder(model, device="cpu", batch_size=5)(x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # float64 input is accepted (cast to float32), and a CPU torch tensor too
    out64 = BatchEmbedder(model, device="cpu")(x.numpy().astype(np.float64))
    np.testing.assert_allclose(out64, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(BatchEmbedder(model, device="cpu")(x), ref, rtol=1e-5, atol=1e-5)


def test_chunking_invariance(uint8_images):
    model = _model()
    a = BatchEmbedder(model, device="cpu", batch_size=3)(uint8_images)
    b = BatchEmbedder(model, device="cpu", batch_size=100)(uint8_images)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # output grouping (device-buffer flushes) does not change anything either
    c = BatchEmbedder(model, device="cpu", batch_size=2, max_device_rows=2)(uint8_images)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_uint8_grayscale_hw_path():
    imgs = np.random.default_rng(1).integers(0, 256, size=(7, 9, 9), dtype=np.uint8)
    model = _model(in_ch=1)
    ref = _plain_loop(model, _as_float_nchw(imgs))
    out = BatchEmbedder(model, device="cpu", batch_size=3)(imgs)
    assert out.shape == (7, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert normalize_input(imgs).shape == (7, 9, 9, 1)


def test_read_only_input_is_fine(uint8_images):
    model = _model()
    ro = uint8_images.copy()
    ro.setflags(write=False)  # like a zero-copy Arrow buffer
    np.testing.assert_allclose(BatchEmbedder(model, device="cpu")(ro),
                               BatchEmbedder(model, device="cpu")(uint8_images), atol=1e-6)


def test_tuple_returning_model(uint8_images):
    model = _model(with_logits=True)
    ref = _plain_loop(model, _as_float_nchw(uint8_images))
    out = BatchEmbedder(model, device="cpu", batch_size=4)(uint8_images)
    assert out.shape == (11, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_spatial_output_is_flattened():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)).eval()  # [B, 4, 1, 1]
    out = BatchEmbedder(model, device="cpu")(np.zeros((2, 8, 8, 3), np.uint8))
    assert out.shape == (2, 4)


def test_empty_input_dry_run_and_attribute():
    model = _model()
    out = BatchEmbedder(model, device="cpu")(np.empty((0, 12, 10, 3), np.uint8))
    assert out.shape == (0, 8) and out.dtype == np.float32
    # a model declaring its width: no dry run needed, even for a shapeless empty input
    model.embedding_dim = 8
    emb = BatchEmbedder(model, device="cpu")
    assert emb(np.empty((0,), np.uint8)).shape == (0, 8)
    assert emb([]).shape == (0, 8)
    # neither attribute nor per-image shape: a clear error
    del model.embedding_dim
    with pytest.raises(ValueError, match="embedding_dim"):
        BatchEmbedder(model, device="cpu")(np.empty((0, 0, 0, 3), np.uint8))


class NaNRows(nn.Module):
    """Embedding = mean pixel per channel, but NaN for images whose first pixel is 255."""

    def forward(self, x):
        emb = x.mean(dim=(2, 3))
        bad = x[:, 0, 0, 0] == 1.0
        return torch.where(bad[:, None], torch.full_like(emb, float("nan")), emb)


def test_nan_detection_names_rows():
    imgs = np.zeros((9, 4, 4, 3), np.uint8)
    imgs[[2, 7], 0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"\[2, 7\]"):
        BatchEmbedder(NaNRows(), device="cpu", batch_size=4)(imgs)
    imgs[:, 0, 0, 0] = 0
    imgs[5, 0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"non-finite.*\[5\]"):
        BatchEmbedder(NaNRows(), device="cpu", batch_size=4)(imgs)


def test_preprocess_hook(uint8_images):
    model = _model()
    pre = imagenet_preprocess(size=16)
    x = _as_float_nchw(uint8_images)
    ref = _plain_loop(model, pre(x))
    out = BatchEmbedder(model, device="cpu", batch_size=4, preprocess=pre)(uint8_images)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_rejected():
    emb = BatchEmbedder(_model(), device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        emb(np.zeros((2, 4, 4, 3), np.int32))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        emb(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        BatchEmbedder(_model(), device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        BatchEmbedder(_model(), device="cpu", precision="int8")


def test_bf16_on_cpu_is_close():
    imgs = np.random.default_rng(2).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    model = _model()
    a = BatchEmbedder(model, device="cpu")(imgs)
    b = BatchEmbedder(model, device="cpu", precision="bf16")(imgs)
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="preference"):
        select_device("tpu")
    with pytest.raises(ValueError, match="preference"):
        select_device(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_without_cuda_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        BatchEmbedder(_model(), device="cuda")
