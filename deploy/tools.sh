#!/usr/bin/env bash
# Installs the tools that tests/test_deploy_*.py check deploy/ with, pinned to exact
# versions, and prints one line per tool: NAME PATH.
#
#   deploycheck           deploy/tools/deploycheck, built with Go from the module proxy
#                         (its go.mod and go.sum pin BuildKit's Dockerfile parser,
#                         compose-go and Prometheus' rule and PromQL parsers)
#   kubernetes-validate   the kubernetes-validate package from PyPI, with the
#                         Kubernetes JSON schemas it bundles; a directory for sys.path
#
# Everything lands in $CAFE_TOOLS_DIR (default ~/.cache/cafe-gateway/tools), Go's
# module and build caches included. Idempotent: a tool already there is not fetched
# again, so a warm run takes well under a second; a cold one needs the network (the
# Go module proxy and PyPI) and takes a minute or two, most of it compiling.
#
# Environment: PYTHON, the interpreter whose pip installs kubernetes-validate
# (default python3; the tests pass their own); GO, the go command (default: go on
# PATH, else /usr/local/go/bin/go).
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.37.0
IMPORTLIB_RESOURCES_VERSION=6.5.2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools=${CAFE_TOOLS_DIR:-$HOME/.cache/cafe-gateway/tools}
python=${PYTHON:-python3}
mkdir -p "$tools"

fail() {
    echo "deploy/tools.sh: $*" >&2
    exit 1
}

# deploycheck: the binary's name carries a hash of its sources and pins, so changing
# them builds a new one and an unchanged tree reuses the old.
build_deploycheck() {
    local src=$here/tools/deploycheck
    local hash bin go
    hash=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)
    bin=$tools/deploycheck-$hash
    if [ ! -x "$bin" ]; then
        go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
        [ -x "$go" ] || fail "deploycheck needs Go (go.mod asks for $(sed -n 's/^go //p' "$src/go.mod")); none found"
        echo "deploy/tools.sh: building deploycheck with $("$go" version)" >&2
        # -mod=readonly: go.sum must already pin every module; nothing is re-resolved.
        # -modcacherw: the module cache under $tools can be deleted with rm -rf.
        (
            cd "$src"
            export GOMODCACHE=$tools/go/mod GOCACHE=$tools/go/build
            export GOFLAGS="${GOFLAGS:-} -mod=readonly -modcacherw -buildvcs=false"
            "$go" build -trimpath -o "$bin.tmp.$$" .
        ) || fail "building deploycheck failed (it needs the Go module proxy on a cold cache)"
        mv -f "$bin.tmp.$$" "$bin"
        # Builds of earlier sources are of no further use.
        find "$tools" -maxdepth 1 -name 'deploycheck-*' ! -name "deploycheck-$hash" -delete
    fi
    echo "deploycheck $bin"
}

# kubernetes-validate, installed with --no-deps into a directory of its own: the
# libraries it needs (jsonschema, referencing, PyYAML, packaging, typing-extensions)
# are the test environment's, pinned by constraints.txt.
install_kubernetes_validate() {
    local dir=$tools/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION
    if [ ! -f "$dir/.installed" ]; then
        echo "deploy/tools.sh: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION" >&2
        rm -rf "$dir.tmp.$$"
        PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check \
            --no-deps --no-compile \
            --target "$dir.tmp.$$" \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
            "importlib-resources==$IMPORTLIB_RESOURCES_VERSION" \
            || fail "pip could not install kubernetes-validate (it needs PyPI on a cold cache)"
        touch "$dir.tmp.$$/.installed"
        rm -rf "$dir"
        mv "$dir.tmp.$$" "$dir"
    fi
    echo "kubernetes-validate $dir"
}

build_deploycheck
install_kubernetes_validate
