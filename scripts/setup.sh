#!/usr/bin/env bash
# Set up MedSAM Agent in a virtual environment (.venv by default; MEDSAM_VENV overrides).
# Order matters: torch + torchvision first as a matching pair from the registry, then sam2
# built against that torch (no build isolation, no CUDA extension), then this package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEDSAM_VENV:-.venv}
PY=${PYTHON:-python3}  # PYTHON=/path/to/python3.12 picks another interpreter
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "MedSAM Agent needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1 || echo missing)." \
         "Install one (e.g. python3.12) and run: PYTHON=python3.12 bash scripts/setup.sh" >&2
    exit 2
  fi
  echo "Creating the virtual environment $VENV ..."
  "$PY" -m venv "$VENV" || { echo "Could not create $VENV (on Debian/Ubuntu: apt install python3-venv)." >&2; exit 2; }
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "Installing torch and torchvision (a matching pair; several GB on first install) ..."
  $PIP install --quiet "torch>=2.5.1" "torchvision>=0.20.1"
fi
if ! "$VENV/bin/python" -c "import sam2" 2>/dev/null; then
  echo "Installing sam2 against that torch ..."
  SAM2_BUILD_CUDA=0 $PIP install --quiet --no-build-isolation "sam2>=1.1.0"
fi
echo "Installing medsam-agent (editable) with its test tools ..."
$PIP install --quiet --no-build-isolation -e ".[test,slicer]"
"$VENV/bin/medsam-agent" --version
echo "Ready: source $VENV/bin/activate"
