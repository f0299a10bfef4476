#!/usr/bin/env bash
# Apache Kafka (KRaft) on loopback, from Maven Central: by default a single node (broker
# + controller in one JVM); with --nodes N, a cluster of N brokers and one controller.
#
#   kafka.sh up      resolve the jars (first time only), format storage (first time only),
#                    start the broker and return once it acknowledges a produced record
#   kafka.sh down    stop the broker cleanly (SIGTERM, then SIGKILL after a grace period)
#   kafka.sh destroy stop the broker and delete its data and logs (the jars stay)
#   kafka.sh status  say whether it runs; exit 0 if it does, 3 if not
#   kafka.sh fetch   only resolve the jars into the cache
#   kafka.sh logs    print the tail of the broker log
#   kafka.sh acls -- ARGS...
#                    run Kafka's ACL command (kafka-acls) with ARGS against the node's
#                    PLAINTEXT listener, as a super user; for a node started with --secure,
#                    e.g. kafka.sh acls -- --add --allow-principal User:gateway \
#                                          --operation Write --operation Describe --topic T
#   kafka.sh configs -- ARGS...
#                    the same with Kafka's config command (kafka-configs), e.g. a SCRAM
#                    user's new password: kafka.sh configs -- --alter --entity-type users \
#                    --entity-name gateway --add-config 'SCRAM-SHA-512=[password=...]'
#
#   --secure         (up, fetch; single node only) a node that also has SASL_SSL, SSL (mutual
#                    TLS) and SASL_PLAINTEXT listeners, the users admin and gateway (PLAIN,
#                    SCRAM-SHA-256/512; OAUTHBEARER takes unsigned tokens) and ACLs, for tests
#                    of the gateway's Kafka security (see secure.properties.in). PLAINTEXT
#                    stays open to all. The first up makes the test CAs, certificates and
#                    passwords; every up writes the listeners' addresses and the files'
#                    paths to CAFE_KAFKA_HOME/run-PORT/secure/client.env and prints that
#                    path. down, destroy, status and logs act on the port's node, --secure
#                    or not.
#   --nodes N        (up, down, destroy, status, logs) act on a cluster instead: N brokers
#                    on client ports CAFE_KAFKA_PORT .. +N-1 and a KRaft controller of
#                    their own, each in its own JVM. up starts the nodes that are not
#                    running and returns once every broker is in sync and a record is
#                    acknowledged; status prints "NAME HOST:PORT PID" (PID - if down) for
#                    each node and exits 0 only if all run; down stops them all.
#
# up and down are idempotent. Jars, data and logs live outside the repository.
# Settings (environment):
#   CAFE_KAFKA_PORT             client port on 127.0.0.1 (9092); a cluster's first broker
#   CAFE_KAFKA_CONTROLLER_PORT  KRaft controller port (client port + 1; with --nodes N,
#                               client port + N)
#   CAFE_KAFKA_HOME             cache and state root (${XDG_CACHE_HOME:-~/.cache}/cafe-gateway/kafka)
#   CAFE_KAFKA_HEAP             JVM heap flags (-Xms256m -Xmx512m; per node with --nodes:
#                               -Xms128m -Xmx256m)
#   CAFE_KAFKA_START_TIMEOUT    seconds to wait for the first acknowledged record (120)
#   CAFE_KAFKA_SASL_SSL_PORT    with --secure: the SASL_SSL port (client port + 2)
#   CAFE_KAFKA_SSL_PORT         with --secure: the SSL (mutual TLS) port (client port + 3)
#   CAFE_KAFKA_SASL_PLAINTEXT_PORT  with --secure: the SASL_PLAINTEXT port (client port + 4)
#   CAFE_KAFKA_CERT_TOOL        with --secure: what makes the certificates, openssl or keytool
#                               (openssl if installed, else the JDK's keytool)
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
# With --nodes: cluster.id (formatted into every node once), brokers (N, which a later
# `up` must match), and a directory per node (controller, broker-1 .. broker-N) holding
# its server.properties, data/, logs/ and kafka.pid.
cluster=$home/cluster-$port
# With --secure: the listeners that authenticate their clients, and the node's
# certificates, passwords and client.env (under $run: destroy deletes them too).
sasl_ssl_port=${CAFE_KAFKA_SASL_SSL_PORT:-$((port + 2))}
ssl_port=${CAFE_KAFKA_SSL_PORT:-$((port + 3))}
sasl_plaintext_port=${CAFE_KAFKA_SASL_PLAINTEXT_PORT:-$((port + 4))}
secure_dir=$run/secure
# Kafka's command-line tools (kafka-acls), which the broker itself does not need.
tools=$home/$version/tools

