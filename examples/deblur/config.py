"""Run configuration: presets, validation, and a plain-dict form for checkpoints.

A run is described by one :class:`RunConfig`. It is stored in every checkpoint as a plain
``dict`` (strings, numbers, booleans, lists, ``None``), so checkpoints load with
``torch.load(..., weights_only=True)`` and a checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKWARDS",
    "CELLS",
    "CONTRACTIVE_DEFAULT_STEP",
    "CONTRACTIVE_MAX_STEP",
    "PRESETS",
    "SOLVERS",
    "ConfigError",
    "RunConfig",
    "resolve_config",
]

SOLVERS = ("anderson", "picard", "broyden")
BACKWARDS = ("jfb", "neumann", "implicit")
SPLITS = ("auto", "official", "seed")
INITS = ("adjoint", "cg")
DEVICES = ("auto", "cpu", "cuda")
CELLS = ("standard", "contractive")
#: The contractive cell is a proven contraction only for step sizes below 2/3.
CONTRACTIVE_MAX_STEP = 2.0 / 3.0
#: The step the contractive cell starts from when the preset's is too large for it and
#: ``--step-size`` was not given.
CONTRACTIVE_DEFAULT_STEP = 0.5


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and the fix."""


@dataclass
class RunConfig:
    """Everything that defines a training run (and, through it, a checkpoint's model).

    Attributes are grouped as data, measurement model, network, solver, training and
    evaluation settings; each maps to the command-line flag of the same name with dashes
    (``image_size`` is ``--image-size``).
    """

    # Data.
    preset: str = "demo"
    data_dir: str | None = None
    split: str = "auto"
    split_seed: int = 0
    limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    test_offset: int = 0
    val_size: int = 500
    image_size: int = 32
    builtin_train_crops: int = 2048
    builtin_val_crops: int = 64
    builtin_test_crops: int = 96
    builtin_scale: float = 0.5
    # Measurement model: 5x5 Gaussian blur with standard deviation 5, noise std 0.01.
    kernel_size: int = 5
    blur_std: float = 5.0
    noise_std: float = 0.01
    # Network: R = I - D with D a DnCNN denoiser ("standard": residual DnCNN; "contractive":
    # ContractiveDnCNN with Lip(D) <= lipschitz, so Lip(T) <= 1 - eta (1 - Lip(D)) < 1).
    cell: str = "standard"
    lipschitz: float = 0.9
    depth: int = 6
    width: int = 32
    batch_norm: bool = False
    spectral_norm: bool = False
    step_size: float = 0.8
    init: str = "cg"
    # Fixed-point solver and backward rule.
    solver: str = "anderson"
    max_iter: int = 50
    rtol: float = 1e-3
    atol: float = 5e-4
    history_size: int = 5
    eval_max_iter: int = 100
    backward: str = "jfb"
    neumann_terms: int = 5
    implicit_max_iter: int = 30
    # Training.
    seed: int = 0
    batch_size: int = 8
    epochs: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    pretrain_steps: int = 1500
    pretrain_lr: float = 2e-3
    pretrain_sigma_max: float = 0.1
    max_steps: int | None = None
    checkpoint_every: int = 100
    workers: int = 0
    device: str = "auto"
    # Evaluation.
    eval_batch_size: int = 32
    budgets: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    figure_samples: int = 6
    cg_steps: int = 60
    cg_lambda: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy (safe for ``torch.save`` and ``weights_only`` loading)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Rebuild a config, ignoring keys this version does not know (older checkpoints)."""
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.validate()
        return config

    @property
    def uses_builtin_data(self) -> bool:
        """Whether the run trains on the built-in scikit-image photographs."""
        return self.data_dir is None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag and the fix for any invalid value."""
        _choice("--solver", self.solver, SOLVERS)
        _choice("--backward", self.backward, BACKWARDS)
        _choice("--split", self.split, SPLITS)
        _choice("--init", self.init, INITS)
        _choice("--device", self.device, DEVICES)
        _choice("--preset", self.preset, tuple(PRESETS))
        _choice("--cell", self.cell, CELLS)
        for flag, value, low in (
            ("--image-size", self.image_size, 8),
            ("--kernel-size", self.kernel_size, 1),
            ("--depth", self.depth, 2),
            ("--width", self.width, 1),
            ("--max-iter", self.max_iter, 1),
            ("--eval-max-iter", self.eval_max_iter, 1),
            ("--history-size", self.history_size, 1),
            ("--neumann-terms", self.neumann_terms, 0),
            ("--implicit-max-iter", self.implicit_max_iter, 1),
            ("--batch-size", self.batch_size, 1),
            ("--epochs", self.epochs, 0),
            ("--pretrain-steps", self.pretrain_steps, 0),
            ("--checkpoint-every", self.checkpoint_every, 1),
            ("--workers", self.workers, 0),
            ("--eval-batch-size", self.eval_batch_size, 1),
            ("--figure-samples", self.figure_samples, 1),
            ("--cg-steps", self.cg_steps, 1),
            ("--val-size", self.val_size, 1),
            ("--builtin-train-crops", self.builtin_train_crops, 1),
            ("--builtin-val-crops", self.builtin_val_crops, 1),
            ("--builtin-test-crops", self.builtin_test_crops, 1),
            ("--test-offset", self.test_offset, 0),
        ):
            _int_at_least(flag, value, low)
        if self.kernel_size % 2 == 0:
            raise ConfigError(
                f"--kernel-size must be odd so the blur is centred, got {self.kernel_size}; "
                "use e.g. --kernel-size 5"
            )
        for flag, optional in (
            ("--limit", self.limit),
            ("--val-limit", self.val_limit),
            ("--test-limit", self.test_limit),
            ("--max-steps", self.max_steps),
        ):
            if optional is not None:
                _int_at_least(flag, optional, 1)
        for flag, value, low_open in (
            ("--blur-std", self.blur_std, True),
            ("--noise-std", self.noise_std, False),
            ("--step-size", self.step_size, True),
            ("--rtol", self.rtol, False),
            ("--atol", self.atol, False),
            ("--lr", self.lr, True),
            ("--pretrain-lr", self.pretrain_lr, True),
            ("--pretrain-sigma-max", self.pretrain_sigma_max, True),
            ("--grad-clip", self.grad_clip, False),
            ("--cg-lambda", self.cg_lambda, False),
            ("--builtin-scale", self.builtin_scale, True),
            ("--min-lr-ratio", self.min_lr_ratio, False),
        ):
            _positive(flag, value, low_open)
        if self.rtol == 0 and self.atol == 0:
            raise ConfigError(
                "--rtol and --atol are both 0, so no iterate can ever converge; "
                "set e.g. --rtol 1e-3"
            )
        if self.min_lr_ratio > 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.builtin_scale > 1:
            raise ConfigError(
                f"--builtin-scale must be in (0, 1] (it downscales the photographs), "
                f"got {self.builtin_scale}"
            )
        if not (
            isinstance(self.lipschitz, int | float)
            and not isinstance(self.lipschitz, bool)
            and 0 < self.lipschitz < 1
        ):
            raise ConfigError(
                f"--lipschitz must be in (0, 1) (the contractive denoiser's Lipschitz scale), "
                f"got {self.lipschitz!r}; use e.g. --lipschitz 0.9"
            )
        if self.cell == "contractive":
            self._validate_contractive()
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ConfigError(
                f"--budgets must be positive integers, e.g. --budgets 1 2 5 10, got {self.budgets}"
            )

    def _validate_contractive(self) -> None:
        if self.step_size >= CONTRACTIVE_MAX_STEP:
            raise ConfigError(
                f"--step-size must be below 2/3 with --cell contractive, got {self.step_size!r}; "
                f"use e.g. --step-size {CONTRACTIVE_DEFAULT_STEP:g} (or leave --step-size out: "
                f"the contractive cell then starts from {CONTRACTIVE_DEFAULT_STEP:g})"
            )
        for flag, value in (
            ("--batch-norm", self.batch_norm),
            ("--spectral-norm", self.spectral_norm),
        ):
            if value:
                raise ConfigError(
                    f"{flag} does not apply to --cell contractive (its ContractiveDnCNN has no "
                    "batch norm and normalises every convolution by its exact operator norm); "
                    f"drop {flag}"
                )


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{flag} must be one of {', '.join(valid)}; got {value!r}")


