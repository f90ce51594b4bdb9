"""The `perlwb` command, `python -m perl` and `run.py`: flags -> `TrainConfig` -> `train()`.

Usage:
    perlwb train --config my.yaml --config.peft.type dora --enable_tracking --tracking_frequency 10
    python run.py --enable_tracking --config.peft.r 16        # `train` is the default command
    perlwb eval ... | perlwb build-model ... | perlwb report RUN_DIR ... | perlwb sweep SWEEP.yaml

A training config is built in this order, later steps winning: the dataclass defaults, the
``--config`` YAML file, the convenience flags of the tracking docs (``--enable_tracking`` ...),
then the dotted ``--config.SECTION.FIELD VALUE`` flags. Everything a user can get wrong is
checked before training starts (`preflight`); a mistake ends the command with exit code 2 and
exactly one line on stderr, ``perlwb: error: ...``, and nothing is written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from perl.cli_support import PROG, OneLineParser, UsageError, fail
from perl.config import (
    SECTIONS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    field_type,
    load_config,
    unwrap_optional,
    validate,
)
from perl.preflight import check_output_dir, optional_module, preflight

__all__ = ["main", "build_parser", "config_from_args", "preflight", "check_output_dir", "COMMANDS", "UsageError"]

# command -> (module, what to call it in messages); each module's `main(argv) -> int` runs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("perl.evaluate", "evaluation"),
    "build-model": ("perl.build_model", "the embedded model recipe"),
    "report": ("perl.viz.report", "the HTML report"),
    "sweep": ("perl.sweep", "sweeps"),
}
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Train a PEFT adapter with GRPO on Countdown, with spectral and gradient tracking.

commands:
  perlwb train [flags]        train (the default: `perlwb --enable_tracking ...` and `python run.py ...`)
  perlwb eval ...             evaluate a trained run
  perlwb build-model ...      rebuild the embedded countdown-nano model
  perlwb report RUN_DIR ...   write an HTML report of a run
  perlwb sweep SWEEP.yaml     run a sweep over PEFT methods, ranks and seeds

`perlwb COMMAND --help` shows the flags of a command; the flags below are those of `train`."""

