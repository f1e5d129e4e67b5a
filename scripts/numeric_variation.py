"""Runs the unit tests again with other float kernels: the portability check of `make test`.

Trained weights and float results differ in the last digits between x86-64 CPUs (AVX2-only, AVX-512,
AVX-512 with VNNI/BF16/AMX): PyTorch's ATen, oneDNN and MKL and ONNX Runtime's MLAS pick other
kernels on each. A test that holds a number tuned to one machine's digits (an exact float, a
bit-identical result of two batch sizes, a threshold chosen from one machine's weights) passes
where it was written and fails on the next CPU. This pass makes "the next CPU" here:

- PyTorch limited to the instruction set below this CPU's best (AVX-512 -> AVX2; AVX2 -> SSE4.1/4.2)
  through ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS, with one OpenMP
  thread (another work split);
- ONNX Runtime with one intra-op thread and only its basic graph optimizations (other fusions), set
  by tests/conftest.py when KILN_TEST_ORT_VARIATION=1.

It trains, exports, quantizes and checks again under those settings, so a value derived from
trained weights is derived again from other weights. Every test must hold; the pass takes about a
minute on 2 cores. Usage: `.venv/bin/python scripts/numeric_variation.py [pytest args]` (the
Makefile's `test-numeric-variation`, which `make test` runs after the main pass).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/unit"]
SKIP = [
    # Installs the SDK into a fresh virtual environment: nothing numeric, and one pass is enough.
    "tests/unit/test_clients_import.py",
]
ORT_VARIATION_ENV = "KILN_TEST_ORT_VARIATION"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of the first CPU in a /proc/cpuinfo text (empty if none)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def capped_environment(flags: set[str]) -> tuple[dict[str, str], str]:
    """The PyTorch settings one instruction-set level below what `flags` offer, and a description.

    Returns:
        (environment variables, what they do in words).
    """
    if "avx512f" in flags:
        known = (("VNNI", "avx512_vnni"), ("BF16", "avx512_bf16"), ("AMX", "amx_tile"))
        extras = [name for name, flag in known if flag in flags]
        best = "AVX-512" + (f" ({', '.join(extras)})" if extras else "")
        return (
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            f"this CPU has {best}; PyTorch limited to AVX2",
        )
    if "avx2" in flags:
        return (
            {
                "ATEN_CPU_CAPABILITY": "default",
                "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            },
            "this CPU has AVX2 and no AVX-512; PyTorch limited to SSE4.1/4.2",
        )
    return {}, (
        "this CPU has neither AVX2 nor AVX-512 (or no /proc/cpuinfo): PyTorch's instruction set "
        "left as is"
    )


def main(argv: list[str]) -> int:
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = set()
    capped, described = capped_environment(flags)
    env = dict(os.environ, **capped, OMP_NUM_THREADS="1", **{ORT_VARIATION_ENV: "1"})
    print(
        f"numeric variation: {described}, 1 OpenMP thread; ONNX Runtime with 1 intra-op thread and "
        "basic graph optimizations. The unit tests must hold as on another CPU.",
        flush=True,
    )
    command = [sys.executable, "-m", "pytest", *TESTS, *(f"--deselect={p}" for p in SKIP),
               "-p", "no:cacheprovider", *argv]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
