# Sourced by deploy/kafka/kafka.sh and deploy/peer/peer.sh, which define `say`.

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