EPILOG = """\
Values are built in this order, later ones winning: defaults, --config FILE, the convenience
flags, the --config.SECTION.FIELD flags. Lists are comma separated (q_proj,v_proj) or YAML
([q_proj, v_proj]); mappings are YAML ({min_lr: 1e-6}); 'none' sets an optional field to None.
The resolved config is written to <output_dir>/config.yaml; --config of that file reproduces the run."""


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def _flag_help(section: str, f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(default, list):
        default = ",".join(map(str, default))
    choices = f.metadata.get("choices")
    extra = f" Choices: {', '.join(choices)}." if choices else ""
    return _escape(f"{text}{extra} (default: {default})")


def _metavar(tp: Any) -> str:
    inner, optional = unwrap_optional(tp)
    origin = getattr(inner, "__origin__", inner)
    name = {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR", list: "LIST", dict: "YAML"}.get(origin, "VALUE")
    return name + ("|none" if optional else "")


def build_parser() -> argparse.ArgumentParser:
    """The `perlwb train` parser: --config, the convenience flags, one flag per config field."""
    parser = OneLineParser(
        prog=PROG,
        usage=f"{PROG} [train] [--config PATH] [convenience flags] [--config.SECTION.FIELD VALUE ...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # note: a mistyped flag must be an error, never a silent prefix match
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (any subset of the sections).")
    conv = parser.add_argument_group("convenience flags (as in the tracking docs)")
    conv.add_argument("--enable_tracking", action="store_true", help="Enable both spectral and gradient tracking.")
    conv.add_argument("--enable_spectral_tracking", action="store_true", help="Enable only spectral tracking.")
    conv.add_argument("--enable_gradient_tracking", action="store_true", help="Enable only gradient tracking.")
    conv.add_argument(
        "--tracking_frequency",
        metavar="N",
        help="Log every N steps: sets spectral_log_frequency and gradient_log_frequency (default: 100).",
    )
    conv.add_argument("--tracking_output_dir", metavar="DIR", help="Custom output directory for tracking data.")
    conv.add_argument(
        "--enable_alignment_tracking", action="store_true", help="Enable alignment tracking of adapter subspaces."
    )
    conv.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow writing into an output directory that already holds a run.",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"config.{section}")
        for f in dataclasses.fields(cls):
            tp = field_type(cls, f.name)
            is_bool = unwrap_optional(tp)[0] is bool
            group.add_argument(
                f"--config.{section}.{f.name}",
                dest=f"config.{section}.{f.name}",
                metavar=_metavar(tp),
                # note: a bare boolean flag means true; `--config.tracker.x false` also works
                nargs="?" if is_bool else None,
                const="true" if is_bool else None,
                default=argparse.SUPPRESS,
                help=_flag_help(section, f),
            )
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def _unknown_argument(parser: argparse.ArgumentParser, extras: list[str]) -> UsageError:
    arg = extras[0]
    flag = arg.split("=", 1)[0]
    if flag.startswith("--config."):
        key = flag[len("--config.") :]
        try:
            apply_overrides(TrainConfig(), {key: None})  # raises the unknown-key error with a hint
        except ConfigError as e:
            return UsageError(str(e))
    if flag.startswith("-"):
        close = difflib.get_close_matches(flag, _option_strings(parser), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags."
        return UsageError(f"unknown flag {flag}{hint}")
    return UsageError(f"unexpected argument {arg!r}; every value follows a flag (see --help).")


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """Parse `perlwb train` arguments into a validated `TrainConfig` (no files are written).

    Raises:
        ConfigError, UsageError: any mistake, in one sentence.
        SystemExit: for --help (exit code 0).
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(list(argv))
    if extras:
        raise _unknown_argument(parser, extras)
    values = vars(args)
    cfg = load_config(values["config"]) if values.get("config") else config_from_dict(None)

    convenience: dict[str, Any] = {}
    if values["enable_tracking"]:
        convenience["tracker.enable_spectral_tracking"] = True
        convenience["tracker.enable_gradient_tracking"] = True
    if values["enable_spectral_tracking"]:
        convenience["tracker.enable_spectral_tracking"] = True
    if values["enable_gradient_tracking"]:
        convenience["tracker.enable_gradient_tracking"] = True
    if values["enable_alignment_tracking"]:
        convenience["tracker.enable_alignment_tracking"] = True
    if values["overwrite_output_dir"]:
        convenience["training.overwrite_output_dir"] = True
    if values["tracking_frequency"] is not None:
        text = values["tracking_frequency"]
        try:
            frequency = int(text)
        except ValueError:
            frequency = 0
        if frequency < 1:
            raise UsageError(f"--tracking_frequency expects a positive integer (steps), got {text!r}.")
        convenience["tracker.spectral_log_frequency"] = frequency
        convenience["tracker.gradient_log_frequency"] = frequency
    if values["tracking_output_dir"] is not None:
        if not values["tracking_output_dir"].strip():
            raise UsageError("--tracking_output_dir expects a folder, got an empty string.")
        convenience["tracker.tracking_output_dir"] = values["tracking_output_dir"]
    cfg = apply_overrides(cfg, convenience)

    dotted = {k[len("config.") :]: v for k, v in values.items() if k.startswith("config.")}
    cfg = apply_overrides(cfg, dotted)
    return validate(cfg)


# ---------------------------------------------------------------------------------------------
# Checks at the edge, before anything is written.

# ---------------------------------------------------------------------------------------------
# Commands.


def _not_available(command: str, module: str) -> int:
    return fail(f"'{PROG} {command}' is not available in this installation (module {module} is missing).")


def _train(argv: Sequence[str]) -> int:
    try:
        cfg = config_from_args(argv)
        preflight(cfg)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (ConfigError, UsageError) as e:
        return fail(str(e))
    train_module = optional_module("perl.train")
    if train_module is None:
        return _not_available("train", "perl.train")
    try:
        result = train_module.train(cfg)
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; partial results are in {cfg.training.output_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if os.environ.get("RANK", "0") in ("", "0"):
        _print_where(result, cfg)
    del result
    if _leave_process_group():
        _exit_without_teardown(0)
    return 0


def _leave_process_group() -> bool:
    """Under `accelerate launch` / torchrun: wait for every rank, then close the process group.

    Without it a rank that finishes first exits with gloo's threads still running and aborts
    ("terminate called without an active exception"), failing the whole launch after a good run.
    Returns True when there was a process group to leave.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def _exit_without_teardown(code: int) -> None:
    """End a distributed rank whose work is done and saved, skipping the interpreter's teardown.

    Even after the barrier and ``destroy_process_group``, a DeepSpeed ZeRO-3 rank on gloo aborted in
    the interpreter's final teardown ("terminate called without an active exception", SIGABRT, no
    Python frame left) in 2 of 10 launches with one other busy core, failing a launch whose results
    were all written. The exit handlers still run (they close loggers and experiment trackers), then
    the process leaves with ``code`` before the teardown.
    """
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _print_where(result: Any, cfg: TrainConfig) -> None:
    """Tell the user where the run, its tracking data and the explorer notebooks are, and what to run
    next: each command runs as printed from this folder in a fresh shell (no activated venv)."""
    from perl.runcard import RUN_CARD, display_path, next_commands

    out = Path(getattr(result, "output_dir", cfg.training.output_dir))
    tracking = Path(getattr(result, "tracking_dir", cfg.tracker.tracking_output_dir or out))
    card = f" ({display_path(out / RUN_CARD)} says what each file is)" if (out / RUN_CARD).is_file() else ""
    lines = [
        f"{PROG}: done after {getattr(result, 'global_step', '?')} steps; the run is in {display_path(out)}/{card}",
        f"  config and metrics:  {display_path(out / 'config.yaml')}, {display_path(out / 'metrics.jsonl')}",
    ]
    for label, name in (
        ("spectra", "spectral_history_final.nc"),
        ("gradient flow", "gradient_flow_final.nc"),
        ("alignment", "alignment_final.nc"),
    ):
        if (tracking / name).is_file():
            lines.append(f"  {label + ':':<20} {display_path(tracking / name)}")
    if (tracking / "gradient_logs").is_dir():
        lines.append(f"  {'heatmaps:':<20} {display_path(tracking / 'gradient_logs')}/gradient_heatmap_*.png")
    commands = next_commands(
        out,
        has_adapter=(out / "adapter_config.json").is_file(),
        has_tracking=any((tracking / n).is_file() for n in ("spectral_history_final.nc", "gradient_flow_final.nc")),
    )
    if commands:
        lines.append("next (each command runs as shown from this folder):")
        for command, what in commands:
            lines += [f"  {what}:", f"    {command}"]
    print("\n".join(lines))


def _delegate(command: str, argv: Sequence[str]) -> int:
    module_name, _ = COMMANDS[command]
    module = optional_module(module_name)
    run: Optional[Callable[..., Any]] = getattr(module, "main", None) if module else None
    if run is None:
        return _not_available(command, module_name)
    try:
        return int(run(list(argv)) or 0)
    except SystemExit as e:  # their argparse: --help or a usage error, already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else fail(str(e.code)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `perlwb`, `python -m perl` and `run.py`; returns the exit code.

    Args:
        argv (`Sequence[str]`, optional): arguments without the program name; defaults to sys.argv[1:].
    """
    # note: tokenizers' thread pool deadlocks when the Trainer forks data-loader workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        return _train(args)
    command, rest = args[0], args[1:]
    if command == "train":
        return _train(rest)
    if command in COMMANDS:
        return _delegate(command, rest)
    names = ["train", *COMMANDS]
    close = difflib.get_close_matches(command, names, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return fail(f"unknown command '{command}'; {hint}commands are {', '.join(names)}.")


if __name__ == "__main__":
    raise SystemExit(main())
