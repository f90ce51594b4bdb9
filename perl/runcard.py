"""What a finished run says about itself: the run card (``<output_dir>/README.md``) and the
commands printed at the end of training, each runnable as printed from a fresh shell.

peft's ``save_pretrained`` leaves an empty model-card template with the base model's absolute
path in ``README.md``; the run card replaces it with what a researcher opening the folder wants:
the method, model, rank, steps, the reward first -> last, and each file with how to open it.

Usage:
    from perl.runcard import shell_command, write_run_card
    write_run_card("runs/demo", config, log_history)     # -> runs/demo/README.md
    shell_command("perlwb")                              # '.venv/bin/perlwb' from the project folder
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from perl.fileio import atomic_write_text

__all__ = ["shell_command", "display_path", "write_run_card", "next_commands", "REWARD_KEY", "CORRECT_KEY", "RUN_CARD"]

RUN_CARD = "README.md"
REWARD_KEY = "reward"
CORRECT_KEY = "rewards/equation_reward/mean"
FORMAT_KEY = "rewards/format_reward/mean"
# note: the means over this many logged steps at the start and at the end say more than two single,
# noisy steps (8 prompts per step)
WINDOW = 20
# Python modules that stand in for a console script this environment does not have
_MODULE_OF = {"perlwb": "perl", "papermill": "papermill", "jupyter": "jupyter"}


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the current folder when it is inside it, else absolute; shell-quoted."""
    p = Path(path).expanduser()
    absolute = p if p.is_absolute() else Path.cwd() / p
    try:
        text = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        text = str(absolute)
    return shlex.quote(text)


def shell_command(tool: str) -> str:
    """How to call ``tool`` (a console script of this Python environment) from the current folder in
    a fresh shell, where no virtual environment is activated.

    The script beside ``sys.executable`` by its path (``.venv/bin/perlwb`` inside the project
    folder, absolute elsewhere); bare ``tool`` only when that folder is on the default PATH; and
    ``<python> -m <module>`` when the environment has no such script.

    Usage:
        >>> shell_command("perlwb")      # doctest: +SKIP
        '.venv/bin/perlwb'
    """
    bin_dir = Path(sys.executable).parent  # note: not resolved, a venv's python is a symlink
    script = bin_dir / tool
    if script.is_file() and os.access(script, os.X_OK):
        if str(bin_dir) in {"/usr/bin", "/bin", "/usr/local/bin"}:
            return tool
        return display_path(script)
    return f"{display_path(sys.executable)} -m {_MODULE_OF.get(tool, tool)}"


def notebooks_dir() -> Path | None:
    """The project's ``notebooks/`` folder (beside the package in a source checkout), if there is one."""
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    return folder if folder.is_dir() else None


