"""`import kiln.clients` works with only tritonclient[http,grpc] and numpy installed.

The test builds a clean virtual environment, installs just those two (pip reaches the package
index the first time; the wheels are kept in a cache folder, so later runs install offline in
seconds), puts a copy of kiln's sources laid out as installed (`kiln/`, `clients/` as
`kiln/clients/`) on its path, and imports the SDK there: torch, onnx, onnxruntime, tensorrt,
pillow, and kiln's server-side packages must neither be needed nor be imported. It then makes a
client and a text generator (blocking and asyncio) of each protocol and calls them against a
closed port, which imports tritonclient's HTTP and gRPC transports (and aiohttp, which
tritonclient[http] brings) the way a service would.

Takes about 10 s with the wheel cache, 25-60 s without. Set KILN_WHEEL_CACHE to choose the cache
folder (default ~/.cache/kiln/client-sdk-wheels).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = ("tritonclient[http,grpc]==2.51.0", "numpy<2")
"""What the SDK needs: the same pins as kiln's core dependencies in pyproject.toml."""
CACHE_ENV = "KILN_WHEEL_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "kiln" / "client-sdk-wheels"
HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "PIL", "tokenizers", "kiln.serving", "kiln.build",
         "kiln.server", "kiln.spec")
"""Modules a service importing the SDK must not pay for."""
PIP_TIMEOUT_S = 300

PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    import kiln.clients
    from kiln.clients import AsyncTextGenerator, Client, ServerUnavailableError, ImageClassifier, TextGenerator
    after_import = sorted(sys.modules)
    results = {}

    async def generate(url):
        async with AsyncTextGenerator(url, timeout=5, retry=None) as generator:
            try:
                await generator.generate("hello")
            except ServerUnavailableError as error:
                return type(error).__name__

    for url in ("http://127.0.0.1:9", "grpc://127.0.0.1:9"):
        with Client(url, timeout=5, retry=None) as client:
            results[url] = client.is_live()
            try:
                client.infer("m", {"x": [[1.0]]}, validate=False)
            except ServerUnavailableError as error:
                results[url + " infer"] = type(error).__name__
        with TextGenerator(url, timeout=5, retry=None) as generator:
            try:
                list(generator.stream("hello"))
            except ServerUnavailableError as error:
                results[url + " stream"] = type(error).__name__
        results[url + " async generate"] = asyncio.run(generate(url))
    print(json.dumps({"after_import": after_import, "modules": sorted(sys.modules), "results": results,
                      "file": kiln.clients.__file__}))
    """
)


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=PIP_TIMEOUT_S
    )


def _install(python: Path, cache: Path) -> None:
    """Installs REQUIREMENTS from the wheel cache, filling it from the index when needed."""
    offline = ("install", "--quiet", "--no-index", "--find-links", str(cache), *REQUIREMENTS)
    if cache.is_dir() and _pip(python, *offline).returncode == 0:
        return
    cache.mkdir(parents=True, exist_ok=True)
    download = _pip(python, "download", "--quiet", "--dest", str(cache), *REQUIREMENTS)
    assert download.returncode == 0, (
        f"pip could not download {' '.join(REQUIREMENTS)} into {cache} (needs the package index once):\n"
        f"{download.stderr[-3000:]}"
    )
    installed = _pip(python, *offline)
    assert installed.returncode == 0, f"pip install from {cache} failed:\n{installed.stderr[-3000:]}"


def _copy_sources(site: Path) -> None:
    """kiln/ and clients/ laid out as pyproject.toml installs them (clients/ -> kiln/clients/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "kiln", site / "kiln", ignore=ignore)
    shutil.copytree(REPO / "clients", site / "kiln" / "clients", ignore=ignore)


def test_sdk_imports_with_only_tritonclient_and_numpy(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=PIP_TIMEOUT_S)
    python = venv / "bin" / "python"
    _install(python, Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))
    site = tmp_path / "site"
    _copy_sources(site)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [str(python), "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 0, f"import kiln.clients failed in a clean venv:\n{run.stderr[-4000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])

    assert report["file"].startswith(str(site)), "imported the repository's copy, not the clean one"
    for modules in (report["after_import"], report["modules"]):
        loaded = [m for m in HEAVY if m in modules or any(n.startswith(m + ".") for n in modules)]
        assert loaded == [], f"importing and using kiln.clients loaded {loaded}"
    assert report["results"] == {
        f"{url}{call}": False if not call else "ServerUnavailableError"
        for url in ("http://127.0.0.1:9", "grpc://127.0.0.1:9")
        for call in ("", " infer", " stream", " async generate")
    }
    # The check is only meaningful if the heavy packages are really absent there.
    listed = _pip(python, "list", "--format=json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "onnx", "onnxruntime", "tensorrt", "pillow", "tokenizers"}, names
