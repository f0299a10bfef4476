# Sourced by deploy/kafka/kafka.sh and deploy/peer/common.sh, which define `say`.

# stop_process PID GRACE WHAT: SIGTERM, then SIGKILL if PID still runs after GRACE
# seconds (WHAT names it in that message). Returns once PID has exited or been killed.
stop_process() {
    local pid=$1 grace=$2 what=$3
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 10))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "$what pid $pid ignored SIGTERM for ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# pid_running_as PIDFILE TEXT: print the pid in PIDFILE if that process is alive and its
# command line holds TEXT (a pid, once its process is gone, may be another's).
pid_running_as() {
    local pidfile=$1 text=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" == *"$text"* ]] || return 1
    echo "$pid"
}
