"""Train from a shell, in the flag style of the PeRL tracking docs (`train` is the default).

Usage:
    python run.py --enable_tracking --tracking_frequency 10 --config.peft.type dora
    python run.py --help
"""

from perl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
