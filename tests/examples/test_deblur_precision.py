"""bf16 autocast for f (``--autocast``): it trains and scores, and checkpoints cross precisions."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba as flagship
import torch
from deblur import ddp, state
from deblur_tiny import TINY


def test_auto_is_bf16_exactly_where_the_hardware_has_it() -> None:
    cpu = torch.device("cpu")
    assert ddp.autocast("auto", cpu).fast_dtype == torch.bfloat16
    assert ddp.bf16("auto", cpu) is ddp.native_bf16(cpu)
    assert ddp.bf16("bf16", cpu) and not ddp.bf16("off", cpu)
    with ddp.autocast("bf16", cpu):  # what f sees: bf16 convolutions
        conv = torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))
    assert conv.dtype == torch.bfloat16


def test_bf16_trains_scores_and_its_checkpoint_loads_in_float32(
    trained_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bf16"
    assert flagship.main(["train", *TINY, "--autocast", "bf16", "--output-dir", str(out)]) == 0
    saved = state.load(out / "best.pt")
    weights = [v for v in saved["model"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 for v in weights)  # autocast casts, not stores
    bf16 = json.loads((out / "results.json").read_text())
    assert bf16["settings"]["autocast"] == "bf16"
    psnr = bf16["table"]["degrad"]["psnr_standard"]
    assert bf16["trained_steps"] == 2 and 10 < psnr < 60  # trained (2 steps), scored
    log = state.read_log(out / "log.jsonl")
    steps = [r for r in log if r["event"] == "train"]
    assert len(steps) == 2 and all(r["loss"] > 0 for r in steps)
    # The bf16-trained weights, scored in float32 (and a float32 checkpoint in bf16).
    for path, other, where in ((out, "off", "fp32"), (trained_run, "bf16", "bf16")):
        argv = ["evaluate", "--checkpoint", str(path / "best.pt"), "--autocast", other]
        argv += ["--output-dir", str(tmp_path / where), "--no-progress", "--quiet"]
        assert flagship.main(argv) == 0
    fp32 = json.loads((tmp_path / "fp32" / "results.json").read_text())
    crossed = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert (fp32["settings"]["autocast"], crossed["settings"]["autocast"]) == ("off", "bf16")
    for scored in (fp32, crossed):  # loaded and scored (tiny, unconverged: values not compared)
        assert 10 < scored["table"]["degrad"]["psnr_standard"] < 60
    assert fp32["table"]["degrad"]["psnr_standard"] != psnr  # bf16 rounding was really on
