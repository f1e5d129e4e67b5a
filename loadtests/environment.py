"""Where a measurement was taken: the machine, the software, the commit. Recorded beside every
load-test and benchmark result, so a figure is never quoted without its context."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln import paths

CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
)
"""CPU features that decide ONNX Runtime's kernels (INT8 speed-ups need VNNI or AMX)."""
PACKAGES = ("onnxruntime", "torch", "tritonclient", "nvidia-pytriton", "locust", "numpy", "pillow", "fastapi")


def utc_stamp() -> str:
    """The current UTC time as YYYYMMDDTHHMMSSZ (for folder names)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def commit(root: Path | None = None) -> str:
    """The checkout's short commit, with "-dirty" when tracked files differ; "unknown" outside git."""
    root = root or paths.ROOT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "", "x86_64"):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def machine_info() -> dict[str, Any]:
    """The machine and the software versions, as a JSON-ready dict."""
    model, flags = _cpuinfo()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, memory_gib = None, None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "memory_gib": memory_gib,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One paragraph for a report: CPU, cores, the INT8-relevant flags, memory, GPUs."""
    flags = info["cpu_flags"]
    present = [f for f, on in flags.items() if on]
    absent = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if not flags.get(f)]
    gpus = "; ".join(info["gpus"]) if info["gpus"] else "none"
    load = ", ".join(f"{x:.2f}" for x in info["load_average"]) if info["load_average"] else "n/a"
    return (
        f"CPU {info['cpu_model']}, {info['usable_cpus']} usable logical CPUs "
        f"({info['physical_cores']} physical cores), {info['memory_gib']} GiB memory; "
        f"flags present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}; "
        f"GPUs: {gpus}; load average at start: {load}; {info['os']}, Python {info['python']}"
    )
