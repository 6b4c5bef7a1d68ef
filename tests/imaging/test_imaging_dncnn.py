"""DnCNN structure flags, and the normalised convolutions of ContractiveDnCNN."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from implicitlayers.imaging import (
    ContractiveDnCNN,
    DnCNN,
    NormalizedConv2d,
    circular_conv_norm,
    estimate_lipschitz,
)

F64 = torch.float64


def _convs(net):
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_dncnn_shapes_and_structure():
    net = DnCNN(channels=3, depth=6, width=16)
    x = torch.randn(2, 3, 20, 24)
    assert net(x).shape == x.shape
    convs = _convs(net)
    assert len(convs) == 6
    assert [c.out_channels for c in convs] == [16] * 5 + [3]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 5
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert all(c.bias is None for c in convs[1:-1])  # batch norm supplies the shift
    assert not isinstance(net.layers[-1], nn.ReLU)  # no final activation, no residual add


def test_dncnn_flags_change_the_module():
    base = DnCNN(channels=1, depth=5, width=8)
    deeper = DnCNN(channels=1, depth=7, width=8)
    wider = DnCNN(channels=1, depth=5, width=12)
    no_bn = DnCNN(channels=1, depth=5, width=8, batch_norm=False)
    no_sn = DnCNN(channels=1, depth=5, width=8, spectral_norm=False)
    big_kernel = DnCNN(channels=1, depth=5, width=8, kernel_size=5)
    assert len(_convs(deeper)) == len(_convs(base)) + 2
    assert _convs(wider)[0].out_channels == 12
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert all(c.bias is not None for c in _convs(no_bn))
    assert not any(parametrize.is_parametrized(c) for c in _convs(no_sn))
    assert _convs(big_kernel)[0].weight.shape[-1] == 5
    # torch's spectral norm: the reshaped weight has unit top singular value
    net = DnCNN(channels=1, depth=3, width=8, batch_norm=False)
    for _ in range(30):
        net(torch.randn(1, 1, 8, 8))
    w = _convs(net)[1].weight.detach()
    assert float(torch.linalg.matrix_norm(w.reshape(8, -1), ord=2)) == pytest.approx(1, rel=1e-3)


def test_dncnn_bad_arguments():
    with pytest.raises(ValueError, match="depth must be >= 2"):
        DnCNN(depth=1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DnCNN(kernel_size=4)
    with pytest.raises(TypeError, match="batch_norm must be a bool"):
        DnCNN(batch_norm=1)
    with pytest.raises(ValueError, match=r"1 channels.*channels=3.*channels=1"):
        DnCNN(channels=3, depth=3, width=4)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="lipschitz"):
        ContractiveDnCNN(lipschitz=1.0)
    with pytest.raises(ValueError, match="init"):
        ContractiveDnCNN(depth=3, width=4, init="zeros")


def test_normalized_conv_circular_adjoint_and_sigma():
    layer = NormalizedConv2d(3, 5, 3, warmup_iterations=300).double()
    u = torch.randn(2, 3, 10, 12, dtype=F64)
    v = torch.randn(2, 5, 10, 12, dtype=F64)
    w = layer.conv.weight.detach()
    lhs = float((layer._circular(u, w) * v).sum())
    rhs = float((u * layer._circular(v, w, adjoint=True)).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    layer.calibrate((8, 8))
    assert layer.input_size == (8, 8) and layer.u.shape == (1, 3, 10, 10)
    exact = circular_conv_norm(w, (10, 10))
    sigma = float(layer.sigma().detach())
    assert sigma <= exact * (1 + 1e-12)
    assert sigma >= 0.99 * exact
    # the normalised layer (zero padding, any input of the calibrated size) has norm <= ratio
    layer.eval()
    est = estimate_lipschitz(layer, torch.randn(1, 3, 8, 8, dtype=F64), power_iterations=100)
    assert est <= layer.lipschitz_ratio() * (1 + 1e-9)
    assert est > 0.9


def test_normalized_conv_updates_only_when_training_with_grad():
    layer = NormalizedConv2d(2, 2, 3, warmup_iterations=1)
    x = torch.randn(1, 2, 8, 8)
    layer(x)  # first call sizes and warms up
    u0 = layer.u.clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.u, u0)  # a no-grad solve sees a fixed map
    layer.eval()
    layer(x)
    assert torch.equal(layer.u, u0)
    layer.train()
    out = layer(x)
    assert not torch.equal(layer.u, u0)
    out.sum().backward()
    assert layer.conv.weight.grad is not None and float(layer.conv.weight.grad.abs().sum()) > 0


def test_contractive_dncnn_state_dict_roundtrip():
    a = ContractiveDnCNN(channels=1, depth=3, width=4, input_size=(8, 8))
    b = ContractiveDnCNN(channels=1, depth=3, width=4)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    assert b.lipschitz_bound() == pytest.approx(a.lipschitz_bound(), rel=1e-9)


def test_contractive_dncnn_structure():
    D = ContractiveDnCNN(channels=2, depth=5, width=8)
    assert len(D.convs()) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    with pytest.raises(ValueError, match="run a forward pass"):
        D.lipschitz_bound()
    assert D(torch.randn(3, 2, 12, 12)).shape == (3, 2, 12, 12)
    assert D.convs()[0].input_size == (12, 12)


def test_no_grad_sigma_cache_follows_weight_updates() -> None:
    from implicitlayers.imaging import ContractiveDnCNN

    net = ContractiveDnCNN(channels=1, depth=3, width=4).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        first = net(x)
        assert torch.equal(net(x), first)  # cached: same value
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # an in-place update, as an optimiser step does
        updated = net(x)
    with torch.enable_grad():
        reference = net(x)  # eval mode: no power step, sigma recomputed
    torch.testing.assert_close(updated, reference.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(updated, first)


def _zero_last_conv(net):
    last = _convs(net)[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def test_dncnn_residual_flag_exact_values():
    x = torch.randn(2, 3, 10, 12, dtype=F64)
    plain = DnCNN(channels=3, depth=4, width=8, spectral_norm=False).double().eval()
    residual = DnCNN(channels=3, depth=4, width=8, spectral_norm=False, residual=True)
    residual = residual.double().eval()
    assert not plain.residual and residual.residual
    _zero_last_conv(plain)
    _zero_last_conv(residual)
    # N(x) = 0: the plain network gives zeros, the residual one the identity, both exactly
    assert torch.equal(plain(x), torch.zeros_like(x))
    assert torch.equal(residual(x), x)
    # a last layer that outputs the constant 0.25: D(x) = x - 0.25
    with torch.no_grad():
        _convs(residual)[-1].bias.fill_(0.25)
    assert torch.equal(residual(x), x - 0.25)


def test_dncnn_residual_shares_weights_and_state_dict_with_the_plain_network():
    plain = DnCNN(channels=1, depth=5, width=8).double()
    for _ in range(3):  # advance the spectral norms' power vectors and batch-norm statistics
        plain(torch.randn(4, 1, 12, 12, dtype=F64))
    denoiser = DnCNN(channels=1, depth=5, width=8, residual=True).double()
    assert denoiser.load_state_dict(plain.state_dict()) is not None
    assert list(denoiser.state_dict()) == list(plain.state_dict())
    plain.eval()
    denoiser.eval()
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    torch.testing.assert_close(denoiser(x), x - plain(x), rtol=0, atol=0)
    assert "residual=True" in repr(denoiser) and "residual" not in repr(plain).split("\n")[0]
    with pytest.raises(TypeError, match="residual must be a bool"):
        DnCNN(residual=1)
