"""GRPO training of a causal LM with a PEFT adapter on Countdown, with tracking.

``train(config)`` is the whole pipeline: tokenizer, model, adapter, data, rewards, TRL's
``GRPOTrainer``, the tracking callbacks; it writes the run folder and returns a :class:`TrainResult`.
The same function runs from a notebook cell, from ``perlwb train`` / ``run.py``, and under
``accelerate launch`` (the Trainer picks up the distributed environment).

Usage:
```python
from perl.config import TrainConfig
from perl.train import train

cfg = TrainConfig()
cfg.peft.type = "dora"
cfg.training.output_dir = "runs/dora"
cfg.tracker.enable_spectral_tracking = True
result = train(cfg)
print(result.output_dir, result.log_history[-1])
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from perl.config import ConfigError, TrainConfig, save_config, to_grpo_kwargs
from perl.fileio import atomic_write_text
from perl.preflight import check_adapter_fits, preflight
from perl.progress import TrainingProgress, quiet_known_warnings
from perl.rundir import Overwrite, RunLock

logger = logging.getLogger("perl")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What a finished training leaves behind.

    Args:
        output_dir (`Path`): the run folder (config.yaml, metrics.jsonl, adapter, checkpoints).
        tracking_dir (`Path`): where spectral_logs/ and gradient_logs/ are (``tracking_output_dir`` or ``output_dir``).
        log_history (`list[dict]`): the Trainer's logged values, one dict per log.
        global_step (`int`): optimizer steps done.
        model (`nn.Module`, *optional*): the trained model (the PeftModel), for inspection in a notebook.
    """

    output_dir: Path
    tracking_dir: Path
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0
    model: object = field(default=None, repr=False)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_checkpoint(output_dir: Path, resume: str | None) -> str | None:
    """``None`` -> None; ``"true"`` -> the newest ``checkpoint-N`` in ``output_dir``; else the path itself."""
    if resume is None:
        return None
    if str(resume).strip().lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(output_dir))
    return str(Path(resume).expanduser())


# note: what a fresh run (not resuming) moves aside from a folder without an earlier run in it (or
# from a separate tracking folder), so old stores never mix with the new run's. Only files ours.
_STALE_OUTPUTS = (
    "metrics.jsonl",
    "spectral_logs",
    "gradient_logs",
    "alignment_logs",
    "spectral_history_final.nc",
    "gradient_flow_final.nc",
    "alignment_final.nc",
)


def build_grpo_args(config: TrainConfig):
    """The ``trl.GRPOConfig`` of this run: our training section, minus what TRL does not know."""
    import torch
    from trl import GRPOConfig

    kwargs = to_grpo_kwargs(config)
    kwargs["data_seed"] = config.common.seed
    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # note: pinning needs an accelerator
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu_engine_environment()
        # note: without use_cpu accelerate only forms a process group for accelerators, so each
        # process of `accelerate launch --num_processes N` on a CPU would train alone (and all write);
        # the gloo backend is the one CPU collectives have (DeepSpeed's batch-size check needs the
        # real world size, which accelerate only knows once the process group exists)
        kwargs["use_cpu"] = True
        kwargs.setdefault("ddp_backend", "gloo")
    return GRPOConfig(**kwargs)


