#!/usr/bin/env bash
# Redis on loopback for the rate-limit tests and for `make test`: Debian's redis-server
# (as root: apt-get install redis-server), no persistence, its state outside the
# repository.
#
#   redis.sh up      start it and return once it answers PING
#   redis.sh down    stop it (SIGTERM, then SIGKILL after a grace period)
#   redis.sh status  say whether it runs; exit 0 if it does, 3 if not
#
# up and down are idempotent. Settings (environment):
#   CAFE_REDIS_PORT           port on 127.0.0.1 (6390: clear of a system Redis on 6379)
#   CAFE_REDIS_HOME           state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/redis)
#   CAFE_REDIS_START_TIMEOUT  seconds to wait for the first PONG (10)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${CAFE_REDIS_PORT:-6390}
home=${CAFE_REDIS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cafe-gateway/redis}
start_timeout=${CAFE_REDIS_START_TIMEOUT:-10}
# One directory per port, so a test's Redis on a port of its own leaves this one alone.
run=$home/run-$port
pidfile=$run/redis.pid
log=$run/redis.log

say() { echo "redis.sh: $*" >&2; }
# shellcheck source=deploy/stop.sh
. "$here/../stop.sh"

# Redis rewrites its command line to "redis-server 127.0.0.1:PORT" once it listens;
# "redis-server" alone also matches the moments before that.
redis_pid() { pid_running_as "$pidfile" redis-server; }

# True if whatever listens on the port answers an inline PING with +PONG (bash's
# /dev/tcp: no redis-cli needed, and a silent listener costs at most a second).
pong() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port"
        printf 'PING\r\n' >&3
        IFS= read -r -t 1 reply <&3
        [ "$reply" = $'+PONG\r' ]
    ) 2>/dev/null
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

show_log_tail() {
    say "last lines of $log:"
    tail -n 20 "$log" >&2 2>/dev/null || true
}

up() {
    local pid server
    if pid=$(redis_pid); then
        if pong; then
            say "already running on 127.0.0.1:$port (pid $pid)"
            return
        fi
        show_log_tail
        say "redis-server pid $pid runs but does not answer PING on 127.0.0.1:$port"
        exit 1
    fi
    server=$(command -v redis-server) || {
        say "redis-server not found: install Debian's Redis (as root: apt-get install redis-server)"
        exit 1
    }
    if port_in_use; then
        say "127.0.0.1:$port is taken by another process; set CAFE_REDIS_PORT to use another port"
        exit 1
    fi
    mkdir -p "$run"
    say "starting $("$server" --version | cut -d' ' -f1-3) on 127.0.0.1:$port (log: $log)"
    # setsid: Redis outlives the shell that started it and does not receive the Ctrl-C
    # meant for a process in the foreground of the same terminal (as kafka.sh does).
    # Loopback only, protected mode on top; no RDB snapshots and no AOF: the limiter's
    # buckets are soft state, and a test run should leave nothing on disk to reload.
    # No --logfile: it logs to stdout, which goes to $log with any start-up error.
    setsid "$server" --port "$port" --bind 127.0.0.1 --protected-mode yes \
        --save "" --appendonly no --dir "$run" --daemonize no \
        </dev/null >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    for _ in $(seq 1 $((start_timeout * 10))); do
        if pong; then
            say "ready on 127.0.0.1:$port (pid $pid)"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail
            say "redis-server exited before answering PING"
            rm -f "$pidfile"
            exit 1
        fi
        sleep 0.1
    done
    show_log_tail
    say "redis-server did not answer PING within ${start_timeout}s; stopping it"
    stop_process "$pid" 10 Redis
    rm -f "$pidfile"
    exit 1
}

down() {
    local pid
    if pid=$(redis_pid); then
        say "stopping Redis on 127.0.0.1:$port (pid $pid)"
        # Without persistence Redis exits at once on SIGTERM; 10 s means it is stuck.
        stop_process "$pid" 10 Redis
        rm -f "$pidfile"
        say "stopped"
    else
        rm -f "$pidfile"
        say "not running on 127.0.0.1:$port"
    fi
}

status() {
    local pid
    if pid=$(redis_pid); then
        say "running on 127.0.0.1:$port (pid $pid)"
    else
        say "not running on 127.0.0.1:$port"
        exit 3
    fi
}

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

[ $# -eq 1 ] || usage
case $1 in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
