#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, broker + controller) on loopback, from Maven Central.
#
#   kafka.sh up      resolve the jars (first time only), format storage (first time only),
#                    start the broker and return once it acknowledges a produced record
#   kafka.sh down    stop the broker cleanly (SIGTERM, then SIGKILL after a grace period)
#   kafka.sh destroy stop the broker and delete its data and logs (the jars stay)
#   kafka.sh status  say whether it runs; exit 0 if it does, 3 if not
#   kafka.sh fetch   only resolve the jars into the cache
#   kafka.sh logs    print the tail of the broker log
#
# up and down are idempotent. Jars, data and logs live outside the repository.
# Settings (environment):
#   CAFE_KAFKA_PORT             client port on 127.0.0.1 (9092)
#   CAFE_KAFKA_CONTROLLER_PORT  KRaft controller port (client port + 1)
#   CAFE_KAFKA_HOME             cache and state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/kafka)
#   CAFE_KAFKA_HEAP             JVM heap flags (-Xms256m -Xmx512m)
#   CAFE_KAFKA_START_TIMEOUT    seconds to wait for the first acknowledged record (120)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${CAFE_KAFKA_PORT:-9092}
controller_port=${CAFE_KAFKA_CONTROLLER_PORT:-$((port + 1))}
home=${CAFE_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cafe-gateway/kafka}
# A small heap is plenty for one node with a few topics, and leaves the shared
# 2-core machine's memory to the gateway and the load generator.
heap=${CAFE_KAFKA_HEAP:-"-Xms256m -Xmx512m"}
start_timeout=${CAFE_KAFKA_START_TIMEOUT:-120}

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
libs=$home/$version/libs
run=$home/run-$port
pidfile=$run/broker.pid

say() { echo "kafka.sh: $*" >&2; }

java_bin() {
    local java
    java=$(command -v "${JAVA_HOME:+$JAVA_HOME/bin/}java") || { say "no java found: install a JDK >= 17"; exit 1; }
    local major
    major=$("$java" -XshowSettings:properties -version 2>&1 |
        sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
    if [ "${major:-0}" -lt 17 ]; then
        say "Kafka $version needs Java >= 17; $java is Java ${major:-unknown}"
        exit 1
    fi
    echo "$java"
}

# The pid in $pidfile, if that process is alive and is our broker.
broker_pid() {
    [ -f "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    [[ $cmdline == *"kafka.Kafka $run/server.properties"* ]] || return 1
    echo "$pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

show_log_tail() {
    say "last lines of $run/logs/server.log:"
    tail -n 40 "$run/logs/server.log" 2>/dev/null >&2 || true
    if [ -s "$run/logs/stdout.log" ]; then
        say "last lines of $run/logs/stdout.log:"
        tail -n 20 "$run/logs/stdout.log" >&2
    fi
}

fetch() {
    if [ -f "$libs/.complete" ]; then
        return
    fi
    command -v mvn >/dev/null || { say "mvn not found: install Maven to resolve the Kafka jars"; exit 1; }
    say "resolving Apache Kafka $version from Maven Central into $libs"
    local tmp=$libs.partial
    rm -rf "$tmp"
    mkdir -p "$tmp" "$home"
    mvn -B -f "$here/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$home/mvn.log" 2>&1 || {
        tail -n 30 "$home/mvn.log" >&2
        say "resolving the Kafka jars failed (full log: $home/mvn.log)"
        exit 1
    }
    rm -rf "$libs"
    mv "$tmp" "$libs"
    touch "$libs/.complete"
}

# The probe is compiled once per change of Probe.java, against the broker's client jars.
probe() {
    local java=$1 timeout=$2 pid=${3:-}
    local classes=$home/$version/probe
    if [ ! -f "$classes/Probe.class" ] || [ "$here/Probe.java" -nt "$classes/Probe.class" ]; then
        mkdir -p "$classes"
        "$(dirname "$java")/javac" -nowarn -cp "$libs/*" -d "$classes" "$here/Probe.java"
    fi
    "$java" -Xmx64m -cp "$classes:$libs/*" Probe "127.0.0.1:$port" "$timeout" $pid
}

format_storage() {
    local java=$1
    mkdir -p "$run/data" "$run/logs"
    sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
        -e "s|@DATA_DIR@|$run/data|g" "$here/server.properties.in" >"$run/server.properties"
    if [ -f "$run/data/meta.properties" ]; then
        return
    fi
    # A KRaft cluster id is 16 random bytes in URL-safe base64 without padding. One that
    # starts with "-" would be read as an option by the storage tool (as Kafka's own
    # Uuid.randomUuid knows): draw again.
    local cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c 1-22)
    done
    "$java" -Xmx128m -Dlog4j2.configurationFile="$here/log4j2.properties" \
        -Dkafka.logs.dir="$run/logs" -cp "$libs/*" kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$run/server.properties" >"$run/logs/format.log" 2>&1 || {
        say "formatting storage failed:"
        cat "$run/logs/format.log" >&2
        exit 1
    }
}

up() {
    local java pid
    java=$(java_bin)
    if pid=$(broker_pid); then
        if probe "$java" 30 "$pid"; then
            say "already running on 127.0.0.1:$port (pid $pid)"
            return
        fi
        show_log_tail
        say "broker pid $pid runs but does not accept produce requests"
        exit 1
    fi
    if [ "$port" = "$controller_port" ]; then
        say "the client and controller ports are both $port; set CAFE_KAFKA_CONTROLLER_PORT"
        exit 1
    fi
    for p in "$port" "$controller_port"; do
        if port_in_use "$p"; then
            say "127.0.0.1:$p is taken by another process; set CAFE_KAFKA_PORT to use another port"
            exit 1
        fi
    done
    fetch
    format_storage "$java"
    say "starting Apache Kafka $version on 127.0.0.1:$port (logs: $run/logs)"
    # setsid: the broker outlives the shell that started it and does not receive the
    # Ctrl-C meant for a gateway running in the foreground of the same terminal.
    # G1 with a short pause goal keeps produce latency steady on a small heap.
    # shellcheck disable=SC2086
    setsid "$java" $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$run/logs" \
        -cp "$libs/*" kafka.Kafka "$run/server.properties" \
        </dev/null >"$run/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    if probe "$java" "$start_timeout" "$pid"; then
        say "ready on 127.0.0.1:$port (pid $pid)"
        return
    fi
    show_log_tail
    say "broker did not accept a produce request (waited up to ${start_timeout}s); stopping it"
    stop_pid "$pid"
    exit 1
}

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    # A controlled shutdown of one node takes a few seconds; past 30 s it is stuck.
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "broker pid $pid ignored SIGTERM for 30s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

down() {
    local pid
    if pid=$(broker_pid); then
        say "stopping broker on 127.0.0.1:$port (pid $pid)"
        stop_pid "$pid"
        say "stopped"
    else
        rm -f "$pidfile"
        say "not running on 127.0.0.1:$port"
    fi
}

destroy() {
    down
    rm -rf "$run"
    say "deleted $run"
}

status() {
    local pid
    if pid=$(broker_pid); then
        say "running on 127.0.0.1:$port (pid $pid, Apache Kafka $version)"
    else
        say "not running on 127.0.0.1:$port"
        exit 3
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    destroy) destroy ;;
    status) status ;;
    fetch) fetch ;;
    logs) show_log_tail ;;
    *)
        sed -n '2,11s/^# \{0,1\}//p' "$0" >&2
        exit 2
        ;;
esac
