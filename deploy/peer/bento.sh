#!/usr/bin/env bash
# A bench peer: Bento (github.com/warpstreamlabs/bento, MIT), an independent stream
# processor, set up by bento.yaml here as an HTTP-to-Kafka bridge on 127.0.0.1.
#
#   bento.sh install  build Bento from the Go module proxy into the cache (first time
#                     only; about 15 minutes and 4 GB of modules on a 2-core machine)
#   bento.sh run      run it in the foreground (exec: the caller gets Bento's own pid)
#   bento.sh start    run it in the background; return once it is ready
#   bento.sh stop     stop it (SIGTERM, then SIGKILL after a grace period)
#   bento.sh status   say whether it runs; exit 0 if it does, 3 if not
#   bento.sh version  print the release it builds and runs
#
# Settings (environment):
#   CAFE_PEER_PORT        HTTP port on 127.0.0.1 (8082)
#   CAFE_KAFKA_BOOTSTRAP  the Kafka it produces to (127.0.0.1:9092)
#   CAFE_PEER_HOME        cache and state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/peer)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
product=Bento
# Pinned: a bench figure names the release it measured.
version=v1.19.0
module=github.com/warpstreamlabs/bento
port=${CAFE_PEER_PORT:-8082}
home=${CAFE_PEER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cafe-gateway/peer}
bin=$home/bento-$version/bento
run=$home/bento-run-$port
# Bento finishes what is in flight on SIGTERM; its own shutdown limit is 20 s.
grace=25
usage=2,16
# shellcheck source=deploy/peer/common.sh
. "$here/common.sh"

install() {
    if [ -x "$bin" ]; then
        return
    fi
    command -v go >/dev/null || { say "go not found: install Go >= 1.26 to build Bento"; exit 1; }
    say "building Bento $version into $bin (first time only)"
    local build=$home/build-$version
    mkdir -p "$build" "$(dirname "$bin")"
    # Modules go to a GOPATH of our own (-modcacherw: plain rm -rf can remove it). Bento's
    # go.mod pins every dependency, so `go get` of the one release resolves the same set
    # each time; `go install pkg@version` would not do, as it asks the proxy for the
    # module's version list, which the proxy here does not serve.
    export GOPATH=$home/gopath GOFLAGS=-modcacherw
    (
        cd "$build"
        [ -f go.mod ] || go mod init cafe-gateway-peer >/dev/null 2>&1
        go get "$module/cmd/bento@$version"
        go build -trimpath -ldflags "-X main.Version=$version" -o "$bin.partial" \
            "$module/cmd/bento"
    ) >"$home/build.log" 2>&1 || {
        tail -n 30 "$home/build.log" >&2
        say "building Bento failed (full log: $home/build.log)"
        exit 1
    }
    mv "$bin.partial" "$bin"
}

running_as() { echo "$bin -c $here/bento.yaml"; }

run() {
    install
    export CAFE_PEER_PORT=$port
    export CAFE_KAFKA_BOOTSTRAP=${CAFE_KAFKA_BOOTSTRAP:-127.0.0.1:9092}
    exec "$bin" -c "$here/bento.yaml"
}

peer_main "$@"
