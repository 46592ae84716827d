#!/usr/bin/env bash
# Run the test suite: fast unit tests and the slow ones (real backbone, real footage, a real
# S3 server, a real Airflow, Label Studio and a real browser) alike. The S3 tests start Ceph's
# RADOS gateway on 127.0.0.1 themselves; its Debian packages, Debian's Chromium and
# ChromeDriver for the browser test, and PostgreSQL and Redis for the distributed test are
# installed here when missing (as root, with apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v radosgw >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Ceph (radosgw) for the S3 tests"
  bash scripts/s3-server.sh install
fi
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Debian's chromium and chromium-driver for the browser test"
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }
fi
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing Debian's postgresql and redis-server for the distributed test"
  bash scripts/loopback-cluster.sh install
fi
exec .venv/bin/python -m pytest "$@"
