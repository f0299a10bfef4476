#!/usr/bin/env bash
# Installs what the browser tests (tests/integration/test_browser.py) drive: Debian's
# headless-capable Chromium at /usr/bin/chromium. Idempotent: does nothing if it is there.
# Called by .ci/run before `make test`, and by the tests themselves if Chromium is missing.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "the browser tests need Chromium: run as root: apt-get install chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