def cpu_engine_environment() -> None:
    """What DeepSpeed needs on a machine without GPUs, set before it is imported: its CPU accelerator.

    Called by :func:`train` (and :func:`build_grpo_args`) so that ``accelerate launch
    --config_file configs/accelerate/cpu_ds_zero2.yaml run.py ...`` needs no hand-set environment.
    A value the user set wins.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class MetricsCallback(TrainerCallback):
    """Appends every Trainer log to ``<output_dir>/metrics.jsonl`` (one JSON object per line, with ``step``).

    Append-only JSON lines survive a crash with every complete line intact and can be read while
    training runs; ``perl.open_run(...).metrics`` turns them into an xarray Dataset by step.

    Args:
        path (`Path`): the JSON-lines file to append to.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        # note: resuming from checkpoint-N drops records of steps > N that a crashed run logged after it
        if state.global_step == 0 or not state.is_world_process_zero or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= state.global_step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a torn last line of a killed run
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": int(state.global_step)}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[key] = float(value)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _readable_console(trainer) -> None:
    """Our progress bar and short lines instead of the Trainer's log dict at every step (a terminal)
    or its step/loss table (a notebook); the logs themselves still reach metrics.jsonl and report_to."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    for cls in (ProgressCallback, NotebookProgressCallback, PrinterCallback):
        trainer.callback_handler.remove_callback(cls)
    if _is_main_process():
        trainer.callback_handler.add_callback(TrainingProgress())


def default_reward_funcs() -> list[Callable]:
    from perl.data.rewards import equation_reward, format_reward

    return [format_reward, equation_reward]


def tracking_callbacks(config: TrainConfig, model, tracking_dir: Path, run_attrs: dict) -> list:
    """The tracker callbacks that ``config.tracker`` asks for (empty when tracking is off)."""
    tc = config.tracker
    callbacks = []
    if tc.enable_spectral_tracking:
        from perl.trackers import SpectralTracker, SpectralTrackingCallback

        tracker = SpectralTracker(
            model,
            log_frequency=tc.spectral_log_frequency,
            save_dir=tracking_dir,
            peft_type=config.peft.type,
            compute_full_svd=tc.compute_full_svd,
            max_layers_to_track=tc.max_layers_to_track,
            top_k=tc.top_k_singular_values,
            run_attrs=run_attrs,
            # note: only full fine-tuning reads these: the modules to follow and k = 2r values of W_t - W_0
            target_modules=config.peft.target_modules,
            full_top_k=2 * config.peft.r,
        )
        callbacks.append(SpectralTrackingCallback(tracker, save_with_checkpoints=tc.save_with_checkpoints))
    if tc.enable_gradient_tracking:
        from perl.trackers import GradientFlowCallback, GradientFlowTracker

        tracker = GradientFlowTracker(
            model,
            log_frequency=tc.gradient_log_frequency,
            save_dir=tracking_dir,
            track_adapter_only=tc.track_adapter_only,
            peft_type=config.peft.type,
            run_attrs=run_attrs,
            target_modules=config.peft.target_modules,
        )
        callbacks.append(GradientFlowCallback(tracker))
    if tc.enable_alignment_tracking:
        from perl.trackers import AlignmentTracker, AlignmentTrackingCallback

        tracker = AlignmentTracker.from_config(
            tc, model, tracking_dir, peft_type=config.peft.type, run_attrs=run_attrs
        )
        callbacks.append(AlignmentTrackingCallback(tracker, save_with_checkpoints=tc.save_with_checkpoints))
    return callbacks


def run_attributes(config: TrainConfig, adapter_model) -> dict:
    """Global attributes every store of this run carries: what was built, read from the adapter.

    ``r`` and ``target_modules`` come from peft's config of the built adapter, not from our
    config section: AdaLoRA's rank is ``init_r`` (``peft.r`` is unused by it), IA3 and LayerNorm
    tuning adapt their own module lists, and full fine-tuning has no rank.
    """
    from perl import __version__
    from perl.adapters.registry import lora_scaling
    from perl.config import to_yaml
    from perl.trackers.discovery import adapter_rank, target_modules_of

    peft_cfg = (
        getattr(adapter_model, "peft_config", {}).get("default") if hasattr(adapter_model, "peft_config") else None
    )
    alpha = config.peft.lora_alpha
    rank = adapter_rank(peft_cfg)
    targets = target_modules_of(peft_cfg)
    if targets is None and peft_cfg is None:
        targets = list(config.peft.target_modules or [])  # full fine-tuning: the modules the trackers follow
    # note: s = alpha/r only means something for the LoRA family; the other methods get NaN
    scaling = lora_scaling(config.peft.type, alpha, rank)
    attrs = {
        "peft_type": config.peft.type,
        "peft_config_class": type(peft_cfg).__name__ if peft_cfg is not None else "none",
        "lora_alpha": float(alpha),
        "scaling": float(scaling),
        "target_modules": ",".join(targets) if isinstance(targets, list) else str(targets or ""),
        "model_name_or_path": str(config.model.model_name_or_path),
        "seed": int(config.common.seed),
        "config_yaml": to_yaml(config),
        "perl_version": __version__,
        "Conventions": "CF-1.8",
    }
    if rank:
        attrs["r"] = int(rank)
    return attrs


def train(
    config: TrainConfig, reward_funcs: Sequence[Callable] | None = None, extra_callbacks: Sequence | None = None
) -> TrainResult:
    """Run GRPO on Countdown with the adapter ``config.peft.type``; return a :class:`TrainResult`.

    Args:
        config (`TrainConfig`): the run. Validated here too, so a notebook gets the same errors as the CLI.
        reward_funcs (`list[callable]`, *optional*): TRL reward functions; defaults to format and equation rewards.
        extra_callbacks (`list[TrainerCallback]`, *optional*): more callbacks, e.g. a live plot in a notebook.
    """
    import torch
    from trl import GRPOTrainer

    from perl.adapters import build_adapter
    from perl.data.datasets import load_countdown
    from perl.models.loading import load_model_and_tokenizer

    cpu_engine_environment()
    # note: everything up to the lock only builds in memory; a failure is a ConfigError and the
    # run folder is exactly as it was (see perl/rundir.py for what happens after)
    preflight(config)
    output_dir = Path(config.training.output_dir).expanduser()
    checkpoint = resolve_checkpoint(output_dir, config.training.resume_from_checkpoint)
    tracking_dir = Path(config.tracker.tracking_output_dir or output_dir).expanduser()
    main_process = _is_main_process()

    grpo_args = _setup_step(
        "build the training arguments", "change the training settings", lambda: build_grpo_args(config)
    )
    torch.manual_seed(config.common.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = _quiet_setup_step(
        f"load the model {config.model.model_name_or_path!r}",
        "check that folder (config.json, weights, tokenizer) or point --config.model.model_name_or_path elsewhere",
        lambda: load_model_and_tokenizer(
            config.model.model_name_or_path,
            dtype=config.model.dtype,
            attn_implementation=config.model.attn_implementation,
            device_type=device_type,
            seed=config.common.seed,
        ),
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    train_ds, _test_ds = _setup_step(
        f"build the dataset from {config.dataset.dataset_name_or_path!r}",
        "fix the data (columns nums and target) or change the dataset settings",
        lambda: load_countdown(config.dataset, tokenizer, max_prompt_length=config.training.max_prompt_length),
    )
    total_steps = config.training.max_steps if config.training.max_steps and config.training.max_steps > 0 else None
    if total_steps is None:
        per_step = grpo_args.per_device_train_batch_size * grpo_args.gradient_accumulation_steps
        total_steps = max(
            1,
            int(
                len(train_ds) * config.training.num_train_epochs * config.training.num_generations // max(1, per_step)
            ),
        )

    check_adapter_fits(model, config)
    with quiet_known_warnings(enabled=not config.common.debug):
        setup = _setup_step(
            f"build the {config.peft.type} adapter",
            "change the peft settings",
            lambda: build_adapter(model, config.peft, total_steps=total_steps),
        )
    logger.info("adapter: %s", setup.description)
    peft_model = setup.model

    existed = output_dir.exists()
    try:
        # note: built before the lock so that TRL's own checks are refusals too; the callbacks
        # that write (trackers, metrics) join it once the folder is ours (see _run)
        trainer = _setup_step(
            "set up the GRPO trainer",
            "change the training settings",
            lambda: GRPOTrainer(
                model=peft_model,
                reward_funcs=list(reward_funcs or default_reward_funcs()),
                args=grpo_args,
                train_dataset=train_ds,
                processing_class=tokenizer,
                callbacks=list(setup.callbacks),
                optimizers=(None, None),
            ),
        )
    except ConfigError:
        if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # note: the Trainer creates output_dir as it is built
        raise

    # note: from here on the folder changes: rank 0 alone locks it for the run's life, moves a
    # previous run aside (put back on any failure before the new run's first snapshot), and writes
    lock = RunLock(output_dir).acquire() if main_process else None
    moves: list[Overwrite] = []
    try:
        if main_process:
            if checkpoint is None:
                moves = _move_previous_run_aside(output_dir, tracking_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, output_dir / CONFIG_FILE)
        with _terminate_as_exit():
            return _run(
                config,
                trainer,
                extra_callbacks,
                grpo_args,
                setup,
                peft_model,
                output_dir,
                tracking_dir,
                checkpoint,
                moves,
            )
    except BaseException:
        for move in moves:
            if not move.done:
                move.rollback()
                logger.warning(
                    "training failed before its first snapshot; the previous run in %s is back.", move.folder
                )
        raise
    finally:
        if lock is not None:
            lock.release()


def _setup_step(what: str, hint: str, build: Callable):
    """Run one building step of train(); any error it raises is the user's input -> one-line ConfigError."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt model or data file raises anything from OSError to KeyError
        reason = " ".join(str(e).split()) or type(e).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise ConfigError(f"could not {what}: {reason}; {hint}.") from e


