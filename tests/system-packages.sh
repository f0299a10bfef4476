#!/usr/bin/env bash
# The Debian packages `make test` needs beyond the README's prerequisites, installed with
# apt when it runs as root; otherwise one line names the command, and it exits 1:
# - redis-server: the rate-limit tests run against Redis (deploy/redis/redis.sh), and
#   tests/integration/test_fleetlimit.py starts Redis servers of its own;
# - chromium: the browser tests (tests/integration/test_browser.py) drive /usr/bin/chromium.
# Idempotent: does nothing when both are there. `make test` runs it first; the browser
# tests' fixture runs it too if Chromium is missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "make test needs ${missing[*]}: as root, run: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
redis-server --version
/usr/bin/chromium --version
