"""`accelerate launch --num_processes 2 run.py ...` on CPU (gloo): two GRPO steps, one writer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_accelerate_launch_two_processes_on_cpu(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp-run"
    # note: --multi_gpu selects accelerate's torchrun path; with no GPU the processes use gloo on CPU
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "run.py"), "--enable_tracking", "--tracking_frequency", "1",
           "--config.model.model_name_or_path", "tiny-random",
           "--config.training.output_dir", str(out), "--config.training.max_steps", "2",
           "--config.training.max_completion_length", "12", "--config.training.num_generations", "4",
           "--config.training.per_device_train_batch_size", "4",
           "--config.dataset.example_numbers", "32", "--config.dataset.test_size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    from perl.trackers import RunStore

    spectral = RunStore.open(out / "spectral_history_final.nc")
    gradients = RunStore.open(out / "gradient_flow_final.nc")
    assert [int(s) for s in spectral.step.values] == [0, 1, 2]
    assert [int(s) for s in gradients.step.values] == [1, 2], "one writer: each step stored once"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "grad_norm" in r] == [1, 2], "metrics written by rank 0 only"
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.rglob(".*.tmp"))