def _int_at_least(flag: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")


def _positive(flag: str, value: Any, low_open: bool) -> None:
    bad = not isinstance(value, int | float) or not math.isfinite(value) or value < 0
    if bad or (low_open and value == 0):
        bound = "> 0" if low_open else ">= 0"
        raise ConfigError(f"{flag} must be a finite number {bound}, got {value!r}")


#: Named starting points; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Built-in photographs, small plain DnCNN (no batch norm or spectral norm, which slow
    # learning in a few-minute budget): the no-argument demo (minutes on a laptop CPU).
    "demo": {},
    # CelebA at a CPU-feasible size.
    "small": {
        "image_size": 64,
        "depth": 8,
        "width": 48,
        "step_size": 1.0,
        "batch_size": 8,
        "epochs": 4,
        "lr": 1e-3,
        "pretrain_steps": 1000,
        "limit": 3000,
        "val_size": 200,
        "val_limit": 128,
        "test_limit": 256,
        "eval_batch_size": 32,
    },
    # The paper's protocol: 128x128, DnCNN 17x64 with batch norm and spectral norm, Anderson.
    "paper": {
        "split": "seed",
        "image_size": 128,
        "depth": 17,
        "width": 64,
        "batch_norm": True,
        "spectral_norm": True,
        "step_size": 0.5,
        "batch_size": 16,
        "epochs": 20,
        "lr": 1e-4,
        "min_lr_ratio": 0.1,
        "pretrain_steps": 2000,
        "pretrain_lr": 1e-3,
        "max_iter": 50,
        "eval_max_iter": 100,
        "val_size": 500,
        "eval_batch_size": 32,
        "checkpoint_every": 500,
    },
}


