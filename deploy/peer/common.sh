# Sourced by the bench's peer scripts (bento.sh, strimzi.sh): what they share, the
# subcommands that start, stop and report a peer. Each script sets, before sourcing:
#   product   its name in messages            version   the pinned release
#   port      its HTTP port on 127.0.0.1      run       its state directory
#   grace     seconds it gets to stop on SIGTERM before SIGKILL
#   usage     the line range of its header comment that `help` prints
# and defines `install` (build it, first time only), `run` (exec it in the foreground)
# and `running_as` (a string the command line of its running process holds).

pidfile=$run/peer.pid
log=$run/peer.log

say() { echo "$(basename "$0"): $*" >&2; }
# shellcheck source=deploy/stop.sh
. "$(dirname "${BASH_SOURCE[0]}")/../stop.sh"

# The pid in $pidfile, if that process is alive and is this peer.
peer_pid() { pid_running_as "$pidfile" "$(running_as)"; }

start() {
    local pid
    if pid=$(peer_pid); then
        say "already running on 127.0.0.1:$port (pid $pid)"
        return
    fi
    install
    mkdir -p "$run"
    # setsid: it outlives this shell and misses the Ctrl-C of a foreground job.
    setsid "$0" run </dev/null >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    # Both peers answer /ready with a 2xx once they serve HTTP.
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/ready" 2>/dev/null; then
            say "ready on 127.0.0.1:$port (pid $pid, $product $version)"
            return
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$log" >&2
    say "$product did not become ready within 30s (log: $log)"
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
    stop_process "$pid" "$grace" "$product"
    rm -f "$pidfile"
    say "stopped"
}

status() {
    local pid
    if pid=$(peer_pid); then
        say "running on 127.0.0.1:$port (pid $pid, $product $version)"
    else
        say "not running on 127.0.0.1:$port"
        exit 3
    fi
}

peer_main() {
    case "${1:-}" in
        install) install ;;
        run) run ;;
        start) start ;;
        stop) stop ;;
        status) status ;;
        version) echo "$version" ;;
        *)
            sed -n "${usage}s/^# \{0,1\}//p" "$0" >&2
            exit 2
            ;;
    esac
}