def _quiet_setup_step(what: str, hint: str, build: Callable):
    """`_setup_step` without transformers' weight-loading bar: a refusal is one line on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _setup_step(what, hint, build)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _move_previous_run_aside(output_dir: Path, tracking_dir: Path) -> list[Overwrite]:
    """Move what a previous run left in the run folder (and a separate tracking folder) aside."""
    from perl.preflight import earlier_run

    moves = []
    if output_dir.is_dir():
        # note: a folder without a run in it only loses stale outputs of ours; other files stay
        whole_run = earlier_run(output_dir) is not None
        moves.append(Overwrite(output_dir, None if whole_run else _STALE_OUTPUTS).move_aside())
    if tracking_dir.resolve() != output_dir.resolve() and not tracking_dir.resolve().is_relative_to(
        output_dir.resolve()
    ):
        moves.append(Overwrite(tracking_dir, _STALE_OUTPUTS).move_aside())
    return moves


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so the lock is released and an
    uncommitted overwrite is rolled back; only the main thread can install a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _CommitOverwrite(TrainerCallback):
    """Deletes the moved-aside previous run once the new one has a snapshot or a checkpoint on disk."""

    def __init__(self, moves: list[Overwrite], tracking_dir: Path):
        self.moves = moves
        self.tracking_dir = tracking_dir

    def commit(self) -> None:
        for move in self.moves:
            move.commit()

    def on_step_end(self, args, state, control, **kwargs):
        if any(p.suffix == ".nc" for d in self.tracking_dir.glob("*_logs") for p in d.rglob("*.nc")):
            self.commit()

    def on_save(self, args, state, control, **kwargs):
        self.commit()


def _run(
    config, trainer, extra_callbacks, grpo_args, setup, peft_model, output_dir, tracking_dir, checkpoint, moves
) -> TrainResult:
    """The training itself, once the folder is locked and prepared (see `train`)."""
    callbacks = list(setup.callbacks)
    callbacks += tracking_callbacks(config, peft_model, tracking_dir, run_attributes(config, peft_model))
    if _is_main_process():
        # note: after the trackers, so the scalars they add to each log are in metrics.jsonl too
        callbacks.append(MetricsCallback(output_dir / METRICS_FILE))
        if moves:
            callbacks.append(_CommitOverwrite(moves, tracking_dir))
    callbacks += list(extra_callbacks or [])

    for cb in callbacks[len(setup.callbacks) :]:
        trainer.add_callback(cb)
    if setup.optimizer_factory is not None:
        trainer.optimizer = setup.optimizer_factory(trainer.model, grpo_args)
    handler = trainer.callback_handler
    for cb in reversed(callbacks):
        if hasattr(cb, "bind_trainer"):
            cb.bind_trainer(trainer)
        # note: run our callbacks first, so the scalars they add to the logs reach the
        # report_to integrations (tensorboard, wandb), which the Trainer registers before them
        handler.callbacks.remove(cb)
        handler.callbacks.insert(0, cb)

    if not config.common.debug:
        _readable_console(trainer)
    with quiet_known_warnings(enabled=not config.common.debug):
        trainer.train(resume_from_checkpoint=checkpoint)
    # note: every rank: under ZeRO-3 / FSDP saving gathers the sharded weights (the Trainer writes on rank 0)
    trainer.save_model(str(output_dir))
    if _is_main_process():
        # note: the Trainer pickles its arguments beside the adapter; config.yaml already says all of it
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        from perl.runcard import write_run_card

        # note: replaces peft's empty model-card template (absolute paths, "More Information Needed")
        write_run_card(output_dir, config, trainer.state.log_history, tracking_dir, int(trainer.state.global_step))
        for move in moves:
            move.commit()  # note: a run without tracking or checkpoints holds once its adapter is saved
    return TrainResult(
        output_dir=output_dir,
        tracking_dir=tracking_dir,
        log_history=list(trainer.state.log_history),
        global_step=int(trainer.state.global_step),
        model=trainer.model,
    )