def resolve_config(preset: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Combine a preset with explicit overrides and validate the result.

    Args:
        preset: A name in :data:`PRESETS`, or ``None`` to pick ``"demo"`` without a data
            folder and ``"small"`` with one.
        overrides: Explicitly given settings (keys are :class:`RunConfig` field names).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: For an unknown preset or any invalid value.
    """
    if preset is None:
        preset = "small" if overrides.get("data_dir") else "demo"
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    values: dict[str, Any] = {**PRESETS[preset], **overrides, "preset": preset}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}")
    if values.get("cell", RunConfig.cell) == "contractive":
        _contractive_preset(values, overrides)
    elif overrides.get("lipschitz", RunConfig.lipschitz) != RunConfig.lipschitz:
        raise ConfigError(
            "--lipschitz applies only to --cell contractive (the standard DnCNN has no "
            "Lipschitz bound); add --cell contractive or drop --lipschitz"
        )
    config = RunConfig(**values)
    config.validate()
    return config


def _contractive_preset(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Adapt preset values, never explicit flags, to ``--cell contractive``.

    A preset's step size of 2/3 or more (``demo`` 0.8, ``small`` 1.0) becomes
    :data:`CONTRACTIVE_DEFAULT_STEP`, and a preset's batch norm and spectral norm
    (``paper``) are turned off: the contractive DnCNN has neither. Explicit
    ``--step-size``, ``--batch-norm`` or ``--spectral-norm`` values are kept, so that
    :meth:`RunConfig.validate` rejects invalid ones with a message naming the flag.
    """
    step = values.get("step_size", RunConfig.step_size)
    if "step_size" not in overrides and step >= CONTRACTIVE_MAX_STEP:
        values["step_size"] = CONTRACTIVE_DEFAULT_STEP
    for key in ("batch_norm", "spectral_norm"):
        if key not in overrides:
            values[key] = False
