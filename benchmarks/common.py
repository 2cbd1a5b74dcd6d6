"""What every benchmark records about where it ran (the commit, the device, the versions) and of the tests it ran.

torch is imported where it is needed: the GPU check's driver reads commits and test reports without it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The repository's short commit hash, with '+dirty' when the tree has changes.

    A copy of the tree without its git history (as sent to a remote machine) says what it is with
    FASTCODEGEN_COMMIT; else "unknown".
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        head = dirty = None
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return os.environ.get("FASTCODEGEN_COMMIT") or "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver's version as nvidia-smi reports it; None without nvidia-smi."""
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = p.stdout.strip().splitlines()
    return lines[0].strip() if p.returncode == 0 and lines else None


def environment(device: torch.device) -> dict:
    """Date, commit, device (with its SM count, memory and driver on CUDA) and software versions, for a record."""
    import torch

    env = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "num_sms": None,
        "memory_gib": None,
        "capability": None,
        "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["num_sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
        env["driver"] = nvidia_driver()
    for package in ("triton", "transformers"):  # their versions, without the cost of importing them
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def junit_summary(path: Path) -> dict:
    """A pytest JUnit XML report in numbers: passed, failed, errors, skipped, and each failure or error.

    Failures and errors are listed in the report's order as {"test": "module::name[params]", "kind":
    "failed" | "error", "message": the first lines of the error, up to 300 characters}. A missing or
    unreadable report (a process killed before pytest wrote it) gives {"report": "missing"} with zero counts.
    """
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    summary: dict = {**counts, "failures": [], "report": "ok"}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {**summary, "report": "missing"}
    for case in root.iter("testcase"):
        if case.get("name") is None:
            continue  # what pytest writes for a session interrupted mid-test: no test's outcome
        test = f"{case.get('classname', '')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                kind = "failed" if child.tag == "failure" else "error"
                summary["failures"].append({"test": test, "kind": kind, "message": _first_lines(child)})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        summary[outcome] += 1
    return summary


def _first_lines(element: ET.Element, lines: int = 3, chars: int = 300) -> str:
    """The first non-empty lines of a failure's message (else its text), joined with ' | '."""
    text = element.get("message") or element.text or ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][:lines]
    return " | ".join(kept)[:chars]
