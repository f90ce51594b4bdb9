"""A readable console while training: one progress bar with the live reward and correct-equation
reward, and a short line every N steps, instead of the Trainer's full log dict at every step
(every value still goes to ``metrics.jsonl``; ``--config.common.debug true`` brings the Trainer's
own printing back).

Usage:
    from perl.progress import TrainingProgress, quiet_known_warnings
    trainer.callback_handler.pop_callback(ProgressCallback)   # what `train()` does unless debug
    trainer.add_callback(TrainingProgress(every=20))
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque

from transformers import TrainerCallback

__all__ = ["TrainingProgress", "quiet_known_warnings", "KNOWN_WARNINGS", "short_line"]

REWARD = "reward"
CORRECT = "rewards/equation_reward/mean"
FORMAT = "rewards/format_reward/mean"

# (message regex, category, module regex): third-party deprecation notices that repeat at every
# step and say nothing about this run. Narrow on purpose: other warnings of these modules still show.
KNOWN_WARNINGS = ((r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),)


@contextlib.contextmanager
def quiet_known_warnings(enabled: bool = True):
    """Hide `KNOWN_WARNINGS` inside the block (by message, category and module); nothing else."""
    with warnings.catch_warnings():
        if enabled:
            for message, category, module in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


def _value(logs: dict, key: str) -> float:
    value = logs.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def short_line(step: int, total: int | None, window: list[dict], seconds_per_step: float | None) -> str:
    """``step 30/300 | reward 1.234 | correct eq 0.250 | loss 0.01 | grad_norm 0.31 | 1.1 s/step``:
    rewards as the mean over ``window`` (the logs since the last line), the rest from the newest log."""

    def mean(key):
        values = [_value(logs, key) for logs in window]
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    last = window[-1] if window else {}
    of = f"/{total}" if total else ""
    parts = [
        f"step {step}{of}",
        f"reward {_fmt(mean(REWARD))}",
        f"correct eq {_fmt(mean(CORRECT))}",
        f"format {_fmt(mean(FORMAT))}",
    ]
    for key in ("loss", "grad_norm"):
        if key in last:
            parts.append(f"{key} {_value(last, key):.4g}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    n = len(window)
    return " | ".join(parts) + (f"  (rewards: mean of the last {n} logged steps)" if n > 1 else "")


class TrainingProgress(TrainerCallback):
    """A progress bar over optimizer steps with the newest reward and correct-equation reward, and
    a short line every ``every`` steps (rewards averaged over those steps).

    In a notebook the bar is a widget (``tqdm.auto``); in a terminal a text bar. Only the main
    process shows anything.

    Usage:
        trainer.add_callback(TrainingProgress(every=20))

    Args:
        every (int, optional): steps between two short lines; default a tenth of the run, at least 5 (and the last step).
        lines (bool, default True): print the short lines (False: the bar only).
    """

    def __init__(self, every: int | None = None, lines: bool = True):
        self.every = every
        self.lines = lines
        self.bar = None
        self._window: list[dict] = []
        self._times: deque[tuple[float, int]] = deque(maxlen=50)
        self.printed: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        if self.every is None:
            self.every = max(5, (total or 100) // 10)
        self.bar = tqdm(total=total, initial=int(state.global_step), desc="training", unit="step", dynamic_ncols=True)
        self._times.append((time.monotonic(), int(state.global_step)))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(int(state.global_step) - self.bar.n)
            self._times.append((time.monotonic(), int(state.global_step)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or REWARD not in logs:
            return
        self.bar.set_postfix_str(
            f"reward {_fmt(_value(logs, REWARD))} | correct eq {_fmt(_value(logs, CORRECT))}", refresh=True
        )
        self._window.append(dict(logs))
        step = int(state.global_step)
        if step % self.every == 0 or step == state.max_steps:
            self._line(step, state)

    def _line(self, step: int, state) -> None:
        if not self._window:
            return
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        speed = (t1 - t0) / (s1 - s0) if s1 > s0 else None
        line = short_line(
            step, int(state.max_steps) if state.max_steps and state.max_steps > 0 else None, self._window, speed
        )
        self._window = []
        self.printed.append(line)
        if self.lines:
            self.bar.write(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(int(state.global_step) - self.bar.n)
            self.bar.close()
            self.bar = None
