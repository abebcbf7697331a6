"""Checks of command-line arguments, made before any work: argparse types for numbers, and the output
paths and device a command will use."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import DustinError


def at_least(low: int):
    """An argparse type: an int >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def finite(text: str) -> float:
    """An argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that could not be written, before the work that fills it."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise DustinError(f"{flag} {path} is a directory; give a file name")
    if not p.parent.is_dir():
        raise DustinError(f"{flag} {path}: the folder {p.parent} does not exist; create it or write elsewhere")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise DustinError(f"{flag} {path} is not writable")


def output_dir(path: str, flag: str) -> Path:
    """Make an output folder before the work that fills it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DustinError(f"{flag} {path} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DustinError(f"cannot create {flag} {path} ({e.strerror})") from None
    return out


def parse_device(text: str):
    """`--device`: cpu, or cuda[:n] on a machine that has that GPU."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise DustinError(f"unknown --device {text!r}; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type not in ("cpu", "cuda"):
        raise DustinError(f"--device {text}: dustin runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DustinError(f"--device {text}, but this machine's torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DustinError(f"--device {text}: there are only {torch.cuda.device_count()} GPU(s)")
    return device
