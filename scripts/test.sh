#!/usr/bin/env bash
# Run the test suite: fast unit tests and the slow ones (real backbone, real footage, a real
# S3 server) alike. The S3 tests start Ceph's RADOS gateway on 127.0.0.1 themselves; its
# Debian packages are installed here when missing (as root, where apt-get exists).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v radosgw >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Ceph (radosgw) for the S3 tests"
  bash scripts/s3-server.sh install
fi
exec .venv/bin/python -m pytest "$@"
