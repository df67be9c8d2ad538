"""What every benchmark record carries: the device, the date (UTC), the exact command and torch's version."""

import datetime
import platform
import shlex
import sys

import torch


def cpu_name():
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_meta(script, device, argv=None):
    """script: the path the command names (e.g. 'benchmarks/rewards.py'); argv: its arguments (default sys.argv[1:])."""
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
    }
