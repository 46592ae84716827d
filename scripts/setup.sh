#!/usr/bin/env bash
# Set up .venv with pinned dependencies (idempotent: a second run installs nothing).
#
# torch / torchvision are installed by pip first: on machines whose pip configuration
# points at local wheel folders (find-links), pip takes them from disk. uv then installs the
# rest from requirements.lock, given the same local folders, and sees torch already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 (pip)"
  $PIP install --quiet torch==2.14.1 torchvision==0.29.1
fi
if [ ! -x .venv/bin/uv ]; then
  $PIP install --quiet uv==0.13.8
fi

# Local wheel folders named by pip's configuration, if any, for uv too.
links=()
for key in global.find-links :env:.find-links; do
  val=$($PIP config get "$key" 2>/dev/null || true)
  for d in $val; do [ -d "$d" ] && links+=(--find-links "$d"); done
done

.venv/bin/uv pip install --quiet --python .venv/bin/python "${links[@]}" -r requirements.lock
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .

# vtest.avi (campus footage) comes from Debian's opencv-doc: optional, installed where we can.
VTEST=/usr/share/doc/opencv-doc/examples/data/vtest.avi
if [ ! -f "$VTEST" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's opencv-doc for vtest.avi"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null; }; then
    echo "setup: warning: opencv-doc not installed; the demo uses bikes.mp4 only" >&2
  fi
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
