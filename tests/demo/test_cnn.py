"""The demo's CNNs: training on a tiny learnable problem, input validation, image tensors."""
import numpy as np
import pytest
import torch

from fastfill_udfs.demo.cnn import images_to_tensor, train_embedding_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_embedding_model_tiny_and_validation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    labels = np.arange(64) % 2
    images[labels == 1, :14] = 255                     # learnable: bright top half
    model, hist = train_embedding_model(images, labels, num_classes=2, channels=[4],
                                        embedding_dim=8, epochs=2, batch_size=16, lr=0.01,
                                        seed=0, label_smoothing=0.1)
    assert len(hist.loss) == 2 and len(hist.accuracy) == 2
    assert not model.training
    assert model(images_to_tensor(images[:3]))[0].shape == (3, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_embedding_model(images, labels + 1, num_classes=2, channels=[4], embedding_dim=8,
                              epochs=1, batch_size=16, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="equal length"):
        train_embedding_model(images, labels[:5], num_classes=2, channels=[4], embedding_dim=8,
                              epochs=1, batch_size=16, lr=0.01, seed=0)


def test_images_to_tensor():
    x = images_to_tensor(np.full((2, 4, 4), 255, dtype=np.uint8))
    assert x.shape == (2, 1, 4, 4) and x.max().item() == 1.0
    assert images_to_tensor(np.zeros((2, 4, 4, 3), dtype=np.uint8)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        images_to_tensor(np.zeros((4, 4), dtype=np.uint8))
