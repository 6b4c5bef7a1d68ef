"""``--cell contractive``: the provably contractive DE-GRAD cell in the deblurring example."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba
import numpy as np
import pytest
import torch
from deblur.checkpoint import load_model, save_atomic
from deblur.config import ConfigError, resolve_config
from deblur.model import DeGrad
from deblur_tiny import TINY
from PIL import Image

from implicitlayers.imaging import ContractiveDnCNN, DnCNN

#: Two pretraining and two DEQ steps with learning rates small enough that one power step
#: per optimiser step keeps the layers' norm estimates tight (see the report of this change:
#: larger ones let the estimates lag and the certified bound exceed 1).
RUN = [*TINY, "--cell", "contractive", "--lr", "1e-4", "--pretrain-lr", "1e-4"]


@pytest.fixture(scope="module")
def contractive_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contractive")
    assert deblur_celeba.main(["train", *RUN, "--output-dir", str(out)]) == 0
    return out


def test_train_and_evaluate_report_a_certified_bound_below_one(contractive_run: Path) -> None:
    checkpoint = torch.load(contractive_run / "best.pt", weights_only=True)
    assert checkpoint["config"]["cell"] == "contractive"
    assert checkpoint["config"]["step_size"] == 0.5  # the demo's 0.8 is too large for it
    assert 0 < checkpoint["metrics"]["lipschitz_bound"] < 1  # recorded at validation
    report = json.loads((contractive_run / "results.json").read_text())
    assert report["cell"] == "contractive" and report["trained_steps"] == 2
    assert 0 < report["lipschitz_bound"] < 1
    assert (
        report["lipschitz_bound"]
        < 1 - report["step_size"] * (1 - report["denoiser_lipschitz_bound"]) + 1e-6
    )
    assert report["lipschitz_size"] == [16, 16]
    # The power-iteration estimate is a lower bound of the certified constant.
    assert 0 < report["lipschitz_estimate"] <= report["lipschitz_bound"] + 1e-4
    assert "certified Lip(T) <=" in (contractive_run / "results.md").read_text()


def test_evaluate_rebuilds_the_contractive_cell(contractive_run: Path, tmp_path: Path) -> None:
    model, config, _ = load_model(contractive_run / "best.pt")
    assert config.cell == "contractive"
    assert isinstance(model.denoiser, ContractiveDnCNN)
    assert model.cell.max_step_size == pytest.approx(2 / 3)
    argv = ["evaluate", "--checkpoint", str(contractive_run / "best.pt")]
    argv += ["--output-dir", str(tmp_path), "--budgets", "1", "2", "--no-progress", "--quiet"]
    argv += ["--figure-samples", "2"]
    assert deblur_celeba.main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((contractive_run / "results.json").read_text())
    assert again["table"] == first["table"]
    assert again["lipschitz_bound"] == pytest.approx(first["lipschitz_bound"], rel=1e-9)


def test_resume_rebuilds_the_contractive_cell(
    contractive_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *RUN, "--no-evaluate", "--output-dir", str(tmp_path)]
    assert deblur_celeba.main([*argv, "--max-steps", "1"]) == 0
    # The cell comes from the checkpoint: --resume alone (no --cell) continues it ...
    plain = [a for a in argv if a not in ("--cell", "contractive")]
    assert deblur_celeba.main([*plain, "--cell", "standard", "--resume"]) == 2
    assert "--cell 'standard' differs from the checkpoint" in capsys.readouterr().err
    assert deblur_celeba.main([*plain, "--resume"]) == 0
    # ... and ends exactly where the uninterrupted run did.
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    reference = torch.load(contractive_run / "last.pt", weights_only=True)
    assert resumed["config"]["cell"] == "contractive"
    assert resumed["progress"]["global_step"] == 2
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_old_checkpoints_without_the_field_load_as_standard(
    trained_run: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    for key in ("cell", "lipschitz"):
        checkpoint["config"].pop(key, None)
    save_atomic(checkpoint, tmp_path / "old.pt")
    model, config, _ = load_model(tmp_path / "old.pt")
    assert config.cell == "standard"
    assert isinstance(model.denoiser.net, DnCNN)
    assert model.lipschitz_report()["lipschitz_bound"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--step-size", "1.0"],
            "--step-size must be below 2/3 with --cell contractive, got 1.0; "
            "use e.g. --step-size 0.5",
        ),
        (["--batch-norm"], "--batch-norm does not apply to --cell contractive"),
        (["--spectral-norm"], "--spectral-norm does not apply to --cell contractive"),
        (["--lipschitz", "1.0"], "--lipschitz must be in (0, 1)"),
    ],
)
def test_contractive_settings_are_validated(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    full = ["train", *TINY, "--cell", "contractive", *argv, "--output-dir", str(tmp_path)]
    assert deblur_celeba.main(full) == 2
    assert message in capsys.readouterr().err


def test_preset_values_adapt_to_the_contractive_cell() -> None:
    small = resolve_config("small", {"data_dir": "x", "cell": "contractive"})
    assert small.step_size == 0.5  # the preset's 1.0 is not a contraction
    paper = resolve_config("paper", {"data_dir": "x", "cell": "contractive"})
    assert (paper.step_size, paper.batch_norm, paper.spectral_norm) == (0.5, False, False)
    assert resolve_config("small", {"data_dir": "x", "step_size": 1.0}).step_size == 1.0
    explicit = resolve_config(None, {"cell": "contractive", "step_size": 0.3})
    assert explicit.step_size == 0.3
    with pytest.raises(ConfigError, match="--lipschitz applies only to --cell contractive"):
        resolve_config(None, {"lipschitz": 0.8})
    assert resolve_config(None, {"lipschitz": 0.9}).cell == "standard"  # a full config dict


def _write_png(path: Path, height: int, width: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(image).save(path)


def test_restore_calibrates_for_another_image_size(contractive_run: Path, tmp_path: Path) -> None:
    from deblur.restore import restore_file

    sharp = tmp_path / "sharp.png"
    _write_png(sharp, 23, 29)  # trained on 16x16
    first = restore_file(contractive_run / "best.pt", sharp, tmp_path / "a.png", simulate=True)
    restore_file(contractive_run / "best.pt", sharp, tmp_path / "b.png", simulate=True)
    assert first["size"] == [23, 29] and first["cell"] == "contractive"
    assert isinstance(first["lipschitz_bound"], float)  # certified at 23x29 now
    assert np.isfinite(first["degrad"]["psnr_standard"])
    # Calibration is seeded: restoring twice gives the same image.
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (29, 23)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_model_calibrate_is_a_no_op_for_the_standard_cell() -> None:
    # Spectral norm: its power-iteration vectors are buffers, so a calibration that ran
    # anything on the standard cell (a power step, a re-normalisation) would change the state.
    overrides = {"image_size": 16, "depth": 3, "width": 8, "spectral_norm": True}
    model = DeGrad(resolve_config(None, overrides))
    before = _state(model)
    model.calibrate((20, 20))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert model.lipschitz_report()["lipschitz_size"] is None
    # The contractive cell, by contrast, is re-sized to the new images (and only once).
    contractive = DeGrad(
        resolve_config(None, {**overrides, "spectral_norm": False, "cell": "contractive"})
    )
    assert contractive.lipschitz_report()["lipschitz_size"] == [16, 16]
    contractive.calibrate((20, 20))
    assert contractive.lipschitz_report()["lipschitz_size"] == [20, 20]
    assert {conv.input_size for conv in contractive.denoiser.convs()} == {(20, 20)}
    calibrated = _state(contractive)
    contractive.calibrate((20, 20))  # already at this size: nothing changes
    for key, value in calibrated.items():
        assert torch.equal(contractive.state_dict()[key], value), key
