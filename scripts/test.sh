#!/usr/bin/env bash
# Set up and run the test suite (the README's test command; CI runs it through .ci/run).
# Installs Debian's Chromium for the browser test when it is missing and this runs as root;
# without it that one test is skipped and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser test will be skipped"
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python -m pytest -q -rs "$@"
