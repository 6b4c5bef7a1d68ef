"""``--cell contractive``: the provably contractive DE-GRAD cell in the flagship."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba as flagship
import numpy as np
import pytest
import torch
from deblur_tiny import TINY
from PIL import Image

from implicitlayers.imaging import ContractiveDnCNN

#: Learning rates small enough that one power step per optimiser step keeps the layers' norm
#: estimates tight.
RUN = [*TINY, "--cell", "contractive", "--lr", "1e-4", "--pretrain-lr", "1e-4"]


@pytest.fixture(scope="module")
def contractive_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contractive")
    assert flagship.main(["train", *RUN, "--output-dir", str(out)]) == 0
    return out


def test_train_and_evaluate_report_a_certified_bound_below_one(contractive_run: Path) -> None:
    checkpoint = torch.load(contractive_run / "best.pt", weights_only=True)
    settings = checkpoint["settings"]
    assert (settings["cell"], settings["step_size"], settings["batch_norm"]) == (
        "contractive",
        0.5,
        False,
    )
    assert 0 < checkpoint["metrics"]["lipschitz_bound"] < 1  # recorded at validation
    report = json.loads((contractive_run / "results.json").read_text())
    assert 0 < report["lipschitz_bound"] < 1
    model = flagship.load_model(contractive_run / "best.pt", {})[2]
    assert isinstance(flagship.cell_of(model).regularizer, ContractiveDnCNN)
    eta = flagship.cell_of(model).step_size.item()
    lip_d = flagship.cell_of(model).regularizer.lipschitz_bound()
    flagship.fit_norms(model, (16, 16), training=False)
    lam = settings["anchor"]  # the anchor's weight (the flagship's default, 0.1) adds contraction
    linear = max(abs(1 - eta * (2 + lam)), abs(1 - eta * (1 + lam)))
    assert lam == 0.1 and linear == pytest.approx(1 - eta * (1 + lam))
    assert flagship.cell_of(model).lipschitz_bound() == pytest.approx(
        linear + eta * lip_d, rel=1e-6
    )
    assert (
        f"certified Lip(T) <= **{report['lipschitz_bound']:.4f}**"
        in (contractive_run / "results.md").read_text()
    )


def test_resume_keeps_the_cell(
    contractive_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *RUN, "--no-evaluate", "--output-dir", str(tmp_path)]
    assert flagship.main([*argv, "--max-steps", "1"]) == 0
    plain = [a for a in argv if a not in ("--cell", "contractive")]
    assert flagship.main([*plain, "--cell", "standard", "--resume"]) == 2
    assert "--cell 'standard' differs from the checkpoint" in capsys.readouterr().err
    assert flagship.main([*argv, "--resume"]) == 0
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    reference = torch.load(contractive_run / "last.pt", weights_only=True)
    assert resumed["progress"]["global_step"] == 2
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_restore_calibrates_for_another_image_size(contractive_run: Path, tmp_path: Path) -> None:
    sharp = tmp_path / "sharp.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (23, 29, 3)).astype(np.uint8)).save(
        sharp
    )
    argv = ["restore", "--checkpoint", str(contractive_run / "best.pt"), "--input", str(sharp)]
    for name in ("a.png", "b.png"):
        assert flagship.main([*argv, "--output", str(tmp_path / name), "--simulate"]) == 0
    # Exact calibration is deterministic: restoring twice gives the same image.
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (29, 23) and np.array_equal(np.asarray(a), np.asarray(b))


def test_training_restores_exact_norms_every_twentieth_step(
    contractive_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Power steps alone let the estimates lag behind the optimiser (the certified bound of a
    # 128x128 run drifted from 0.95 to 5.5 in 350 steps): every 20th step is exact.
    model = flagship.load_model(contractive_run / "best.pt", {})[2]
    D = flagship.cell_of(model).regularizer
    flagship.fit_norms(model, (16, 16), training=True, step=1)  # the size is calibrated
    exact: list[int] = []
    monkeypatch.setattr(D, "calibrate_exact", lambda size: exact.append(size))
    for step in range(1, 42):
        flagship.fit_norms(model, (16, 16), training=True, step=step)
    assert exact == [(16, 16)] * 2  # steps 20 and 40
    flagship.fit_norms(model, (8, 8), training=True, step=41)  # a new size: exact at once
    assert exact[-1] == (8, 8)
