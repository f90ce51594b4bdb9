"""`python -m perl ...` is the `perlwb` command (train, eval, build-model, report, sweep).

Usage:
    python -m perl --enable_tracking --config.peft.type dora
    python -m perl report runs/demo
"""

from perl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
