#!/usr/bin/env bash
# A bench peer: the Strimzi Kafka Bridge (github.com/strimzi/strimzi-kafka-bridge,
# Apache-2.0), a Java (Vert.x) HTTP-to-Kafka bridge, set up by strimzi.properties here.
#
#   strimzi.sh install  build the bridge from its source archive into the cache (first
#                       time only; a few minutes of Maven) or unpack a release archive
#   strimzi.sh run      run it in the foreground (exec: the caller gets the JVM's own pid)
#   strimzi.sh start    run it in the background; return once it is ready
#   strimzi.sh stop     stop it (SIGTERM, then SIGKILL after a grace period)
#   strimzi.sh status   say whether it runs; exit 0 if it does, 3 if not
#   strimzi.sh version  print the release it builds and runs
#
# Settings (environment):
#   CAFE_PEER_PORT        HTTP port on 127.0.0.1 (8083)
#   CAFE_KAFKA_BOOTSTRAP  the Kafka it produces to (127.0.0.1:9092)
#   CAFE_PEER_HOME        cache and state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/peer)
#   CAFE_STRIMZI_ARCHIVE  source archive (or the GitHub release kafka-bridge-VERSION.tar.gz)
#                         (../shared/peers/strimzi-kafka-bridge-0.33.1-src.tar.gz)
#   JAVA_HOME             the JDK (/usr/lib/jvm/java-17-openjdk-amd64 if it exists)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
product="the Strimzi Kafka Bridge"
# Pinned: a bench figure names the release it measured. 0.33.1 is the last release
# that builds on JDK 17 (shared/peers/README.md).
version=0.33.1
archive=${CAFE_STRIMZI_ARCHIVE:-$here/../../../shared/peers/strimzi-kafka-bridge-$version-src.tar.gz}
port=${CAFE_PEER_PORT:-8083}
home=${CAFE_PEER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cafe-gateway/peer}
dist=$home/strimzi-$version
launcher=$dist/bin/kafka_bridge_run.sh
run=$home/strimzi-run-$port
# The bridge closes nothing on SIGTERM (it has no shutdown hook of its own): the JVM
# exits within about 2 s, and requests still in flight go unanswered.
grace=10
usage=2,19
# shellcheck source=deploy/peer/common.sh
. "$here/common.sh"

# A fixed heap (-Xms = -Xmx): the JVM's default maximum is a quarter of the machine's
# memory and its heap grows in steps, so both RSS and GC work would depend on the host
# and on when a resize lands in a run. 512 MiB holds the bridge's working set with
# room: it opens one Kafka producer per HTTP connection (64 at the bench's most), each
# buffering at most the records in flight on that connection.
heap="-Xms512m -Xmx512m"

# JDK 17 unless JAVA_HOME names another; the bridge's own launcher runs `java` from
# PATH, hence PATH too.
use_jdk() {
    if [ -z "${JAVA_HOME:-}" ] && [ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java ]; then
        export JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64
    fi
    if [ -n "${JAVA_HOME:-}" ]; then
        export PATH=$JAVA_HOME/bin:$PATH
    fi
    command -v java >/dev/null || { say "no java found: install a JDK 17"; exit 1; }
}

# Unpacks $archive into DIR and prints the tree that holds the bridge (the archive's
# single top-level directory, if it has one).
unpack() {
    local dir=$1
    tar -xzf "$archive" -C "$dir" || return 1
    local top=("$dir"/*)
    if [ "${#top[@]}" -eq 1 ] && [ -d "${top[0]}" ]; then
        echo "${top[0]}"
    else
        echo "$dir"
    fi
}

install() {
    if [ -x "$launcher" ]; then
        return
    fi
    [ -f "$archive" ] || { say "no archive at $archive (set CAFE_STRIMZI_ARCHIVE)"; exit 1; }
    use_jdk
    local build=$home/strimzi-build-$version log=$home/strimzi-build.log tree
    rm -rf "$build" "$dist.partial"
    mkdir -p "$build"
    tree=$(unpack "$build") || { say "cannot unpack $archive"; exit 1; }
    # A release archive is the runnable distribution itself. A source tree has a bin/
    # too (the launcher, without libs/), so libs/ is what tells them apart.
    if [ -f "$tree/bin/kafka_bridge_run.sh" ] && [ -d "$tree/libs" ]; then
        [ -f "$tree/libs/io.strimzi.kafka-bridge-$version.jar" ] ||
            { say "$archive is not the bridge's release $version"; exit 1; }
        say "installing the Strimzi Kafka Bridge $version release into $dist"
        mv "$tree" "$dist.partial"
    elif [ -f "$tree/pom.xml" ]; then
        [ "$(cat "$tree/release.version" 2>/dev/null)" = "$version" ] ||
            { say "$archive is not the bridge's source of $version"; exit 1; }
        command -v mvn >/dev/null || { say "mvn not found: install Maven to build the bridge"; exit 1; }
        say "building the Strimzi Kafka Bridge $version into $dist (first time only)"
        # Only the runnable distribution is wanted: the style check, the javadoc and
        # source jars and the tests' compilation cost minutes of CPU and change no jar in
        # libs/. nice: the build must not disturb what else runs on the machine.
        (
            cd "$tree"
            nice -n 10 mvn -B -DskipTests -Dmaven.test.skip=true -Dcheckstyle.skip \
                -Dmaven.javadoc.skip=true -Dmaven.source.skip=true package
        ) >"$log" 2>&1 || {
            tail -n 30 "$log" >&2
            say "building the bridge failed (full log: $log)"
            exit 1
        }
        mv "$tree/target/kafka-bridge-$version/kafka-bridge-$version" "$dist.partial"
    else
        say "$archive holds neither the bridge's source (pom.xml) nor a release (bin/, libs/)"
        exit 1
    fi
    mv "$dist.partial" "$dist"
    rm -rf "$build"
}

running_as() { echo "io.strimzi.kafka.bridge.Application --config-file $run/strimzi.properties"; }

run() {
    install
    use_jdk
    mkdir -p "$run"
    # The bridge reads a plain Java properties file (no ${...} substitution), so the two
    # values that vary are appended to our settings here.
    {
        cat "$here/strimzi.properties"
        echo
        echo "http.port=$port"
        echo "kafka.bootstrap.servers=${CAFE_KAFKA_BOOTSTRAP:-127.0.0.1:9092}"
    } >"$run/strimzi.properties"
    # Warnings and errors only, like Bento: the bridge's own log4j2.properties logs two
    # INFO lines per request.
    cat >"$run/log4j2.properties" <<'EOF'
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yyyy-MM-dd HH:mm:ss} %-5p [%t] %c{1}:%L - %m%n
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = STDOUT
EOF
    export KAFKA_BRIDGE_LOG4J_OPTS="-Dlog4j2.configurationFile=file:$run/log4j2.properties"
    # The launcher takes JVM flags from JAVA_OPTS only (it has no KAFKA_HEAP_OPTS). The
    # collector is left to the JVM's choice: pinned to one CPU, as the bench runs each
    # peer, that is the serial collector.
    export JAVA_OPTS=$heap
    # Tracing takes bridge.tracing (unset in strimzi.properties) and OTEL_SERVICE_NAME;
    # dropping the latter too keeps a stray environment from turning it on.
    unset OTEL_SERVICE_NAME
    # The launcher is a /bin/sh script that execs java: the pid stays the JVM's.
    exec "$launcher" --config-file "$run/strimzi.properties"
}

peer_main "$@"
