"""Thin TrainerCallbacks that drive the trackers from the transformers Trainer (and TRL's GRPOTrainer)."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

logger = logging.getLogger("perl")

__all__ = ["SpectralTrackingCallback"]


class SpectralTrackingCallback(TrainerCallback):
    """Takes a spectral snapshot at step 0, every ``tracker.log_frequency`` optimizer steps and at the end.

    When the Trainer fires what (transformers' ``_inner_training_loop``): per optimizer step it
    clips, ``on_pre_optimizer_step``, ``optimizer.step()``, ``on_optimizer_step``, ``zero_grad``,
    ``global_step += 1``, then ``on_step_end``. So at ``on_step_end`` the weights are those after
    ``state.global_step`` optimizer steps, and that is the label of the snapshot (the numbering the
    gradient tracker uses: its step s is the update between spectral snapshots s-1 and s).

    - ``on_train_begin``: a new run (global_step 0) replaces any store an earlier run left in the
      folder and logs step 0. A resumed run (global_step = N > 0) truncates the store to steps <= N,
      restores the initial factors from ``checkpoint-N`` and continues: no duplicated, no missing step.
    - ``on_save``: with ``save_with_checkpoints`` the initial factors go into the checkpoint folder
      (safetensors; the adapter's size for PiSSA / MiLoRA, nearly empty for plain LoRA whose
      B_0 = 0, the target modules' weights W_0 for full fine-tuning), never the history itself.
    - ``on_log``: the last snapshot's scalars (``spectral/effective_rank/mean``,
      ``spectral/effective_rank/q_proj``, ...) are added to the Trainer's log record once. For
      ``report_to`` integrations (tensorboard, wandb) to see them, this callback must come before
      them in ``trainer.callback_handler.callbacks`` (the Trainer puts its integrations first).
    - ``on_train_end``: logs the final step if needed, writes the summary JSON and the final file.

    Only the global main process (``state.is_world_process_zero``) computes and writes. With
    sharded parameters (DeepSpeed ZeRO-3, FSDP2) every rank runs the same events: the tracker
    gathers each module in turn (all ranks together) and rank 0 computes and writes.

    Usage:
        tracker = SpectralTracker(peft_model, log_frequency=10, save_dir=output_dir)
        trainer = GRPOTrainer(model=peft_model, ..., callbacks=[SpectralTrackingCallback(tracker)])

    Args:
        tracker (SpectralTracker): the tracker to drive.
        save_with_checkpoints (bool, defaults to True): save the initial factors into each checkpoint.
    """

    def __init__(self, tracker, save_with_checkpoints: bool = True):
        self.tracker = tracker
        self.save_with_checkpoints = save_with_checkpoints
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker.is_world_process_zero = bool(state.is_world_process_zero)
        step = int(state.global_step)
        if step == 0:
            self.tracker.start_fresh()
        else:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
            self.tracker.resume(step, checkpoint if os.path.isdir(checkpoint) else None)
        # note: log_step itself skips a stored step (deciding on rank 0 for all ranks when sharded)
        if step == 0 or self.tracker.should_log(step):
            self._log(step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker.should_log(state.global_step):
            self._log(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.save_with_checkpoints and state.is_world_process_zero:
            self.tracker.save_init_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if _add_to_logs(state, logs, self._pending):
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._log(state.global_step)  # skipped when already stored
        self.tracker.save()

    def _log(self, step: int) -> None:
        if self.tracker.log_step(step) is not None:
            self._pending = dict(self.tracker.last_scalars)


# ------------------------------------------------------------------------------------ gradient flow
__all__.append("GradientFlowCallback")


class GradientFlowCallback(TrainerCallback):
    """Records the accumulated, pre-clip gradient of every logged optimizer step.

    What the Trainer does per optimizer step: accumulate gradients over
    ``gradient_accumulation_steps`` micro-batches, clip (``accelerator.clip_grad_norm_`` returns the
    pre-clip total norm), ``on_pre_optimizer_step`` (gradients already clipped), ``optimizer.step()``,
    ``on_optimizer_step``, ``zero_grad``, ``global_step += 1``, ``on_step_end``. So this callback

    - wraps the Trainer's ``accelerator.clip_grad_norm_`` at train begin to capture the pre-clip
      total and the ``max_norm`` used. That is accelerate's public API, the one call through which
      every transformers version since 4.2x clips and measures (``_clip_grad_norm`` with
      ``max_grad_norm``, ``_get_grad_norm`` with ``inf`` when clipping is off); the wrapper only
      records the return value and is removed at train end;
    - at ``on_pre_optimizer_step`` gives the tracker the clipped gradients, the captured total and
      ``max_norm`` (the tracker undoes the uniform clip factor), labelled ``global_step + 1``: the
      step number the Trainer logs for this update;
    - at ``on_optimizer_step`` lets the tracker measure the update the optimizer made and keeps the
      step's scalars (``gradient/total_pre_clip``, ``gradient/clip_coef``, ``gradient/B/q_proj``, ...;
      ``gradient/step`` says which step they describe);
    - at ``on_log`` adds those scalars to the Trainer's log record once, as
      :class:`SpectralTrackingCallback` does, so ``report_to`` loggers and ``metrics.jsonl`` get them.

    Only the global main process writes; under DDP its gradients are the all-reduced ones and it
    alone computes. Under DeepSpeed (ZeRO-1/2/3) the engine clips and steps inside
    ``accelerator.backward`` at the accumulation boundary, before any callback runs: the callback
    wraps the engine's ``step`` at train begin so that, at logged steps, the tracker reads the full
    accumulated gradients (``deepspeed.utils.safe_get_full_grad``) just before the engine clips
    them; the total it stores is the engine's own pre-clip norm (what the Trainer logs as
    ``grad_norm``). The wrapper is removed at train end. With sharded parameters (ZeRO-3,
    FSDP2) norms are sums of squares of each rank's shard, all-reduced; every rank takes part.

    Usage:
        tracker = GradientFlowTracker(peft_model, log_frequency=10, save_dir="runs/x")
        callback = GradientFlowCallback(tracker)
        trainer = GRPOTrainer(model=peft_model, ..., callbacks=[callback])
        callback.bind_trainer(trainer)      # needed: the pre-clip norm is read from the Trainer
        trainer.train()

    Args:
        tracker (GradientFlowTracker): the tracker to drive.
        trainer (transformers.Trainer, optional): the Trainer; or call :meth:`bind_trainer` later.
        save_with_checkpoints (bool, defaults to True): refresh ``gradient_flow_summary.json``
            whenever the Trainer saves a checkpoint (the store itself is always up to date).
    """

    def __init__(self, tracker, trainer=None, save_with_checkpoints: bool = True):
        self.tracker = tracker
        self.save_with_checkpoints = save_with_checkpoints
        self._trainer = trainer
        self._accelerator = None
        self._wrapper = None
        self._captured = None
        self._active = False
        self._collective = False
        self._engine = None
        self._engine_step = None
        self._warned_uncaptured = False
        self._pending_logs: dict[str, float] = {}

    def bind_trainer(self, trainer) -> GradientFlowCallback:
        """Give the callback the Trainer whose clipping it must observe; returns self."""
        self._trainer = trainer
        return self

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._active = False
        if self._trainer is None:
            raise ValueError(
                "GradientFlowCallback needs the Trainer to read the pre-clip gradient norm: call "
                "callback.bind_trainer(trainer) after building the Trainer (perl.train does this)."
            )
        from . import sharding

        accelerator = self._trainer.accelerator
        self.tracker.writes = bool(state.is_world_process_zero)
        if getattr(self._trainer, "is_fsdp_enabled", False):
            self.tracker.rebind()  # note: fully_shard registered new (DTensor) parameters
        engine = _deepspeed_engine(self._trainer)
        # note: with an engine or sharded parameters every rank computes its share (collectives)
        self._collective = engine is not None or (
            sharding.distributed() and sharding.any_sharded(self.tracker._params)
        )
        self._wrap(accelerator)
        if engine is not None:
            self._hook_engine(engine)
        if state.is_world_process_zero:
            if state.global_step > 0:
                self.tracker.resume_from(state.global_step)
            else:
                self.tracker.start_fresh()
        self._active = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        captured, self._captured = self._captured, None
        if not self._active or not (state.is_world_process_zero or self._collective):
            return
        step = state.global_step + 1
        if not self.tracker.should_log(step):
            return
        if captured is None:
            # the Trainer clipped by a path we cannot observe (sagemaker / mixed device meshes)
            if not self._warned_uncaptured and state.is_world_process_zero:
                logger.warning(
                    "Gradient tracker could not observe the Trainer's gradient clipping; pre-clip "
                    "norms are stored as NaN, post-clip totals are measured."
                )
                self._warned_uncaptured = True
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
            total = float("nan") if clip is not None else None
            self.tracker.log_step(step, total_grad_norm=total, max_grad_norm=clip)
            return
        total, max_norm = captured
        self.tracker.log_step(step, total_grad_norm=total, max_grad_norm=max_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._active and (state.is_world_process_zero or self._collective):
            if self.tracker.log_update() and state.is_world_process_zero:
                self._pending_logs = dict(self.tracker.last_scalars)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if _add_to_logs(state, logs, self._pending_logs):
            self._pending_logs = {}

    def on_save(self, args, state, control, **kwargs):
        if self._active and self.save_with_checkpoints and state.is_world_process_zero:
            self.tracker.save()

    def on_train_end(self, args, state, control, **kwargs):
        try:
            if self._active and state.is_world_process_zero:
                self.tracker.finalize()
        finally:
            self._unwrap()
            self._unhook_engine()
            self._active = False

    # ------------------------------------------------------------------ clip capture
    def _wrap(self, accelerator) -> None:
        self._unwrap()
        original = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, norm_type=2):
            total = original(parameters, max_norm, norm_type=norm_type)
            self._captured = (total, max_norm)
            return total

        accelerator.clip_grad_norm_ = clip_grad_norm_  # an instance attribute shadows the method
        self._accelerator, self._wrapper = accelerator, clip_grad_norm_

    def _unwrap(self) -> None:
        _unshadow(self._accelerator, "clip_grad_norm_", self._wrapper)
        self._accelerator = self._wrapper = None

    # ------------------------------------------------------------------ DeepSpeed engine hook
    def _hook_engine(self, engine) -> None:
        """Read the gradients at the accumulation boundary, before the engine clips, steps and zeroes them."""
        self._unhook_engine()
        original = engine.step

        def step(*args, **kwargs):
            if (
                self._active
                and engine.is_gradient_accumulation_boundary()
                and self.tracker.should_log(self._trainer.state.global_step + 1)
            ):
                self.tracker.capture_gradients()  # every rank: safe_get_full_grad is a collective
            return original(*args, **kwargs)

        engine.step = step  # an instance attribute shadows the method; removed at train end
        self._engine, self._engine_step = engine, step

    def _unhook_engine(self) -> None:
        _unshadow(self._engine, "step", self._engine_step)
        self._engine = self._engine_step = None


def _unshadow(obj, name: str, wrapper) -> None:
    """Remove our ``wrapper`` from the instance attributes of ``obj`` (its class's method shows again);
    left alone if someone has replaced it since."""
    if obj is not None and obj.__dict__.get(name) is wrapper:
        delattr(obj, name)


def _add_to_logs(state, logs: dict | None, scalars: dict[str, float]) -> bool:
    """Add a tracker's ``scalars`` to the Trainer's ``logs`` of this step; False if there are none or no logs."""
    if not scalars or logs is None:
        return False
    logs.update(scalars)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        # the Trainer copied `logs` into log_history just before this event
        state.log_history[-1].update(scalars)
    return True


def _deepspeed_engine(trainer):
    """The DeepSpeed engine the Trainer's accelerator drives, or None."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        return wrapped.engine
    if getattr(trainer, "is_deepspeed_enabled", False):
        model = getattr(trainer, "model_wrapped", None)
        if model is not None and hasattr(model, "is_gradient_accumulation_boundary"):
            return model
    return None
