#!/usr/bin/env bash
# Create .venv (or the folder in $VENV) with PyTorch, torchvision and cmi_clip[dev].
#
# torch 2.14.1 and torchvision 0.29.1 are pinned together because open_clip_torch (a [dev] and
# [convert] dependency) imports torchvision, and a torchvision wheel only imports beside the torch
# release it was built for.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install --quiet -e ".[dev]"
echo "Installed cmi_clip into $VENV"
