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

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from transformers import TrainerCallback

from perl.config import TrainConfig, save_config, to_grpo_kwargs
from perl.preflight import preflight
from perl.progress import TrainingProgress, quiet_known_warnings

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


# note: what a fresh run (not resuming) removes from a folder it was allowed to overwrite, so that
# old stores and metrics never mix with the new run's. Only files this package writes.
_STALE_OUTPUTS = ("metrics.jsonl", "spectral_logs", "gradient_logs", "alignment_logs", "spectral_history_final.nc",
                  "gradient_flow_final.nc", "alignment_final.nc")


def _clear_stale_outputs(*folders: Path) -> None:
    import shutil

    for folder in folders:
        for name in _STALE_OUTPUTS:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def build_grpo_args(config: TrainConfig):
    """The ``trl.GRPOConfig`` of this run: our training section, minus what TRL does not know."""
    from trl import GRPOConfig

    import torch

    kwargs = to_grpo_kwargs(config)
    kwargs["data_seed"] = config.common.seed
    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # note: pinning needs an accelerator
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # note: without use_cpu accelerate only forms a process group for accelerators, so each
        # process of `accelerate launch --num_processes N` on a CPU would train alone (and all write)
        kwargs["use_cpu"] = True
    return GRPOConfig(**kwargs)


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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

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
        )
        callbacks.append(GradientFlowCallback(tracker))
    if tc.enable_alignment_tracking:
        from perl.trackers import AlignmentTracker, AlignmentTrackingCallback

        tracker = AlignmentTracker.from_config(tc, model, tracking_dir, peft_type=config.peft.type,
                                               run_attrs=run_attrs)
        callbacks.append(AlignmentTrackingCallback(tracker, save_with_checkpoints=tc.save_with_checkpoints))
    return callbacks


def run_attributes(config: TrainConfig, adapter_model) -> dict:
    """Global attributes every store of this run carries."""
    from perl import __version__
    from perl.config import to_yaml

    peft_cfg = getattr(adapter_model, "peft_config", {}).get("default") if hasattr(adapter_model, "peft_config") else None
    r = config.peft.r
    alpha = config.peft.lora_alpha
    # note: s = alpha/r only means something for the LoRA family; other methods scale differently
    # (AdaLoRA by alpha/ranknum per module, VeRA/IA3/LN/MiSS not at all), so they get NaN here.
    lora_family = {"lora", "dora", "pissa", "milora", "milora_plus", "lora_plus", "lorafa"}
    if config.peft.type == "rslora":
        scaling = alpha / (r ** 0.5)
    elif config.peft.type in lora_family:
        scaling = alpha / r
    else:
        scaling = float("nan")
    return {
        "peft_type": config.peft.type,
        "peft_config_class": type(peft_cfg).__name__ if peft_cfg is not None else "none",
        "r": int(r),
        "lora_alpha": float(alpha),
        "scaling": float(scaling),
        "target_modules": ",".join(config.peft.target_modules or []),
        "model_name_or_path": str(config.model.model_name_or_path),
        "seed": int(config.common.seed),
        "config_yaml": to_yaml(config),
        "perl_version": __version__,
        "Conventions": "CF-1.8",
    }


def train(config: TrainConfig, reward_funcs: Sequence[Callable] | None = None,
          extra_callbacks: Sequence | None = None) -> TrainResult:
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

    preflight(config)
    output_dir = Path(config.training.output_dir).expanduser()
    checkpoint = resolve_checkpoint(output_dir, config.training.resume_from_checkpoint)
    tracking_dir = Path(config.tracker.tracking_output_dir or output_dir).expanduser()

    if _is_main_process():
        if checkpoint is None:
            _clear_stale_outputs(output_dir, tracking_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_FILE)

    torch.manual_seed(config.common.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(
        config.model.model_name_or_path,
        dtype=config.model.dtype,
        attn_implementation=config.model.attn_implementation,
        device_type=device_type,
        seed=config.common.seed,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    train_ds, _test_ds = load_countdown(
        config.dataset, tokenizer, max_prompt_length=config.training.max_prompt_length
    )
    grpo_args = build_grpo_args(config)
    total_steps = config.training.max_steps if config.training.max_steps and config.training.max_steps > 0 else None
    if total_steps is None:
        per_step = grpo_args.per_device_train_batch_size * grpo_args.gradient_accumulation_steps
        total_steps = max(1, int(len(train_ds) * config.training.num_train_epochs * config.training.num_generations
                                 // max(1, per_step)))

    with quiet_known_warnings(enabled=not config.common.debug):
        setup = build_adapter(model, config.peft, total_steps=total_steps)
    logger.info("adapter: %s", setup.description)
    peft_model = setup.model

    callbacks = list(setup.callbacks)
    callbacks += tracking_callbacks(config, peft_model, tracking_dir, run_attributes(config, peft_model))
    if _is_main_process():
        # note: after the trackers, so the scalars they add to each log are in metrics.jsonl too
        callbacks.append(MetricsCallback(output_dir / METRICS_FILE))
    callbacks += list(extra_callbacks or [])

    optimizers = (None, None)
    trainer = GRPOTrainer(
        model=peft_model,
        reward_funcs=list(reward_funcs or default_reward_funcs()),
        args=grpo_args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=optimizers,
    )
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
    if _is_main_process():
        trainer.save_model(str(output_dir))
        # note: the Trainer pickles its arguments beside the adapter; config.yaml already says all of it
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        from perl.runcard import write_run_card

        # note: replaces peft's empty model-card template (absolute paths, "More Information Needed")
        write_run_card(output_dir, config, trainer.state.log_history, tracking_dir, int(trainer.state.global_step))
    return TrainResult(
        output_dir=output_dir,
        tracking_dir=tracking_dir,
        log_history=list(trainer.state.log_history),
        global_step=int(trainer.state.global_step),
        model=trainer.model,
    )