def next_commands(
    output_dir: str | os.PathLike, has_adapter: bool = True, has_tracking: bool = True
) -> list[tuple[str, str]]:
    """``[(command, what it does)]`` to look at a finished run, each runnable as printed from the
    current folder in a fresh shell."""
    run = display_path(output_dir)
    perlwb = shell_command("perlwb")
    commands = []
    if has_tracking:
        commands.append((f"{perlwb} report {run}", "one self-contained HTML page with sliders"))
    if has_adapter:
        commands.append((f"{perlwb} eval {run} --n 200", "format and correct-equation rates, base + adapter"))
    nb = notebooks_dir()
    if nb is not None and has_tracking:
        explorer = nb / "02_spectral_explorer.ipynb"
        out = Path(output_dir) / explorer.name
        commands.append(
            (
                f"{shell_command('papermill')} {display_path(explorer)} {display_path(out)} -p run_dir {run}",
                "the spectral explorer, executed on this run",
            )
        )
        commands.append(
            (
                f"{shell_command('jupyter')} lab {display_path(nb)}",
                f"JupyterLab: notebooks 02 and 03 with run_dir = {str(output_dir)!r}",
            )
        )
    return commands


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _series(log_history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in log_history:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def first_last(log_history: Sequence[dict], key: str, window: int = WINDOW) -> str:
    """``"0.226 -> 0.330 (mean of the first and last 20 logged steps)"``, or ``"not logged"``."""
    steps, values = _series(log_history, key)
    if not values:
        return "not logged"
    n = min(window, max(1, len(values) // 2))
    if len(values) == 1:
        return f"{values[0]:.3f} (one logged step, {steps[0]})"
    return (
        f"{_mean(values[:n]):.3f} → {_mean(values[-n:]):.3f} (mean of the first and last {n} logged steps; "
        f"step {steps[0]}: {values[0]:.3f}, step {steps[-1]}: {values[-1]:.3f})"
    )


def _files(output_dir: Path, tracking_dir: Path) -> list[tuple[str, str, str]]:
    """``(file, what it is, how to open it)`` for each file of the run that exists."""
    run = display_path(output_dir)
    rel = os.path.relpath(tracking_dir, output_dir) if tracking_dir != output_dir else ""
    t = (rel + "/") if rel and rel != "." else ""
    perlwb = shell_command("perlwb")
    rows = [
        (
            "config.yaml",
            "the resolved config of this run",
            f"`{perlwb} train --config {run}/config.yaml --overwrite_output_dir` trains it again, here",
        ),
        (
            "metrics.jsonl",
            "every Trainer log (reward, per-reward means, loss, KL, ...), one JSON object per step",
            f"`perl.open_run({str(output_dir)!r}).metrics` (xarray, by step)",
        ),
        ("adapter_config.json", "the adapter's peft config", "`peft.PeftConfig.from_pretrained(run_dir)`"),
        (
            "adapter_model.safetensors",
            "the trained adapter weights",
            f"`{perlwb} eval {run}`, or `peft.PeftModel.from_pretrained(base_model, run_dir)`",
        ),
        (
            "model.safetensors",
            "the fine-tuned model (full fine-tuning)",
            "`transformers.AutoModelForCausalLM.from_pretrained(run_dir)`",
        ),
        (
            f"{t}spectral_history_final.nc",
            "spectra of the adapter updates by step × layer × module × sv",
            "`perl.open_run(run_dir).spectral` or `xarray.open_dataset(...)`; notebook 02",
        ),
        (
            f"{t}spectral_logs/spectral_history.nc",
            "the same store as it grew during training",
            "`xarray.open_dataset(...)`",
        ),
        (f"{t}spectral_logs/spectral_history_summary.json", "summary statistics of the spectra", "any JSON reader"),
        (
            f"{t}gradient_flow_final.nc",
            "accumulated pre-clip gradient norms by step × layer × module × component",
            "`perl.open_run(run_dir).gradients` or `xarray.open_dataset(...)`; notebook 03",
        ),
        (
            f"{t}gradient_logs/gradient_flow.nc",
            "the same store as it grew during training",
            "`xarray.open_dataset(...)`",
        ),
        (f"{t}gradient_logs/gradient_flow_summary.json", "summary statistics of the gradient flow", "any JSON reader"),
        (
            f"{t}gradient_logs/gradient_heatmap_A.png",
            "gradient norm heatmap (layer × step) of the A factors",
            "an image viewer",
        ),
        (
            f"{t}gradient_logs/gradient_heatmap_B.png",
            "gradient norm heatmap (layer × step) of the B factors",
            "an image viewer",
        ),
        (f"{t}gradient_logs/gradient_layer_comparison.png", "gradient norm by layer", "an image viewer"),
        (
            f"{t}alignment_final.nc",
            "alignment of the updates with the base weights' singular subspaces",
            "`xarray.open_dataset(...)`; notebook 05",
        ),
        ("report.html", "the HTML report of the run", "a web browser (no server needed)"),
    ]
    found = [row for row in rows if (output_dir / row[0]).is_file()]
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
    if checkpoints:
        found.append(
            (
                f"{checkpoints[0]}/ … {checkpoints[-1]}/" if len(checkpoints) > 1 else f"{checkpoints[0]}/",
                "Trainer checkpoints",
                "`--config.training.resume_from_checkpoint true` resumes the newest",
            )
        )
    return found


def render_run_card(
    output_dir: str | os.PathLike,
    config,
    log_history: Sequence[dict],
    tracking_dir=None,
    global_step: int | None = None,
) -> str:
    """The run card's Markdown text (see `write_run_card`)."""
    from perl import __version__

    out = Path(output_dir)
    tracking = Path(tracking_dir) if tracking_dir is not None else out
    method = config.peft.type
    rank = "—" if method in ("full", "layernorm", "ia3") else str(config.peft.r)
    steps = global_step if global_step is not None else max((int(r.get("step", 0)) for r in log_history), default=0)
    run_name = config.training.run_name or out.name
    lines = [
        f"# Run `{run_name}`: {method} on {config.model.model_name_or_path}",
        "",
        "GRPO on Countdown with the PeRL workbench "
        f"(perl {__version__}). This card is written at the end of training; `config.yaml` holds every setting.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}` |",
        f"| model | `{config.model.model_name_or_path}` |",
        f"| rank r / alpha | {rank} / {config.peft.lora_alpha} |",
        f"| target modules | {', '.join(config.peft.target_modules or [])} |",
        f"| optimizer steps | {steps} (of max_steps {config.training.max_steps}) |",
        f"| prompts × completions per step | {config.training.per_device_train_batch_size // max(1, config.training.num_generations)}"
        f" × {config.training.num_generations} |",
        f"| learning rate | {config.training.learning_rate:g} |",
        f"| seed | {config.common.seed} |",
        f"| reward | {first_last(log_history, REWARD_KEY)} |",
        f"| correct-equation reward | {first_last(log_history, CORRECT_KEY)} |",
        f"| format reward | {first_last(log_history, FORMAT_KEY)} |",
        "",
        "## Files",
        "",
        "| file | what it is | how to open it |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {what} | {how} |" for name, what, how in _files(out, tracking)]
    commands = next_commands(
        out,
        has_adapter=(out / "adapter_config.json").is_file(),
        has_tracking=any((tracking / n).exists() for n in ("spectral_history_final.nc", "gradient_flow_final.nc")),
    )
    if commands:
        lines += ["", "## Look at it", "", "From the folder where training was started:", "", "```bash"]
        for command, what in commands:
            lines += [f"# {what}", command]
        lines += [
            "```",
            "",
            "```python",
            "import perl",
            f"run = perl.open_run({str(out)!r})",
            "run.spectral, run.gradients, run.metrics   # xarray Datasets",
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_run_card(
    output_dir: str | os.PathLike,
    config,
    log_history: Sequence[dict],
    tracking_dir=None,
    global_step: int | None = None,
) -> Path:
    """Write ``<output_dir>/README.md``: method, model, rank, steps, reward first -> last, and each
    file of the run with how to open it (replacing peft's empty model-card template).

    Args:
        output_dir: the run folder.
        config (`TrainConfig`): the run's config.
        log_history (list of dict): the Trainer's logs (``trainer.state.log_history``), each with ``step``.
        tracking_dir: where the tracker stores are, if not ``output_dir``.
        global_step (int, optional): optimizer steps done.
    """
    path = Path(output_dir) / RUN_CARD
    text = render_run_card(output_dir, config, log_history, tracking_dir, global_step)
    return atomic_write_text(path, text)
