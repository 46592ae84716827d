#!/usr/bin/env bash
# Run the test suite. Fast unit tests and the slow ones (real backbone, real footage) alike.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