say() { echo "kafka.sh: $*" >&2; }
# shellcheck source=deploy/stop.sh
. "$here/../stop.sh"

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

# The pid in PIDFILE, if that process is alive and is the Kafka node run with PROPERTIES.
node_pid() {
    pid_running_as "$1" "kafka.Kafka $2"
}

broker_pid() { node_pid "$pidfile" "$run/server.properties"; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The tail of the logs in LOGS (the single node's by default).
show_log_tail() {
    local logs=${1:-$run/logs}
    say "last lines of $logs/server.log:"
    tail -n 40 "$logs/server.log" 2>/dev/null >&2 || true
    if [ -s "$logs/stdout.log" ]; then
        say "last lines of $logs/stdout.log:"
        tail -n 20 "$logs/stdout.log" >&2
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

# Kafka's command-line tools, for `acls`: only the kafka-tools jar, without its
# dependencies (Kafka Connect, Jetty ...): what its ACL command uses is in $libs already.
fetch_tools() {
    if [ -f "$tools/.complete" ]; then
        return
    fi
    command -v mvn >/dev/null || { say "mvn not found: install Maven to resolve the Kafka jars"; exit 1; }
    say "resolving Apache Kafka's tools $version from Maven Central into $tools"
    local tmp=$tools.partial
    rm -rf "$tmp"
    mkdir -p "$tmp"
    mvn -B -f "$here/pom.xml" dependency:copy -Dartifact="org.apache.kafka:kafka-tools:$version" \
        -DoutputDirectory="$tmp" >"$home/mvn-tools.log" 2>&1 || {
        tail -n 30 "$home/mvn-tools.log" >&2
        say "resolving kafka-tools failed (full log: $home/mvn-tools.log)"
        exit 1
    }
    rm -rf "$tools"
    mv "$tmp" "$tools"
    touch "$tools/.complete"
}

# Waits for BOOTSTRAP's cluster of BROKERS brokers to acknowledge a record (see
# Probe.java), failing early if one of the PIDs exits. The probe is compiled once per
# change of Probe.java, against the broker's client jars.
probe() {
    local java=$1 timeout=$2 bootstrap=$3 brokers=$4
    shift 4
    local classes=$home/$version/probe
    if [ ! -f "$classes/Probe.class" ] || [ "$here/Probe.java" -nt "$classes/Probe.class" ]; then
        mkdir -p "$classes"
        "$(dirname "$java")/javac" -nowarn -cp "$libs/*" -d "$classes" "$here/Probe.java"
    fi
    "$java" -Xmx64m -cp "$classes:$libs/*" Probe "$bootstrap" "$timeout" "$brokers" "$@"
}

# A KRaft cluster id is 16 random bytes in URL-safe base64 without padding. One that
# starts with "-" would be read as an option by the storage tool (as Kafka's own
# Uuid.randomUuid knows): draw again.
new_cluster_id() {
    local cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c 1-22)
    done
    echo "$cluster_id"
}

# Formats the log dirs of the node configured by PROPERTIES as a member of CLUSTER_ID;
# ARGS go to the storage tool's format command too.
format_node() {
    local java=$1 properties=$2 logs=$3 cluster_id=$4
    shift 4
    "$java" -Xmx128m -Dlog4j2.configurationFile="$here/log4j2.properties" \
        -Dkafka.logs.dir="$logs" -cp "$libs/*" kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$properties" "$@" >"$logs/format.log" 2>&1 || {
        say "formatting storage failed:"
        cat "$logs/format.log" >&2
        return 1
    }
}

format_storage() {
    local java=$1
    mkdir -p "$run/data" "$run/logs"
    # With --secure it holds passwords: for this user only.
    (
        umask 077
        {
            sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
                -e "s|@DATA_DIR@|$run/data|g" "$here/server.properties.in"
            if [ -n "$secure" ]; then
                sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
                    -e "s|@SASL_SSL_PORT@|$sasl_ssl_port|g" -e "s|@SSL_PORT@|$ssl_port|g" \
                    -e "s|@SASL_PLAINTEXT_PORT@|$sasl_plaintext_port|g" \
                    -e "s|@SECURE_DIR@|$secure_dir|g" \
                    -e "s|@ADMIN_PASSWORD@|$(cat "$secure_dir/admin.password")|g" \
                    -e "s|@GATEWAY_PASSWORD@|$(cat "$secure_dir/gateway.password")|g" \
                    "$here/secure.properties.in"
            fi
        } >"$run/server.properties.partial"
    )
    mv "$run/server.properties.partial" "$run/server.properties"
    if [ -f "$run/data/meta.properties" ]; then
        return
    fi
    # SCRAM users live in the cluster metadata: the first records of a new cluster hold
    # them. (Their passwords show in the storage tool's command line for a second or two:
    # test passwords, on a machine of one's own.)
    local -a scram=()
    if [ -n "$secure" ]; then
        local user mechanism
        for user in admin gateway; do
            for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
                scram+=(--add-scram "$mechanism=[name=$user,password=$(cat "$secure_dir/$user.password")]")
            done
        done
    fi
    format_node "$java" "$run/server.properties" "$run/logs" "$(new_cluster_id)" "${scram[@]}" || exit 1
}

# A random password of 24 letters and digits: nothing to quote in a JAAS line, a sed
# replacement or the storage tool's --add-scram.
new_secret() {
    local secret=
    while [ ${#secret} -lt 24 ]; do
        secret=$secret$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    done
    echo "${secret:0:24}"
}

# The passwords and certificates of --secure, made at the node's first `up --secure` and
# kept until destroy. The storage holds the SCRAM users of the passwords it was formatted
# with: a node formatted without --secure, or whose passwords are gone, cannot be reused.
make_secrets() {
    local java=$1 user
    if [ -f "$run/data/meta.properties" ] &&
        { [ ! -s "$secure_dir/admin.password" ] || [ ! -s "$secure_dir/gateway.password" ]; }; then
        say "the node in $run was formatted without --secure (or its passwords are gone):" \
            "kafka.sh destroy first"
        exit 1
    fi
    mkdir -p "$secure_dir"
    chmod 700 "$secure_dir"
    for user in admin gateway; do
        if [ ! -s "$secure_dir/$user.password" ]; then
            (umask 077 && new_secret >"$secure_dir/$user.password.partial")
            mv "$secure_dir/$user.password.partial" "$secure_dir/$user.password"
        fi
    done
    [ -f "$secure_dir/.certificates" ] || make_certificates "$java"
}

# The test certificates of --secure, in $secure_dir:
#   ca.pem                    the test CA, the only one the broker trusts for clients
#   broker.pem, broker.key    the broker's certificate (signed by the test CA, for localhost
#                             and 127.0.0.1) and key; broker-keystore.pem holds both
#   gateway.pem, gateway.key  a client certificate CN=gateway of the test CA: User:gateway
#   other-ca.pem              a second CA, which the broker does not trust
#   other.pem, other.key      a client certificate CN=gateway of the second CA: refused
# EC P-256 keys, unencrypted (PKCS#8 PEM, as both the JDK and Python's ssl read them).
# Made by openssl if installed, else by the JDK's keytool (CAFE_KAFKA_CERT_TOOL chooses);
# the CAs' keys are thrown away: nothing signs with them afterwards.
make_certificates() {
    local java=$1 tool=${CAFE_KAFKA_CERT_TOOL:-}
    if [ -z "$tool" ]; then
        tool=keytool
        if command -v openssl >/dev/null; then
            tool=openssl
        fi
    fi
    # Read by keytool_ca and keytool_leaf.
    local keytool storepass
    keytool=$(dirname "$java")/keytool
    storepass=$(new_secret)
    case $tool in
        openssl | keytool) ;;
        *)
            say "CAFE_KAFKA_CERT_TOOL is openssl or keytool, not '$tool'"
            exit 1
            ;;
    esac
    local tmp=$secure_dir/certificates.partial log=$secure_dir/certificates.log
    rm -rf "$tmp"
    mkdir "$tmp"
    say "making the test certificates with $tool"
    # errexit does not apply inside a command whose failure is handled: each step
    # returns its own failure.
    (
        cd "$tmp" && umask 077 &&
            "${tool}_ca" ca "cafe-gateway test CA" &&
            "${tool}_leaf" broker localhost ca server &&
            "${tool}_leaf" gateway gateway ca client &&
            "${tool}_ca" other-ca "cafe-gateway other test CA" &&
            "${tool}_leaf" other gateway other-ca client &&
            if [ "$tool" = keytool ]; then
                "$java" -Xmx64m "$here/PemKey.java" "$storepass" broker gateway other
            fi &&
            cat broker.key broker.pem >broker-keystore.pem &&
            rm -f ./*.p12 ca.key other-ca.key
    ) >"$log" 2>&1 || {
        cat "$log" >&2
        say "making the test certificates with $tool failed"
        exit 1
    }
    mv "$tmp"/* "$secure_dir"/
    rmdir "$tmp"
    rm "$log"
    touch "$secure_dir/.certificates"
}

# A CA certificate NAME.pem with its key NAME.key, for the subject CN.
openssl_ca() {
    local name=$1 cn=$2
    openssl req -x509 -new -config "$here/certs.cnf" -extensions ca -newkey ec \
        -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" -out "$name.pem" \
        -days 3650 -subj "/O=cafe-gateway local Kafka/CN=$cn"
}

# A certificate NAME.pem and its key NAME.key for the subject CN, signed by the CA in
# CA.pem and CA.key, with the extensions of KIND (server or client, see certs.cnf).
openssl_leaf() {
    local name=$1 cn=$2 ca=$3 kind=$4
    openssl req -new -config "$here/certs.cnf" -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -nodes -keyout "$name.key" -out "$name.csr" -subj "/O=cafe-gateway local Kafka/CN=$cn" &&
        openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$here/certs.cnf" \
            -extensions "$kind" -out "$name.pem" &&
        rm "$name.csr"
}

# The same with keytool: keys in PKCS#12 keystores NAME.p12 (alias NAME, password
# $storepass), which PemKey.java turns into PEM keys at the end.
keytool_ca() {
    local name=$1 cn=$2
    "$keytool" -genkeypair -keystore "$name.p12" -storetype PKCS12 -storepass "$storepass" \
        -alias "$name" -keyalg EC -groupname secp256r1 -validity 3650 \
        -dname "CN=$cn,O=cafe-gateway local Kafka" -ext bc:c=ca:true -ext ku:c=keyCertSign,cRLSign &&
        "$keytool" -exportcert -rfc -keystore "$name.p12" -storepass "$storepass" -alias "$name" \
            -file "$name.pem"
}

keytool_leaf() {
    local name=$1 cn=$2 ca=$3 kind=$4
    local -a ext=(-ext bc:c=ca:false -ext ku:c=digitalSignature)
    if [ "$kind" = server ]; then
        ext+=(-ext eku=serverAuth -ext san=dns:localhost,ip:127.0.0.1)
    else
        ext+=(-ext eku=clientAuth)
    fi
    "$keytool" -genkeypair -keystore "$name.p12" -storetype PKCS12 -storepass "$storepass" \
        -alias "$name" -keyalg EC -groupname secp256r1 -validity 825 \
        -dname "CN=$cn,O=cafe-gateway local Kafka" &&
        "$keytool" -certreq -keystore "$name.p12" -storepass "$storepass" -alias "$name" \
            -file "$name.csr" &&
        "$keytool" -gencert -keystore "$ca.p12" -storepass "$storepass" -alias "$ca" -rfc \
            -infile "$name.csr" -outfile "$name.pem" -validity 825 "${ext[@]}" &&
        rm "$name.csr"
}

# Writes $secure_dir/client.env: where clients of the --secure node find its listeners and
# the files to authenticate with, as shell KEY=value lines.
write_client_env() {
    local env=$secure_dir/client.env
    {
        echo "# Written by kafka.sh up --secure: this node's listeners and test credentials."
        printf '%s=%q\n' \
            PLAINTEXT_BOOTSTRAP "127.0.0.1:$port" \
            SASL_SSL_BOOTSTRAP "127.0.0.1:$sasl_ssl_port" \
            SSL_BOOTSTRAP "127.0.0.1:$ssl_port" \
            SASL_PLAINTEXT_BOOTSTRAP "127.0.0.1:$sasl_plaintext_port" \
            SASL_MECHANISMS "PLAIN SCRAM-SHA-256 SCRAM-SHA-512 OAUTHBEARER" \
            CA_FILE "$secure_dir/ca.pem" \
            CLIENT_CERT_FILE "$secure_dir/gateway.pem" \
            CLIENT_KEY_FILE "$secure_dir/gateway.key" \
            OTHER_CA_FILE "$secure_dir/other-ca.pem" \
            OTHER_CLIENT_CERT_FILE "$secure_dir/other.pem" \
            OTHER_CLIENT_KEY_FILE "$secure_dir/other.key" \
            ADMIN_USER admin \
            ADMIN_PASSWORD_FILE "$secure_dir/admin.password" \
            GATEWAY_USER gateway \
            GATEWAY_PASSWORD_FILE "$secure_dir/gateway.password"
    } >"$env.partial"
    mv "$env.partial" "$env"
    say "client settings (listeners, certificates, passwords): $env"
}

# Starts, in the background, the Kafka node configured by PROPERTIES with HEAP (JVM
# flags), logging into LOGS; writes its pid to PIDFILE.
launch() {
    local java=$1 heap=$2 properties=$3 logs=$4 pidfile=$5
    # setsid: the broker outlives the shell that started it and does not receive the
    # Ctrl-C meant for a gateway running in the foreground of the same terminal.
    # G1 with a short pause goal keeps produce latency steady on a small heap.
    # shellcheck disable=SC2086
    setsid "$java" $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$logs" \
        -cp "$libs/*" kafka.Kafka "$properties" \
        </dev/null >"$logs/stdout.log" 2>&1 &
    echo "$!" >"$pidfile"
}

up() {
    local java pid
    java=$(java_bin)
    if pid=$(broker_pid); then
        if [ -n "$secure" ] && [ ! -f "$secure_dir/client.env" ]; then
            say "the node on 127.0.0.1:$port (pid $pid) runs without --secure;" \
                "kafka.sh destroy it first, or set CAFE_KAFKA_PORT to use another port"
            exit 1
        fi
        if probe "$java" 30 "127.0.0.1:$port" 1 "$pid"; then
            say "already running on 127.0.0.1:$port (pid $pid)"
            [ -z "$secure" ] || write_client_env
            return
        fi
        show_log_tail
        say "broker pid $pid runs but does not accept produce requests"
        exit 1
    fi
    if [ -z "$secure" ] && [ -d "$secure_dir" ]; then
        say "the node in $run was set up with --secure: kafka.sh up --secure, or kafka.sh" \
            "destroy first"
        exit 1
    fi
    if [ "$port" = "$controller_port" ]; then
        say "the client and controller ports are both $port; set CAFE_KAFKA_CONTROLLER_PORT"
        exit 1
    fi
    local -a ports=("$port" "$controller_port")
    if [ -n "$secure" ]; then
        ports+=("$sasl_ssl_port" "$ssl_port" "$sasl_plaintext_port")
        if [ "$(printf '%s\n' "${ports[@]}" | sort -u | wc -l)" -ne ${#ports[@]} ]; then
            say "two of the node's ports are the same: client $port, controller" \
                "$controller_port, SASL_SSL $sasl_ssl_port, SSL $ssl_port, SASL_PLAINTEXT" \
                "$sasl_plaintext_port (see the settings in kafka.sh)"
            exit 1
        fi
    fi
    local hint="set CAFE_KAFKA_PORT to use another port"
    if [ -n "$secure" ]; then
        hint="$hint (or the setting of that listener's port, see kafka.sh)"
    fi
    for p in "${ports[@]}"; do
        if port_in_use "$p"; then
            say "127.0.0.1:$p is taken by another process; $hint"
            exit 1
        fi
    done
    fetch
    if [ -n "$secure" ]; then
        # Now rather than at the first `acls`, which may be a test's, offline.
        fetch_tools
        make_secrets "$java"
    fi
    format_storage "$java"
    local others=
    if [ -n "$secure" ]; then
        others=" (SASL_SSL: $sasl_ssl_port, SSL: $ssl_port, SASL_PLAINTEXT: $sasl_plaintext_port)"
    fi
    say "starting Apache Kafka $version on 127.0.0.1:$port$others (logs: $run/logs)"
    launch "$java" "$heap" "$run/server.properties" "$run/logs" "$pidfile"
    pid=$(cat "$pidfile")
    if probe "$java" "$start_timeout" "127.0.0.1:$port" 1 "$pid"; then
        # Every listener opens at once, before the first produce request is answered.
        for p in "${ports[@]:2}"; do
            if ! port_in_use "$p"; then
                show_log_tail
                say "the broker answers on 127.0.0.1:$port but not on 127.0.0.1:$p; stopping it"
                stop_pid "$pid" "$pidfile"
                exit 1
            fi
        done
        say "ready on 127.0.0.1:$port (pid $pid)"
        [ -z "$secure" ] || write_client_env
        return
    fi
    show_log_tail
    say "broker did not accept a produce request (waited up to ${start_timeout}s); stopping it"
    stop_pid "$pid" "$pidfile"
    exit 1
}

# Stops PID (SIGTERM, SIGKILL after 30 s) and removes PIDFILE.
stop_pid() {
    # A controlled shutdown of one node takes a few seconds; past 30 s it is stuck.
    stop_process "$1" 30 Kafka
    rm -f "$2"
}

down() {
    local pid
    if pid=$(broker_pid); then
        say "stopping broker on 127.0.0.1:$port (pid $pid)"
        stop_pid "$pid" "$pidfile"
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
        if [ -f "$secure_dir/client.env" ]; then
            say "with SASL_SSL, SSL and SASL_PLAINTEXT listeners: see $secure_dir/client.env"
        fi
    else
        say "not running on 127.0.0.1:$port"
        exit 3
    fi
}

# One of Kafka's tools (CLASS: AclCommand, what kafka-acls.sh runs, or ConfigCommand)
# with ARGS, against the node's PLAINTEXT listener: its clients are super users (see
# secure.properties.in).
tool() {
    local class=$1 java
    shift
    java=$(java_bin)
    if ! broker_pid >/dev/null; then
        say "not running on 127.0.0.1:$port; start it with kafka.sh up --secure"
        exit 1
    fi
    if [ ! -d "$secure_dir" ]; then
        say "the node on 127.0.0.1:$port runs without --secure: it has no ACLs to manage"
        exit 1
    fi
    fetch_tools
    "$java" -Xmx128m -Dlog4j2.configurationFile="$here/tools-log4j2.properties" \
        -cp "$libs/*:$tools/*" "org.apache.kafka.tools.$class" \
        --bootstrap-server "127.0.0.1:$port" "$@"
}

# The cluster's nodes, controller first: the brokers register with it as they start.
cluster_nodes() {
    echo controller
    seq -f 'broker-%g' 1 "$nodes"
}

node_port() {
    case $1 in
        controller) echo "$controller_port" ;;
        broker-*) echo $((port + ${1#broker-} - 1)) ;;
    esac
}

# The brokers' client ports, for messages: 9092-9094.
broker_ports() {
    if [ "$nodes" -gt 1 ]; then
        echo "$port-$((port + nodes - 1))"
    else
        echo "$port"
    fi
}

cluster_node_pid() { node_pid "$cluster/$1/kafka.pid" "$cluster/$1/server.properties"; }

cluster_bootstrap() {
    local bootstrap i
    bootstrap=127.0.0.1:$port
    for i in $(seq 2 "$nodes"); do
        bootstrap=$bootstrap,127.0.0.1:$((port + i - 1))
    done
    echo "$bootstrap"
}

# Writes the server.properties of NODE (controller or broker-I) from its template.
write_node_properties() {
    local name=$1 dir=$cluster/$1 template=broker id=${1#broker-}
    if [ "$name" = controller ]; then
        template=controller id=0
    fi
    local replication=$((nodes < 3 ? nodes : 3))
    mkdir -p "$dir/data" "$dir/logs"
    sed -e "s|@NODE_ID@|$id|g" -e "s|@PORT@|$(node_port "$name")|g" \
        -e "s|@CONTROLLER_PORT@|$controller_port|g" -e "s|@DATA_DIR@|$dir/data|g" \
        -e "s|@REPLICATION@|$replication|g" \
        -e "s|@INTERNAL_MIN_ISR@|$((replication < 2 ? replication : 2))|g" \
        "$here/$template.properties.in" >"$dir/server.properties"
}

cluster_up() {
    local java name pid
    java=$(java_bin)
    if [ -f "$cluster/brokers" ] && [ "$(cat "$cluster/brokers")" != "$nodes" ]; then
        say "$cluster holds a cluster of $(cat "$cluster/brokers") brokers, not $nodes;" \
            "kafka.sh destroy --nodes $(cat "$cluster/brokers") first"
        exit 1
    fi
    local -a starting=()
    for name in $(cluster_nodes); do
        cluster_node_pid "$name" >/dev/null || starting+=("$name")
    done
    if [ ${#starting[@]} -gt 0 ]; then
        if [ "$controller_port" -ge "$port" ] && [ "$controller_port" -lt $((port + nodes)) ]; then
            say "the controller port $controller_port is a broker's ($(broker_ports));" \
                "set CAFE_KAFKA_CONTROLLER_PORT"
            exit 1
        fi
        for name in "${starting[@]}"; do
            if port_in_use "$(node_port "$name")"; then
                say "127.0.0.1:$(node_port "$name"), the port of $name, is taken by another" \
                    "process; set CAFE_KAFKA_PORT (brokers: $(broker_ports)) or" \
                    "CAFE_KAFKA_CONTROLLER_PORT ($controller_port) to use other ports"
                exit 1
            fi
        done
        fetch
        mkdir -p "$cluster"
        [ -s "$cluster/cluster.id" ] || new_cluster_id >"$cluster/cluster.id"
        echo "$nodes" >"$cluster/brokers"
        # Formatting starts a JVM per node: side by side, their start-ups overlap.
        local -a formatting=()
        for name in "${starting[@]}"; do
            write_node_properties "$name"
            if [ ! -f "$cluster/$name/data/meta.properties" ]; then
                format_node "$java" "$cluster/$name/server.properties" "$cluster/$name/logs" \
                    "$(cat "$cluster/cluster.id")" &
                formatting+=("$!")
            fi
        done
        for pid in "${formatting[@]}"; do
            wait "$pid" || exit 1
        done
        say "starting ${starting[*]} (Apache Kafka $version; brokers on" \
            "127.0.0.1:$(broker_ports), controller on 127.0.0.1:$controller_port; state in $cluster)"
        for name in "${starting[@]}"; do
            launch "$java" "$heap" "$cluster/$name/server.properties" "$cluster/$name/logs" \
                "$cluster/$name/kafka.pid"
        done
    fi
    # Every node's pid, including those just launched and maybe dead already: the probe
    # gives up as soon as one of them exits.
    local -a pids=()
    for name in $(cluster_nodes); do
        pids+=("$(cat "$cluster/$name/kafka.pid")")
    done
    local timeout=$start_timeout
    if [ ${#starting[@]} -eq 0 ]; then
        timeout=30
    fi
    if probe "$java" "$timeout" "$(cluster_bootstrap)" "$nodes" "${pids[@]}"; then
        say "ready: $nodes broker(s) on 127.0.0.1:$(broker_ports), controller on" \
            "127.0.0.1:$controller_port"
        return
    fi
    if [ ${#starting[@]} -gt 0 ]; then
        for name in "${starting[@]}"; do
            show_log_tail "$cluster/$name/logs"
        done
    else
        cluster_logs
    fi
    say "the cluster did not acknowledge a record with every broker in sync (waited up to" \
        "${timeout}s)"
    if [ ${#starting[@]} -gt 0 ]; then
        say "stopping the nodes this command started: ${starting[*]}"
        # In reverse, the controller last (see cluster_down).
        local i
        for ((i = ${#starting[@]} - 1; i >= 0; i--)); do
            name=${starting[i]}
            stop_pid "$(cat "$cluster/$name/kafka.pid")" "$cluster/$name/kafka.pid"
        done
    fi
    exit 1
}

# Stops the cluster's node in DIR if it runs.
stop_node() {
    local dir=$1 name pid
    name=$(basename "$dir")
    if pid=$(cluster_node_pid "$name"); then
        say "stopping $name on 127.0.0.1:$(node_port "$name") (pid $pid)"
        stop_pid "$pid" "$dir/kafka.pid"
    else
        rm -f "$dir/kafka.pid"
    fi
}

# Stops every node under $cluster, whatever --nodes says.
cluster_down() {
    local dir pid
    local -a stopping=()
    # The brokers first, side by side: a broker's controlled shutdown waits for the
    # controller to let it go.
    for dir in "$cluster"/broker-*; do
        if [ -d "$dir" ]; then
            stop_node "$dir" &
            stopping+=("$!")
        fi
    done
    for pid in "${stopping[@]}"; do
        wait "$pid"
    done
    if [ -d "$cluster/controller" ]; then
        stop_node "$cluster/controller"
    fi
    say "no node of the cluster on 127.0.0.1:$port runs"
}

cluster_destroy() {
    cluster_down
    rm -rf "$cluster"
    say "deleted $cluster"
}

cluster_status() {
    local name pid running=0 total=0
    for name in $(cluster_nodes); do
        total=$((total + 1))
        if pid=$(cluster_node_pid "$name"); then
            running=$((running + 1))
        else
            pid=-
        fi
        printf '%-10s 127.0.0.1:%-5s %s\n' "$name" "$(node_port "$name")" "$pid"
    done
    say "$running of $total nodes running (Apache Kafka $version; state in $cluster)"
    [ "$running" = "$total" ] || exit 3
}

cluster_logs() {
    local name
    for name in $(cluster_nodes); do
        show_log_tail "$cluster/$name/logs"
    done
}

usage() {
    sed -n '2,/^# up and down are idempotent/{/^# up and down/q;s/^# \{0,1\}//;p;}' "$0" >&2
    exit 2
}

command=${1:-}
[ $# -eq 0 ] || shift
nodes=
secure=
# What follows `--` goes to the ACL or config command as it is.
tool_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --secure)
            secure=1
            shift
            ;;
        --)
            [ "$command" = acls ] || [ "$command" = configs ] || usage
            shift
            tool_args=("$@")
            break
            ;;
        --nodes)
            [ $# -ge 2 ] || usage
            nodes=$2
            shift 2
            ;;
        --nodes=*)
            nodes=${1#--nodes=}
            shift
            ;;
        *) usage ;;
    esac
done
if [ -n "$nodes" ]; then
    if ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then
        say "--nodes wants a number of brokers, 1 or more, not '$nodes'"
        exit 2
    fi
    controller_port=${CAFE_KAFKA_CONTROLLER_PORT:-$((port + nodes))}
    # Four JVMs or more share the 2-core machine with the gateway and its load generator;
    # a few test topics fit in half the single node's heap.
    heap=${CAFE_KAFKA_HEAP:-"-Xms128m -Xmx256m"}
    if [ -n "$secure" ]; then
        say "--secure is for a single node, not --nodes"
        exit 2
    fi
fi

case "$command${nodes:+ --nodes}" in
    up) up ;;
    down) down ;;
    destroy) destroy ;;
    status) status ;;
    fetch | "fetch --nodes")
        fetch
        [ -z "$secure" ] || fetch_tools
        ;;
    logs) show_log_tail ;;
    acls) tool AclCommand "${tool_args[@]}" ;;
    configs) tool ConfigCommand "${tool_args[@]}" ;;
    "up --nodes") cluster_up ;;
    "down --nodes") cluster_down ;;
    "destroy --nodes") cluster_destroy ;;
    "status --nodes") cluster_status ;;
    "logs --nodes") cluster_logs ;;
    *) usage ;;
esac
