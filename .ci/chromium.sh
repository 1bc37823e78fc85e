#!/usr/bin/env bash
# Chromium for tests/integration/test_html_report.py (report.html opened in a real headless browser):
# Debian's package, installed with apt when no `chromium` is on PATH. Idempotent: with chromium there,
# it only says so.
set -euo pipefail
PROG="$(basename "$0")"
if command -v chromium >/dev/null; then
    echo "$PROG: $(chromium --version 2>/dev/null || echo chromium) (kept as it is)"
    exit 0
fi
[[ "$(id -u)" == 0 ]] || { echo "$PROG: error: chromium is missing and this is not root: apt-get install -y --no-install-recommends chromium" >&2; exit 1; }
echo "$PROG: installing chromium with apt"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "$PROG: $(chromium --version 2>/dev/null || echo chromium) installed"
