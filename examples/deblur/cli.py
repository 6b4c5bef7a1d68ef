"""The command line, generated from frozen dataclasses: each setting is declared once.

A field declared with :func:`arg` carries its help (and ``choices``, or ``presets=True`` for the
presets' names, a lower bound ``low``, ``negatable``, ``required``); :func:`parse` makes it a flag
(``image_size`` is ``--image-size``) typed by its annotation: ``int``, ``float``, ``str``,
``X | None``, ``tuple[X, ...]`` (``nargs="+"``), ``bool`` (a switch, or ``--x/--no-x``). Flags
default to ``argparse.SUPPRESS``, so only what was typed comes back: presets fill the rest, and
``--resume`` tells an explicit flag from a default. Not tyro or jsonargparse: these lines add no
dependency, keep ``--help`` fast, and leave validation to the dataclass and the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is invalid; the message names the flag, the value and the fix."""


class Command(NamedTuple):
    """A command: ``run(options, settings typed) -> exit code``, its help, the option fields it
    takes, and the setting fields it may change (``None``: all)."""

    run: Callable[[Any, dict[str, Any]], int]
    help: str
    options: tuple[str, ...]
    settings: tuple[str, ...] | None = None


Commands = Mapping[str, Command]  # name -> command; the first is the default
Presets = Mapping[str, dict[str, Any]]  # name -> the settings it overrides
Doc = str | None  # the program's docstring: its first paragraph describes it in --help


def arg(default: T, help: str, **meta: Any) -> T:
    """A dataclass field with its help text and flag metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class Options:
    """What one invocation of the flagship asks for, beyond the run's settings (not stored in
    checkpoints); each command takes the fields that its tuple below names."""

    output_dir: str = arg("runs/deblur-demo", "where logs, checkpoints, results and figures go")
    preset: str | None = arg(None, "demo, or small with --data-dir", presets=True)
    resume: bool = arg(False, "continue the run in --output-dir from its last.pt")
    init: str | None = arg(None, "skip pretraining: start from this checkpoint's weights")
    max_steps: int | None = arg(None, "stop (resumably) after this many DEQ steps in all")
    no_evaluate: bool = arg(False, "skip the test-set evaluation after training")
    no_progress: bool = arg(False, "hide progress bars")
    quiet: bool = arg(False, "print only warnings and errors")
    checkpoint: str = arg("runs/deblur-demo/best.pt", "a checkpoint written by train")
    input: str = arg("", "image to deblur, any size", required=True)
    output: str = arg("", "where to write the restored image (.png)", required=True)
    simulate: bool = arg(False, "treat --input as sharp: measure it first, then report PSNR")


#: The options each command takes.
TRAIN: tuple[str, ...] = ("output_dir", "preset", "resume", "init", "max_steps", "no_evaluate")
TRAIN += ("no_progress", "quiet")
EVALUATE = ("checkpoint", "output_dir", "no_progress", "quiet")
RESTORE = ("checkpoint", "input", "output", "simulate")
#: The flagship's settings a checkpoint's user may change: at evaluation, on resume, to restore.
SHOWN: tuple[str, ...] = ("device", "autocast", "test_limit", "test_offset", "budgets")
SHOWN += ("eval_batch_size", "figure_samples", "radius_images")
EVALUATED = ("data_dir", "eval_max_iter", "rtol", "atol", "tight_rtol", *SHOWN)
RESUMABLE = ("checkpoint_every", "workers", *SHOWN)
RESTORED = ("eval_max_iter", "device", "autocast")


def check(settings: Any) -> None:
    """Check every field of a dataclass instance against its ``choices`` and ``low``."""
    for f in dataclasses.fields(settings):
        value, meta, flag = getattr(settings, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if value not in meta.get("choices", (value,)):
            raise SettingsError(f"{flag} must be one of {meta['choices']}, got {value!r}")
        values = value if isinstance(value, tuple) else (value,)
        if "low" in meta and any(v is not None and v < meta["low"] for v in values):
            raise SettingsError(f"{flag} must be >= {meta['low']}, got {value!r}")


def add_arguments(parser: Any, cls: type, only: tuple[str, ...] | None, presets: Presets) -> None:
    """One flag per field of dataclass ``cls`` named in ``only`` (all: ``None``); the help
    shows the default and each preset's value."""
    hints = typing.get_type_hints(cls)
    for f in [f for f in dataclasses.fields(cls) if only is None or f.name in only]:
        kind, meta = hints[f.name], f.metadata
        if type(kind) is types.UnionType:  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        values = {"default": f.default} | {n: p[f.name] for n, p in presets.items() if f.name in p}
        text = {n: " ".join(map(str, v)) if isinstance(v, tuple) else v for n, v in values.items()}
        shown = [f"{n}: {v}" for n, v in text.items()]  # a tuple as it is typed: 1 2 5
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "required": meta.get("required")}
        options["help"] = meta["help"] + ("" if meta.get("required") else f" ({'; '.join(shown)})")
        if kind is bool:
            negatable = meta.get("negatable")
            options["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        elif typing.get_origin(kind) is tuple:
            options.update(nargs="+", type=typing.get_args(kind)[0], choices=meta.get("choices"))
        else:
            choices = tuple(presets) if meta.get("presets") else meta.get("choices")
            options.update(type=kind, choices=choices)
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def parse(
    argv: list[str], commands: Commands, options: type, settings: type, presets: Presets, doc: Doc
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The command (the first when none is named), its options and the settings typed."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    for name, command in commands.items():
        group = sub.add_parser(name, help=command.help, description=command.help)
        add_arguments(group, options, command.options, presets)
        add_arguments(group.add_argument_group("settings"), settings, command.settings, presets)
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv = [next(iter(commands)), *argv]
    typed = vars(parser.parse_args(argv))
    command = typed.pop("command")
    typed = {k: tuple(v) if isinstance(v, list) else v for k, v in typed.items()}
    own = {f.name for f in dataclasses.fields(options)}
    chosen = {k: v for k, v in typed.items() if k in own}
    return command, chosen, {k: v for k, v in typed.items() if k not in own}


def main(
    argv: list[str], commands: Commands, options: type, settings: type, presets: Presets, doc: Doc
) -> int:
    """Parse ``argv``, log to the console through tqdm, run the command; a
    :class:`SettingsError` becomes a message naming the flag and exit code 2."""
    name, typed, overrides = parse(argv, commands, options, settings, presets, doc)
    opts, logger = options(**typed), logging.getLogger("deblur")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.propagate = False
    logger.setLevel(logging.WARNING if getattr(opts, "quiet", False) else logging.INFO)
    try:
        with logging_redirect_tqdm([logger]):
            return commands[name].run(opts, overrides)
    except SettingsError as err:
        print(f"{Path(sys.argv[0]).name} {name}: error: {err}", file=sys.stderr)
        return 2
