"""Where tritonserver and its python backend are, and the backend directory kiln gives it.

The binary is `binary`, else $KILN_TRITONSERVER, else the one in the nvidia-pytriton wheel. The
backend directory holds Triton's python backend with the stub of the running Python, plus every
kiln backend; the stub needs the wheel's vendored libraries on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from kiln.server.errors import BinaryNotFoundError

TRITONSERVER_ENV = "KILN_TRITONSERVER"
"""Environment variable overriding the tritonserver binary (a path)."""
PYTRITON_PACKAGE = "pytriton"
PYTRITON_DISTRIBUTION = "nvidia-pytriton==0.7.0"
INSTALL_HINT = f"pip install 'kiln[serve]' (or: pip install {PYTRITON_DISTRIBUTION})"
TRITON_SUBDIR = "tritonserver"
BINARY_RELPATH = Path("bin") / "tritonserver"
PYTHON_BACKEND_RELPATH = Path("backends") / "python"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUBS_RELPATH = Path("python_backend_stubs")
STUB_NAME = "triton_python_backend_stub"
PYTRITON_LIBS_DIRNAME = "nvidia_pytriton.libs"
"""The wheel's vendored shared libraries (libcudart, ...), beside the `pytriton` package.

The stub finds them through an RPATH relative to its own location in the wheel; the copy in our
backend directory needs them on LD_LIBRARY_PATH or it fails with "error while loading shared
libraries: libcudart-....so" and Triton waits for it forever.
"""
BACKEND_ENTRYPOINT = "model.py"


def pytriton_dir() -> Path | None:
    """Folder of the installed `pytriton` package, found without importing it."""
    spec = importlib.util.find_spec(PYTRITON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> Path:
    """The tritonserver binary: `binary`, else $KILN_TRITONSERVER, else the nvidia-pytriton one.

    Raises:
        BinaryNotFoundError: The chosen path is not an executable file, or nvidia-pytriton is
            not installed.
    """
    if binary is not None:
        source = "the binary argument"
    elif os.environ.get(TRITONSERVER_ENV):
        binary, source = os.environ[TRITONSERVER_ENV], f"${TRITONSERVER_ENV}"
    else:
        package = pytriton_dir()
        if package is None:
            raise BinaryNotFoundError(
                f"tritonserver not found: the {PYTRITON_DISTRIBUTION} package, which ships it, "
                f"is not installed; install it with {INSTALL_HINT}"
            )
        binary, source = package / TRITON_SUBDIR / BINARY_RELPATH, PYTRITON_DISTRIBUTION
    path = Path(binary)
    if not path.is_file():
        raise BinaryNotFoundError(
            f"tritonserver not found at {path} (from {source}); point {TRITONSERVER_ENV} at a "
            f"tritonserver binary or install it with {INSTALL_HINT}"
        )
    if not os.access(path, os.X_OK):
        raise BinaryNotFoundError(f"tritonserver at {path} (from {source}) is not executable")
    return path


def python_backend_root(binary: Path) -> Path:
    """The `tritonserver/` folder holding backends/python and the stubs for `binary`.

    A binary inside the wheel (or a copy of its layout) brings its own; any other binary uses
    the installed nvidia-pytriton's python backend.
    """
    own = binary.resolve().parent.parent
    if (own / PYTHON_BACKEND_RELPATH / PYTHON_BACKEND_FILES[0]).is_file():
        return own
    package = pytriton_dir()
    if package is None:
        raise BinaryNotFoundError(
            f"Triton's python backend not found beside {binary}, and {PYTRITON_DISTRIBUTION}, "
            f"which ships it, is not installed; install it with {INSTALL_HINT}"
        )
    return package / TRITON_SUBDIR


def _stub_path(triton_root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / STUBS_RELPATH / version / STUB_NAME
    if not stub.is_file():
        stubs_dir = triton_root / STUBS_RELPATH
        have = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise BinaryNotFoundError(
            f"no python backend stub for Python {version} in {stubs_dir} "
            f"(it has: {', '.join(have) or 'none'}); run kiln with one of those Pythons"
        )
    return stub


def backend_names(backends_dir: Path) -> tuple[str, ...]:
    """The kiln backends in `backends_dir`: its folders holding a BACKEND_ENTRYPOINT."""
    return tuple(
        sorted(p.name for p in backends_dir.iterdir() if (p / BACKEND_ENTRYPOINT).is_file())
    )


def assemble_backend_directory(
    target: Path, triton_root: Path, backends_dir: Path, backends: Iterable[str]
) -> None:
    """Fills `target` with `python/` (Triton's python backend + this Python's stub) and a copy
    of every kiln backend, the layout `--backend-directory` expects."""
    python_dir = target / "python"
    python_dir.mkdir(parents=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(triton_root / PYTHON_BACKEND_RELPATH / name, python_dir / name)
    shutil.copy2(_stub_path(triton_root), python_dir / STUB_NAME)  # copy2 keeps the exec bit
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in backends:
        shutil.copytree(backends_dir / name, target / name, ignore=ignore)


def triton_environment(triton_root: Path) -> dict[str, str]:
    """The environment tritonserver runs in: this Python first on PATH, the wheel's libraries
    on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    # The python backend stub runs model code with the first `python` on PATH: make it ours,
    # so backends import numpy, onnxruntime and kiln from this environment.
    env["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable)] + ([env["PATH"]] if env.get("PATH") else [])
    )
    libs = triton_root.parent.parent / PYTRITON_LIBS_DIRNAME
    if libs.is_dir():
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs)] + ([old] if old else []))
    return env
