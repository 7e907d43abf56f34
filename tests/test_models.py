"""The embedding CNN and FastFill's transformation h: shapes, the uncertainty head, specs."""
import pytest
import torch
from torch import nn

from fastfill_udfs.demo.cnn import EmbeddingCNN
from fastfill_udfs.models import (Transformation, build_model, model_spec,
                                  sigma_from_s)


def test_embedding_cnn_shapes():
    torch.manual_seed(0)
    model = EmbeddingCNN([4, 8], embedding_dim=16, num_classes=10).eval()
    emb, logits = model(torch.rand(3, 1, 28, 28))
    assert emb.shape == (3, 16) and logits.shape == (3, 10)
    assert torch.allclose(model.embed(torch.zeros(2, 1, 28, 28)), model(torch.zeros(2, 1, 28, 28))[0])
    rgb = EmbeddingCNN([4], embedding_dim=8, num_classes=3, in_channels=3).eval()
    assert rgb(torch.rand(2, 3, 32, 32))[0].shape == (2, 8)


def test_transformation_shapes_and_uncertainty_head():
    torch.manual_seed(0)
    h = Transformation(old_dim=6, new_dim=10, hidden_dim=16, num_hidden_layers=2).eval()
    out, s = h(torch.randn(5, 6))
    assert out.shape == (5, 10) and s.shape == (5,)
    assert h.has_uncertainty and isinstance(h.uncertainty_head, nn.Linear)
    assert h.uncertainty_head.in_features == 10 and h.uncertainty_head.out_features == 1
    assert h.embedding_dim == 10
    assert (sigma_from_s(s) > 0).all()
    assert torch.allclose(sigma_from_s(torch.tensor([0.0, 2.0])), torch.tensor([1.0, 2.718281828]))


def test_transformation_without_uncertainty_head():
    h = Transformation(6, 10, hidden_dim=16, num_hidden_layers=1, uncertainty=False).eval()
    out, s = h(torch.randn(4, 6))
    assert out.shape == (4, 10)
    assert not h.has_uncertainty and h.uncertainty_head is None
    assert torch.equal(s, torch.zeros(4))
    assert sum(isinstance(m, nn.Linear) for m in h.mlp) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in h.mlp) == 1


def test_fold_output_scale_scales_embedding_and_keeps_uncertainty():
    torch.manual_seed(1)
    h = Transformation(6, 10, hidden_dim=16).eval()
    x = torch.randn(7, 6)
    out, s = h(x)
    h.fold_output_scale(3.5)
    out2, s2 = h(x)
    assert torch.allclose(out2, 3.5 * out, atol=1e-5)
    assert torch.allclose(s2, s, atol=1e-5)
    plain = Transformation(6, 10, hidden_dim=16, uncertainty=False).eval()
    before = plain(x)[0]
    plain.fold_output_scale(0.5)
    assert torch.allclose(plain(x)[0], 0.5 * before, atol=1e-6)


@pytest.mark.parametrize("model", [
    EmbeddingCNN([4, 8, 12], embedding_dim=16, num_classes=7),
    Transformation(6, 10, hidden_dim=16, num_hidden_layers=3, uncertainty=True),
    Transformation(6, 10, hidden_dim=8, num_hidden_layers=1, uncertainty=False),
], ids=["cnn", "h", "h_fct"])
def test_model_spec_build_model_round_trip(model):
    import json

    spec = model_spec(model)
    assert json.loads(json.dumps(spec)) == spec          # JSON-able
    rebuilt = build_model(spec)
    assert type(rebuilt) is type(model)
    assert model_spec(rebuilt) == spec
    rebuilt.load_state_dict(model.state_dict())          # same architecture, strict
    model.eval(), rebuilt.eval()
    x = torch.rand(3, 1, 28, 28) if isinstance(model, EmbeddingCNN) else torch.randn(3, 6)
    for a, b in zip(model(x), rebuilt(x)):
        assert torch.equal(a, b)


def test_model_spec_of_cnn_lists_every_block():
    spec = model_spec(EmbeddingCNN([16, 32], embedding_dim=64, num_classes=5))
    assert spec == {"kind": "embedding_cnn", "params": {
        "channels": [16, 32], "embedding_dim": 64, "num_classes": 5, "in_channels": 1}}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="channels"):
        EmbeddingCNN([], embedding_dim=8, num_classes=2)
    with pytest.raises(ValueError, match="embedding_dim"):
        EmbeddingCNN([4], embedding_dim=0, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        EmbeddingCNN([4], embedding_dim=8, num_classes=0)
    for kwargs, name in (({"old_dim": 0, "new_dim": 4}, "old_dim"),
                         ({"old_dim": 4, "new_dim": 0}, "new_dim"),
                         ({"old_dim": 4, "new_dim": 4, "hidden_dim": 0}, "hidden_dim"),
                         ({"old_dim": 4, "new_dim": 4, "num_hidden_layers": 0},
                          "num_hidden_layers")):
        with pytest.raises(ValueError, match=name):
            Transformation(**kwargs)
    h = Transformation(6, 10, hidden_dim=8).eval()
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        h(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        h(torch.randn(6))
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model({"kind": "resnet", "params": {}})
    with pytest.raises(TypeError, match="Linear"):
        model_spec(nn.Linear(2, 2))
