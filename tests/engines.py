"""How tests launch ``run.py`` on 2 CPU processes: ``accelerate launch`` with ``configs/accelerate/cpu_<engine>.yaml``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def free_port() -> int:
    """A TCP port nobody listens on now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(engine: str) -> list[str]:
    """The command up to ``run.py``; the run's flags follow it."""
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(CONFIGS / f"cpu_{engine}.yaml"),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "run.py"),
    ]
