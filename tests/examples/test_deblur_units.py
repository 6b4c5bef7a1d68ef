"""Unit tests of the example's helpers: measurements, checkpoints, configuration, data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deblur.checkpoint import load_checkpoint, save_atomic
from deblur.config import ConfigError, RunConfig, resolve_config
from deblur.data import builtin_splits
from deblur.measure import measure, noise_seed
from deblur.model import DeGrad


def test_noise_depends_on_the_image_not_the_batch() -> None:
    from implicitlayers.imaging import GaussianBlur

    blur = GaussianBlur(5, 5.0)
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    seeds = [noise_seed(0, "test", 0, i) for i in range(4)]
    whole = measure(blur, x, 0.01, seeds)
    halves = torch.cat(
        [measure(blur, x[:2], 0.01, seeds[:2]), measure(blur, x[2:], 0.01, seeds[2:])]
    )
    assert torch.equal(whole, halves)
    noise = whole - blur(x)
    assert 0.005 < float(noise.std()) < 0.015
    assert (
        noise_seed(0, "test", 0, 1) != noise_seed(0, "train", 0, 1) != noise_seed(1, "train", 0, 1)
    )


def test_builtin_train_and_test_come_from_different_photographs() -> None:
    config = resolve_config("demo", {"image_size": 16, "builtin_train_crops": 6})
    splits = builtin_splits(config)
    assert len(splits.train) == 6 and splits.train[0].shape == (3, 16, 16)
    assert "chelsea" in splits.description and "held-out" in splits.description
    again = builtin_splits(config)
    assert torch.equal(splits.test[3], again.test[3])  # deterministic given the seed
    assert float(splits.train[0].min()) >= -1 and float(splits.train[0].max()) <= 1


def test_checkpoint_round_trip_is_weights_only_safe(tmp_path: Path) -> None:
    config = resolve_config("demo", {"depth": 3, "width": 4})
    model = DeGrad(config)
    path = tmp_path / "ckpt.pt"
    state = {
        "format": "implicitlayers-deblur/1",
        "config": config.to_dict(),
        "model": model.state_dict(),
    }
    save_atomic(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert RunConfig.from_dict(loaded["config"]) == config
    save_atomic({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not a checkpoint of this example"):
        load_checkpoint(tmp_path / "other.pt")


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--solver must be one of anderson, picard, broyden"):
        resolve_config("demo", {"solver": "newton"})
    with pytest.raises(ConfigError, match="--budgets must be positive integers"):
        resolve_config("demo", {"budgets": [0, 5]})
    with pytest.raises(ConfigError, match="--preset must be one of"):
        resolve_config("huge", {})
    with pytest.raises(ConfigError, match="--test-offset must be an integer >= 0"):
        resolve_config("small", {"test_offset": -1})


def test_model_treats_samples_independently() -> None:
    """In eval mode the cell is per-sample, so a batch solves like each image alone."""
    config = resolve_config("demo", {"depth": 3, "width": 4})
    model = DeGrad(config).double().eval()  # float64: a random map amplifies rounding
    d = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        x, result = model(d, max_iter=12)
        alone = [model(d[i : i + 1], max_iter=12) for i in range(3)]
    assert x.shape == d.shape and result.n_steps.shape == (3,)
    assert float(x.abs().max()) <= 1.0
    for i, (x_i, result_i) in enumerate(alone):
        assert int(result_i.n_steps[0]) == int(result.n_steps[i])
        torch.testing.assert_close(x_i[0], x[i], atol=1e-9, rtol=1e-9)


def test_solver_tolerance_is_per_pixel_rms() -> None:
    from deblur.model import make_solver

    config = resolve_config("demo", {"atol": 1e-3, "rtol": 1e-4, "max_iter": 7})
    small, large = make_solver(config, values=100), make_solver(config, values=10_000)
    assert small.atol == pytest.approx(1e-2) and large.atol == pytest.approx(1e-1)
    assert (small.rtol, small.max_iter, make_solver(config, 3).max_iter) == (1e-4, 7, 3)


def test_a_training_step_sees_one_spectral_normed_weight_and_one_power_step() -> None:
    config = resolve_config(
        "demo", {"image_size": 16, "depth": 3, "width": 8, "spectral_norm": True, "max_iter": 8}
    )
    model = DeGrad(config)
    model.eval()
    conv = next(m for m in model.denoiser.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[torch.Tensor] = []
    hook = conv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    u_before = conv.parametrizations["weight"][0]._u.clone()
    model.prepare_deq_step()
    _, result = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    hook.remove()
    assert int(result.n_steps.max()) >= 3 and len(seen) >= 3
    assert all(torch.equal(w, seen[0]) for w in seen)  # one map for the whole solve
    # exactly one power step: the one that one_map took when it computed the weight
    u_after = conv.parametrizations["weight"][0]._u
    assert not torch.equal(u_before, u_after)
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert torch.equal(conv.parametrizations["weight"][0]._u, u_after)  # eval: no step
