#!/usr/bin/env bash
# The bench's peer: Bento (github.com/warpstreamlabs/bento, MIT), an independent stream
# processor, set up by bento.yaml here as an HTTP-to-Kafka bridge on 127.0.0.1.
#
#   peer.sh install  build Bento from the Go module proxy into the cache (first time only;
#                    about 15 minutes and 4 GB of modules on a 2-core machine)
#   peer.sh run      run it in the foreground (exec: the caller gets Bento's own pid)
#   peer.sh start    run it in the background; return once it is ready
#   peer.sh stop     stop it (SIGTERM, then SIGKILL after a grace period)
#   peer.sh status   say whether it runs; exit 0 if it does, 3 if not
#   peer.sh bin      print the path of the Bento binary (installing it first if needed)
#
# Settings (environment):
#   CAFE_PEER_PORT        HTTP port on 127.0.0.1 (8082)
#   CAFE_KAFKA_BOOTSTRAP  the Kafka it produces to (127.0.0.1:9092)
#   CAFE_PEER_HOME        cache and state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/peer)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Pinned: a bench figure names the release it measured.
version=v1.19.0
module=github.com/warpstreamlabs/bento
port=${CAFE_PEER_PORT:-8082}
home=${CAFE_PEER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cafe-gateway/peer}
bin=$home/bento-$version/bento
run=$home/run-$port
pidfile=$run/bento.pid

say() { echo "peer.sh: $*" >&2; }
# shellcheck source=deploy/stop.sh
. "$here/../stop.sh"

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

# The pid in $pidfile, if that process is alive and is our Bento.
peer_pid() {
    [ -f "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/exe" ] || return 1
    [ "$(readlink "/proc/$pid/exe")" = "$bin" ] || return 1
    echo "$pid"
}

run() {
    install
    export CAFE_PEER_PORT=$port
    export CAFE_KAFKA_BOOTSTRAP=${CAFE_KAFKA_BOOTSTRAP:-127.0.0.1:9092}
    exec "$bin" -c "$here/bento.yaml"
}

start() {
    local pid
    if pid=$(peer_pid); then
        say "already running on 127.0.0.1:$port (pid $pid)"
        return
    fi
    install
    mkdir -p "$run"
    # setsid: it outlives this shell and misses the Ctrl-C of a foreground job.
    setsid "$0" run </dev/null >"$run/bento.log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/ready" 2>/dev/null; then
            say "ready on 127.0.0.1:$port (pid $pid, Bento $version)"
            return
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$run/bento.log" >&2
    say "Bento did not become ready within 30s (log: $run/bento.log)"
    stop
    exit 1
}

stop() {
    local pid
    if ! pid=$(peer_pid); then
        rm -f "$pidfile"
        say "not running on 127.0.0.1:$port"
        return
    fi
    # Bento finishes what is in flight on SIGTERM; its own shutdown limit is 20 s.
    stop_process "$pid" 25 Bento
    rm -f "$pidfile"
    say "stopped"
}

status() {
    local pid
    if pid=$(peer_pid); then
        say "running on 127.0.0.1:$port (pid $pid, Bento $version)"
    else
        say "not running on 127.0.0.1:$port"
        exit 3
    fi
}

case "${1:-}" in
    install) install ;;
    run) run ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    bin) install && echo "$bin" ;;
    *)
        sed -n '2,16s/^# \{0,1\}//p' "$0" >&2
        exit 2
        ;;
esac
