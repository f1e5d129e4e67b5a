"""scripts/numeric_variation.py: which instruction set the portability pass caps PyTorch at."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "numeric_variation.py"
_spec = importlib.util.spec_from_file_location("numeric_variation", SCRIPT)
assert _spec is not None and _spec.loader is not None
variation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variation)

AMX_XEON = "processor\t: 0\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_tile\n"
AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 fma\n"


def test_flags_come_from_the_first_cpu() -> None:
    text = AVX2_EPYC + "\nprocessor\t: 1\nflags\t\t: fpu avx512f\n"
    assert variation.cpu_flags(text) == {"fpu", "sse4_1", "sse4_2", "avx", "avx2", "fma"}
    assert variation.cpu_flags("no flags here") == set()


def test_an_avx512_cpu_runs_pytorch_at_avx2() -> None:
    env, described = variation.capped_environment(variation.cpu_flags(AMX_XEON))
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert described == "this CPU has AVX-512 (VNNI, BF16, AMX); PyTorch limited to AVX2"


def test_an_avx2_cpu_runs_pytorch_below_avx2() -> None:
    env, described = variation.capped_environment(variation.cpu_flags(AVX2_EPYC))
    assert env == {
        "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    }
    assert "no AVX-512" in described


def test_an_older_cpu_is_left_as_is() -> None:
    env, described = variation.capped_environment({"sse4_2"})
    assert env == {} and "left as is" in described
