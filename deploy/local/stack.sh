#!/usr/bin/env bash
# deploy/local/stack.sh: owns the local real stack that development and tests
# run against: one Apache Kafka 4.x node (KRaft, broker+controller) and one
# MongoDB-wire server: mongod when on PATH, else FerretDB over a private
# PostgreSQL cluster (Debian's postgresql), else FerretDB over SQLite.
# FerretDB's SQLite backend scans a whole collection for every query that is
# not by _id, which made presence lag 20 s behind 254 connects and left group
# fan-out "offline"; over PostgreSQL the same test syncs 254 connections in
# 2.5 s instead of 25 s and every live copy arrives. Over PostgreSQL, every
# start applies ferretdb-pg.sql (indexes FerretDB's queries can use; a
# property of this local stack only, see that file).
#
#   stack.sh fetch                      fetch/build into the cache, start nothing
#   stack.sh start [kafka|mongo|all]    fetch if needed, start, wait until ready
#   stack.sh stop  [kafka|mongo|all]    TERM the recorded pid, KILL after 20 s
#   stack.sh status                     exit 0 only if everything is up and ready
#   stack.sh destroy                    stop all, delete the run dir and its data
#   stack.sh wait  [kafka|mongo|all]    wait until ready (PARLEY_STACK_TIMEOUT)
#   stack.sh start --ha [...]           the same with PARLEY_KAFKA_NODES=3
#   stack.sh start --tls [...]          also TLS listeners (PARLEY_STACK_TLS=1)
#
# TLS (docs/operations.md, "Kafka and MongoDB security"): with
# PARLEY_STACK_TLS=1 (or --tls) a throwaway CA made by openssl signs a
# certificate for PARLEY_STACK_HOST (and 127.0.0.1), each Kafka node adds a SASL_SSL listener on its
# port + 5 (SASL PLAIN, user "parley" with a random password) and
# FerretDB a TLS listener on PARLEY_MONGO_PORT + 5; the plain listeners
# stay (the controller and the brokers among themselves use them).
# "$PARLEY_STACK_DIR/stack-tls.env" then holds the PARLEY_* settings that
# reach both over TLS. SCRAM is not offered: Debian 12's librdkafka (2.0.2)
# fails SCRAM against Kafka 4 (fixed in librdkafka 2.6.1).
#
# High availability (docs/high-availability.md): PARLEY_KAFKA_NODES=3 (or
# --ha) runs three Kafka nodes, each broker and controller of one static
# KRaft quorum, node n on PARLEY_KAFKA_PORT + 10(n-1) (controller likewise),
# topics with 3 replicas and min.insync.replicas=2, heaps of 384 MiB. Node 1
# is the component "kafka", nodes 2 and 3 "kafka2" and "kafka3" (stop
# kafka2 alone to lose one broker). stop/status/destroy find the nodes of
# the run dir by themselves.
#
# Environment (defaults):
#   PARLEY_CACHE ($HOME/.cache/parley)  jars, ferretdb, maven/go caches
#   PARLEY_STACK_DIR ($PARLEY_CACHE/run) data, logs, pid files, stack.env
#   PARLEY_KAFKA_PORT (19092), PARLEY_KAFKA_CONTROLLER_PORT (19093),
#   PARLEY_MONGO_PORT (27018), PARLEY_PG_PORT (PARLEY_MONGO_PORT - 1000),
#   PARLEY_FERRETDB_BACKEND (postgresql if installed, else sqlite),
#   PARLEY_KAFKA_PARTITIONS (8), PARLEY_KAFKA_NODES (1, or 3 as the run dir
#   was started with),
#   PARLEY_KAFKA_JVM_OPTS (none): more JVM options for each Kafka node
#   (e.g. -XX:TieredStopAtLevel=1: C1 only, see docs/benchmarks.md),
#   PARLEY_FERRETDB_POOL (180): FerretDB's PostgreSQL connections,
#   PARLEY_FERRETDB_DEBUG_ADDR (off): FerretDB's metrics and pprof address
#   (open cursors per collection: ferretdb_cursors_created_total minus
#   ferretdb_cursors_duration_seconds_count),
#   PARLEY_STACK_TIMEOUT (90 s), PARLEY_STACK_FRESH=1 wipes data on start,
#   PARLEY_STACK_HOST (127.0.0.1): the address Kafka's client listener and
#   the MongoDB-wire server bind and advertise (`make test-k8s` gives the
#   address its pods reach the node by; the controller and PostgreSQL stay
#   on loopback).
# After start, "$PARLEY_STACK_DIR/stack.env" holds PARLEY_KAFKA_BROKERS,
# PARLEY_KAFKA_REPLICATION and PARLEY_MONGO_URI for the services (source it).
set -euo pipefail

args=()
for a in "$@"; do
  if [ "$a" = --ha ]; then export PARLEY_KAFKA_NODES=3
  elif [ "$a" = --tls ]; then export PARLEY_STACK_TLS=1
  else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(realpath -m "${PARLEY_CACHE:-$HOME/.cache/parley}")
RUN=$(realpath -m "${PARLEY_STACK_DIR:-$CACHE/run}")
KAFKA_PORT=${PARLEY_KAFKA_PORT:-19092}
KAFKA_CPORT=${PARLEY_KAFKA_CONTROLLER_PORT:-19093}
MONGO_PORT=${PARLEY_MONGO_PORT:-27018}
PARTITIONS=${PARLEY_KAFKA_PARTITIONS:-8}
TIMEOUT=${PARLEY_STACK_TIMEOUT:-90}
HOST=${PARLEY_STACK_HOST:-127.0.0.1}
FERRETDB_VERSION=v1.24.2
DEP_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")
KAFKA_LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
FERRETDB=$CACHE/bin/ferretdb
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
# Class-data archive of this JVM build (a JDK update makes a new one): halves Kafka's startup.
KAFKA_CDS=$CACHE/kafka-$KAFKA_VERSION/classes-$(stat -L -c %Y "$(command -v "$JAVA")" 2>/dev/null || echo 0).jsa
# How many Kafka nodes: as asked, else as this run dir was started.
NODES=${PARLEY_KAFKA_NODES:-$(cat "$RUN/kafka.nodes" 2>/dev/null || echo 1)}
[[ "$NODES" =~ ^[13]$ ]] || { echo "stack: PARLEY_KAFKA_NODES=$NODES: 1 or 3" >&2; exit 1; }
# TLS listeners: as asked, else as this run dir was started.
TLS=${PARLEY_STACK_TLS:-$(cat "$RUN/stack.tls" 2>/dev/null || echo 0)}
TLS_DIR=$RUN/tls
TLS_STOREPASS=parley-test-only
# Node n (1-based) of component kafka, kafka2, kafka3 and its ports.
knode() { local n=${1#kafka}; echo "${n:-1}"; }
kport() { echo $((KAFKA_PORT + 10 * ($(knode "$1") - 1))); }
kcport() { echo $((KAFKA_CPORT + 10 * ($(knode "$1") - 1))); }
ksport() { echo $(($(kport "$1") + 5)); }
kafka_nodes() { local n; echo kafka; for ((n = 2; n <= NODES; n++)); do echo "kafka$n"; done; }
KAFKA_ADDR=$(for c in $(kafka_nodes); do printf '%s:%s,' "$HOST" "$(kport "$c")"; done)
KAFKA_ADDR=${KAFKA_ADDR%,}
# With three nodes a write is acknowledged once two replicas hold it, so
# one node may die without losing an acknowledged record or stopping writes.
KAFKA_MIN_ISR=$((NODES > 1 ? 2 : 1))
MONGO_URI="mongodb://$HOST:$MONGO_PORT/?retryWrites=false"
PG_PORT=${PARLEY_PG_PORT:-$((MONGO_PORT - 1000))}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ]; then BACKEND=${PARLEY_FERRETDB_BACKEND:-postgresql}
else BACKEND=${PARLEY_FERRETDB_BACKEND:-sqlite}; fi
# PostgreSQL refuses to run as root: as root it runs as the postgres user,
# with its data outside $RUN (which may sit under a 0700 home or mktemp dir).
if [ "$(id -u)" = 0 ]; then
  PG_AS=(runuser -u postgres --)
  PG_DATA=/var/tmp/parley-pg/$(printf '%s' "$RUN" | sha256sum | cut -c1-16)
else
  PG_AS=()
  PG_DATA=$RUN/pg-data
fi

say() { echo "stack: $*"; }
die() { echo "stack: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log_of() { if [[ "$1" == kafka* ]]; then echo "$RUN/$1.log (JVM output: $RUN/$1.out)"; else echo "$RUN/mongo.log"; fi; }
have_mongod() { command -v mongod >/dev/null; }

# ---- fetch --------------------------------------------------------------

pom_sum() { sha256sum "$HERE/pom.xml" | cut -c1-16; }
kafka_fetched() { [ "$(cat "$KAFKA_LIBS.done" 2>/dev/null)" = "$(pom_sum)" ]; }
mongo_fetched() { have_mongod || [ -e "$FERRETDB-$FERRETDB_VERSION.done" ]; }

# Not a plain `go install ...@version`: that binary panics at startup because
# the module lacks the generated build/version/version.txt. So build a copy of
# the module source with that file written.
build_ferretdb() (
  export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build \
    GOTOOLCHAIN=local GOFLAGS="-modcacherw -buildvcs=false"
  local mod=github.com/FerretDB/FerretDB@$FERRETDB_VERSION src=$CACHE/go/ferretdb-src dir
  dir=$(go mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir" ] || { echo "stack: go mod download $mod failed" >&2; return 1; }
  rm -rf "$src" && cp -r "$dir" "$src" && chmod -R u+w "$src"
  echo "$FERRETDB_VERSION" >"$src/build/version/version.txt"
  (cd "$src" && go build -trimpath -o "$FERRETDB" ./cmd/ferretdb)
  rm -rf "$src"
)

cmd_fetch() {
  kafka_fetched && mongo_fetched && return 0
  mkdir -p "$CACHE"
  exec 8>"$CACHE/fetch.lock"
  flock 8 # a concurrent fetch waits here, then finds the markers below
  if ! kafka_fetched; then
    say "fetching Kafka $KAFKA_VERSION jars into $KAFKA_LIBS (log: $CACHE/fetch-kafka.log)"
    rm -rf "$KAFKA_LIBS" "${KAFKA_LIBS%/libs}"/classes-*.jsa
    mvn -B -f "$HERE/pom.xml" -Dmaven.repo.local="$CACHE/m2" "$DEP_PLUGIN:copy-dependencies" \
      -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$CACHE/fetch-kafka.log" 2>&1 \
      || { tail -n 30 "$CACHE/fetch-kafka.log" >&2; die "maven could not fetch the Kafka jars"; }
    pom_sum >"$KAFKA_LIBS.done"
  fi
  if ! mongo_fetched; then
    say "building FerretDB $FERRETDB_VERSION into $FERRETDB (log: $CACHE/fetch-ferretdb.log)"
    build_ferretdb >"$CACHE/fetch-ferretdb.log" 2>&1 \
      || { tail -n 30 "$CACHE/fetch-ferretdb.log" >&2; die "building FerretDB failed"; }
    touch "$FERRETDB-$FERRETDB_VERSION.done"
  fi
  exec 8>&-
}

# ---- processes ------------------------------------------------------------

# Prints the pid of a live process that was started for this run dir.
pid_of() {
  local f="$RUN/$1.pid" p
  [ -f "$f" ] || return 1
  p=$(cat "$f")
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$RUN/" || return 1
  echo "$p"
}

# port_open PORT [HOST]: something listens there (HOST: $HOST).
port_open() { (exec 3<>"/dev/tcp/${2:-$HOST}/$1") 2>/dev/null; }
need_free_port() {
  port_open "$1" "${4:-$HOST}" && die "port $1 ($2) is already in use by a process this run dir ($RUN) did not start; stop it or set $3"
  return 0
}

kafka_ready() { kafka_node_ready kafka; }
kafka2_ready() { kafka_node_ready kafka2; }
kafka3_ready() { kafka_node_ready kafka3; }
kafka_node_ready() {
  port_open "$(kport "$1")" || return 1 # kcat would sit out its whole timeout
  if command -v kcat >/dev/null; then kcat -b "$HOST:$(kport "$1")" -L -m 5 >/dev/null 2>&1; fi
}

# A real OP_MSG {hello: 1} round trip; a TCP connect where python3 is missing.
mongo_ready() {
  command -v python3 >/dev/null || { port_open "$MONGO_PORT"; return; }
  python3 - "$MONGO_PORT" "$HOST" <<'EOF' 2>/dev/null
import socket, struct, sys
body = b"\x10hello\x00" + struct.pack("<i", 1) + b"\x02$db\x00" + struct.pack("<i", 6) + b"admin\x00"
doc = struct.pack("<i", len(body) + 5) + body + b"\x00"
msg = struct.pack("<I", 0) + b"\x00" + doc
s = socket.create_connection((sys.argv[2], int(sys.argv[1])), 2)
s.settimeout(2)
s.sendall(struct.pack("<iiii", 16 + len(msg), 1, 0, 2013) + msg)
data = s.recv(16)
n = struct.unpack("<i", data[:4])[0]
while len(data) < n:
    chunk = s.recv(n - len(data))
    if not chunk: break
    data += chunk
ok = (b"\x01ok\x00" + struct.pack("<d", 1.0), b"\x10ok\x00" + struct.pack("<i", 1))
sys.exit(0 if any(o in data for o in ok) else 1)
EOF
}

# Three nodes: the controller fences a broker that stopped heartbeating
# after broker.session.timeout.ms (9 s by default) and only then moves its
# partition leaders; 4 s (beats every 1 s) cuts the time producers and
# consumers wait after a kill -9 of a broker.
kafka_ha_config() {
  [ "$NODES" = 1 ] || printf 'broker.session.timeout.ms=4000\nbroker.heartbeat.interval.ms=1000\n'
}

# The static quorum: every node is a voter.
kafka_voters() {
  local c v=
  for c in $(kafka_nodes); do v+="$(knode "$c")@127.0.0.1:$(kcport "$c"),"; done
  echo "${v%,}"
}

# The throwaway CA, a certificate for $HOST (Kafka's as PKCS12), and the
# SASL user's password, made once per run dir.
make_tls() {
  [ -s "$TLS_DIR/kafka.p12" ] && return
  mkdir -p "$TLS_DIR"
  (
    cd "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=parley-test-ca \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr
    printf 'subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost\n' "$HOST" >san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile san.ext -out server.crt
    openssl pkcs12 -export -in server.crt -inkey server.key -name kafka \
      -passout "pass:$TLS_STOREPASS" -out kafka.p12
    head -c 18 /dev/urandom | base64 | tr '+/' '-_' >kafka-password
  ) >"$RUN/tls.log" 2>&1 || die "making the test certificates failed; read $RUN/tls.log"
}

# The SASL_SSL listener's settings, when TLS is on.
kafka_tls_config() {
  [ "$TLS" = 1 ] || return 0
  cat <<EOF
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_parley="$(cat "$TLS_DIR/kafka-password")";
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/kafka.p12
ssl.keystore.password=$TLS_STOREPASS
EOF
}

write_kafka_config() {
  local c=$1 tl= tm=
  [ "$TLS" != 1 ] || { tl=",SASL_SSL://$HOST:$(ksport "$c")"; tm=",SASL_SSL:SASL_SSL"; }
  cat >"$RUN/$c.properties" <<EOF
# Generated by deploy/local/stack.sh on every start; edits are lost.
process.roles=broker,controller
node.id=$(knode "$c")
controller.quorum.voters=$(kafka_voters)
listeners=PLAINTEXT://$HOST:$(kport "$c"),CONTROLLER://127.0.0.1:$(kcport "$c")$tl
advertised.listeners=PLAINTEXT://$HOST:$(kport "$c")$tl
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT$tm
$(kafka_tls_config)
log.dirs=$RUN/$c-data
num.partitions=$PARTITIONS
auto.create.topics.enable=true
default.replication.factor=$NODES
min.insync.replicas=$KAFKA_MIN_ISR
offsets.topic.replication.factor=$NODES
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$NODES
transaction.state.log.min.isr=$KAFKA_MIN_ISR
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$NODES
share.coordinator.state.topic.min.isr=$KAFKA_MIN_ISR
group.initial.rebalance.delay.ms=0
$(kafka_ha_config)
log.segment.bytes=16777216
log.retention.ms=21600000
log.retention.bytes=268435456
log.retention.check.interval.ms=60000
log.cleaner.dedupe.buffer.size=16777216
EOF
  cat >"$RUN/$c-log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/stack.sh on every start; edits are lost. -->
<Configuration status="warn">
  <Appenders>
    <Console name="console" target="SYSTEM_OUT">
      <ThresholdFilter level="ERROR"/>
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
    <File name="file" fileName="$RUN/$c.log" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="console"/><AppenderRef ref="file"/></Root>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.KafkaServer" level="INFO"/>
  </Loggers>
</Configuration>
EOF
}

# Three nodes share the box with the tests: smaller heaps each.
KAFKA_HEAP=(-Xms256m -Xmx512m)
[ "$NODES" = 1 ] || KAFKA_HEAP=(-Xms128m -Xmx384m)
kafka_jvm() {
  KAFKA_JVM=("$JAVA" "${KAFKA_HEAP[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dlog4j2.shutdownHookEnabled=false -Dlog4j2.configurationFile="$RUN/$1-log4j2.xml"
    ${PARLEY_KAFKA_JVM_OPTS:-} -cp "$KAFKA_LIBS/*")
}

start_kafka() { start_kafka_node kafka; }
start_kafka2() { start_kafka_node kafka2; }
start_kafka3() { start_kafka_node kafka3; }
start_kafka_node() {
  local c=$1 id cds=-XX:SharedArchiveFile="$KAFKA_CDS"
  write_kafka_config "$c"
  kafka_jvm "$c"
  : >"$RUN/$c.out"
  # Every node of one cluster is formatted with the same cluster id (given
  # as --cluster-id=: one that starts with "-" would read as an option).
  [ -s "$RUN/kafka.cluster-id" ] || head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=' >"$RUN/kafka.cluster-id"
  id=$(cat "$RUN/kafka.cluster-id")
  if [ ! -f "$RUN/$c-data/meta.properties" ]; then
    "${KAFKA_JVM[@]}" -Xshare:auto "$cds" kafka.tools.StorageTool format --cluster-id="$id" -c "$RUN/$c.properties" >>"$RUN/$c.out" 2>&1 \
      || die "kafka storage format failed; read $RUN/$c.out"
  fi
  # No archive yet: node 1 writes one when it exits cleanly, and stop keeps it.
  if [ ! -f "$KAFKA_CDS" ]; then
    if [ "$c" = kafka ]; then cds=-XX:ArchiveClassesAtExit="$RUN/kafka.jsa.tmp"; else cds=-Xshare:auto; fi
  fi
  nohup "${KAFKA_JVM[@]}" "$cds" kafka.Kafka "$RUN/$c.properties" >>"$RUN/$c.out" 2>&1 </dev/null 8>&- 9>&- &
  echo $! >"$RUN/$c.pid"
}

# A private cluster on loopback only, trust auth (nothing else can reach it),
# fsync on: the stack is for tests and benchmarks, which must measure a
# durable store. UTF8 whatever the caller's locale: FerretDB refuses any
# other client encoding, and initdb under an unset LANG picks SQL_ASCII.
start_pg() {
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" != 0 ] || chown postgres: "$PG_DATA" "$(dirname "$PG_DATA")"
    "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8 --locale=C \
      >"$RUN/pg.log" 2>&1 \
      || die "initdb failed; read $RUN/pg.log"
  fi
  # 8>&- 9>&-: the server must not inherit (and hold) the stack's locks.
  "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t "$TIMEOUT" -l "$PG_DATA/server.log" \
    -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=128MB" \
    start >>"$RUN/pg.log" 2>&1 8>&- 9>&- || die "postgresql did not start; read $PG_DATA/server.log"
  "${PG_AS[@]}" psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'ferretdb'" | grep -q 1 \
    || "${PG_AS[@]}" psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE ferretdb" \
    || die "could not create the ferretdb database"
  # Indexes FerretDB's queries can use, and the plan mode they need
  # (ferretdb-pg.sql says why); before FerretDB opens its connections.
  "${PG_AS[@]}" psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d ferretdb -qAt -v ON_ERROR_STOP=1 \
    -f - <"$HERE/ferretdb-pg.sql" >>"$RUN/pg.log" 2>&1 \
    || die "could not set up the ferretdb database (deploy/local/ferretdb-pg.sql); read $RUN/pg.log"
}

stop_pg() {
  [ "$BACKEND" = postgresql ] && [ -f "$PG_DATA/postmaster.pid" ] || return 0
  "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >>"$RUN/pg.log" 2>&1 || true
  say "postgresql stopped"
}

start_mongo() {
  if have_mongod; then
    mkdir -p "$RUN/mongod-data"
    nohup mongod --dbpath "$RUN/mongod-data" --port "$MONGO_PORT" --bind_ip "$HOST" \
      --logpath "$RUN/mongo.log" --logappend >"$RUN/mongo.out" 2>&1 </dev/null 8>&- 9>&- &
  else
    mkdir -p "$RUN/ferretdb-data" "$RUN/ferretdb-state"
    local handler=(--handler=sqlite --sqlite-url="file:$RUN/ferretdb-data/")
    if [ "$BACKEND" = postgresql ]; then
      start_pg
      # FerretDB's default pool is 50: under a reconnect storm (the chaos
      # matrix's gateway fault: 150 syncs, device registrations) all 50 sat
      # idle in PostgreSQL, held, while 56 requests waited in pgxpool's
      # Acquire and every store call timed out (a goroutine dump showed
      # it). What holds them is not known: not Parley's cursors, whose
      # count FerretDB's metrics show at 0-2 (docs/high-availability.md,
      # run L, where 180 were held once too). max_connections is 200; keep
      # 20 for psql and the tests.
      handler=(--handler=postgresql --postgresql-url="postgres://postgres@127.0.0.1:$PG_PORT/ferretdb?pool_max_conns=${PARLEY_FERRETDB_POOL:-180}")
    fi
    local tls=()
    [ "$TLS" != 1 ] || tls=(--listen-tls="$HOST:$((MONGO_PORT + 5))"
      --listen-tls-cert-file="$TLS_DIR/server.crt" --listen-tls-key-file="$TLS_DIR/server.key")
    nohup "$FERRETDB" "${handler[@]}" "${tls[@]}" \
      --listen-addr="$HOST:$MONGO_PORT" --state-dir="$RUN/ferretdb-state" \
      --telemetry=disable --debug-addr="${PARLEY_FERRETDB_DEBUG_ADDR:--}" --log-level=warn \
      >>"$RUN/mongo.log" 2>&1 </dev/null 8>&- 9>&- &
  fi
  echo $! >"$RUN/mongo.pid"
}

wait_ready() {
  local deadline=$((SECONDS + TIMEOUT))
  until "$1_ready"; do
    if ! pid_of "$1" >/dev/null; then
      echo "stack: $1 exited during startup; read $(log_of "$1")" >&2; return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "stack: $1 did not become ready in ${TIMEOUT}s; read $(log_of "$1")" >&2; return 1
    fi
    sleep 0.2
  done
}

write_env() {
  printf 'PARLEY_KAFKA_BROKERS=%s\nPARLEY_KAFKA_REPLICATION=%s\nPARLEY_MONGO_URI=%s\n' \
    "$KAFKA_ADDR" "$NODES" "$MONGO_URI" >"$RUN/stack.env"
  [ "$TLS" = 1 ] || return 0
  local c addr=
  for c in $(kafka_nodes); do addr+="$HOST:$(ksport "$c"),"; done
  cat >"$RUN/stack-tls.env" <<EOF
PARLEY_KAFKA_BROKERS=${addr%,}
PARLEY_KAFKA_REPLICATION=$NODES
PARLEY_KAFKA_SECURITY_PROTOCOL=sasl_ssl
PARLEY_KAFKA_SASL_MECHANISM=PLAIN
PARLEY_KAFKA_SASL_USERNAME=parley
PARLEY_KAFKA_SASL_PASSWORD_FILE=$TLS_DIR/kafka-password
PARLEY_KAFKA_SSL_CA_FILE=$TLS_DIR/ca.crt
PARLEY_MONGO_URI='mongodb://$HOST:$((MONGO_PORT + 5))/?retryWrites=false&tls=true&tlsCAFile=$TLS_DIR/ca.crt'
EOF
}

# ---- subcommands -----------------------------------------------------------

components() {
  case "${1:-all}" in
    mongo) echo mongo ;;
    kafka) kafka_nodes ;;
    kafka2 | kafka3) [ "$(knode "$1")" -le "$NODES" ] || die "no $1: PARLEY_KAFKA_NODES=$NODES"; echo "$1" ;;
    all) echo mongo; kafka_nodes ;;
    *) die "unknown component '$1' (kafka, kafka2, kafka3, mongo or all)" ;;
  esac
}

lock_run() { mkdir -p "$RUN"; exec 9>"$RUN/.lock"; flock 9; }

cmd_start() {
  local c started=() t0
  cmd_fetch
  lock_run
  t0=$(now)
  [ -z "${PARLEY_STACK_TLS:-}" ] || echo "$TLS" >"$RUN/stack.tls"
  [ "$TLS" != 1 ] || make_tls
  for c in "$@"; do
    if pid_of "$c" >/dev/null; then
      [ "${PARLEY_STACK_FRESH:-0}" != 1 ] || die "$c is running in $RUN; stop it before PARLEY_STACK_FRESH=1"
      say "$c already running (pid $(pid_of "$c"))"
      continue
    fi
    rm -f "$RUN/$c.pid"
    if [[ "$c" == kafka* ]]; then
      need_free_port "$(kport "$c")" "$c" PARLEY_KAFKA_PORT
      need_free_port "$(kcport "$c")" "$c controller" PARLEY_KAFKA_CONTROLLER_PORT 127.0.0.1
      [ "$TLS" != 1 ] || need_free_port "$(ksport "$c")" "$c SASL_SSL" PARLEY_KAFKA_PORT
      [ "${PARLEY_STACK_FRESH:-0}" != 1 ] || rm -rf "$RUN/$c-data" "$RUN/$c.log"
      [ "$c" != kafka ] || echo "$NODES" >"$RUN/kafka.nodes"
    else
      need_free_port "$MONGO_PORT" "mongo" PARLEY_MONGO_PORT
      [ "$TLS" != 1 ] || need_free_port "$((MONGO_PORT + 5))" "mongo TLS" PARLEY_MONGO_PORT
      if [ "$BACKEND" = postgresql ] && ! have_mongod; then
        stop_pg # left over by a killed run
        need_free_port "$PG_PORT" "postgresql" PARLEY_PG_PORT 127.0.0.1
      fi
      [ "${PARLEY_STACK_FRESH:-0}" != 1 ] || rm -rf "$RUN"/mongo{d-data,.log} "$RUN"/ferretdb-{data,state} "$PG_DATA"
    fi
    "start_$c"
    started+=("$c")
  done
  for c in mongo $(kafka_nodes); do # mongo first: it is up sooner, so the times are right
    [[ " ${started[*]} " == *" $c "* ]] || continue
    if ! wait_ready "$c"; then
      stop_all "${started[@]}" >/dev/null # leave nothing half-started behind
      exit 1
    fi
    say "$c ready in $(since "$t0")s (pid $(pid_of "$c"))"
  done
  write_env
  for c in "$@"; do
    if [ "$c" = kafka ]; then say "kafka: PARLEY_KAFKA_BROKERS=$KAFKA_ADDR"
    elif [ "$c" = mongo ]; then say "mongo: PARLEY_MONGO_URI=$MONGO_URI"; fi
  done
}

cmd_stop() {
  lock_run
  stop_all "$@"
}

stop_all() {
  local c p i
  local -A pids=()
  # TERM to all first: Kafka nodes stopped one by one would leave the last
  # ones without a controller quorum, each waiting out its shutdown.
  for c in "$@"; do
    if p=$(pid_of "$c"); then pids[$c]=$p; kill -TERM "$p" 2>/dev/null || true; fi
  done
  for c in "$@"; do
    p=${pids[$c]:-}
    if [ -z "$p" ]; then
      rm -f "$RUN/$c.pid"
      say "$c not running"
      [ "$c" != mongo ] || stop_pg
      continue
    fi
    for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then
      say "$c (pid $p) still up after 20s, killing"
      kill -KILL "$p" 2>/dev/null || true
      rm -f "$RUN/kafka.jsa.tmp"
    fi
    if [ -s "$RUN/kafka.jsa.tmp" ]; then # complete: the JVM has exited cleanly
      cp "$RUN/kafka.jsa.tmp" "$KAFKA_CDS.$$" && mv -f "$KAFKA_CDS.$$" "$KAFKA_CDS"
      rm -f "$RUN/kafka.jsa.tmp"
    fi
    rm -f "$RUN/$c.pid"
    say "$c stopped"
    [ "$c" != mongo ] || stop_pg
  done
}

cmd_status() {
  local c p rc=0
  for c in $(kafka_nodes) mongo; do
    if p=$(pid_of "$c") && "${c}_ready"; then say "$c: running, pid $p, ready"
    elif [ -n "${p:-}" ]; then say "$c: running, pid $p, NOT ready (read $(log_of "$c"))"; rc=1
    else say "$c: stopped"; rc=1; fi
    p=
  done
  say "run dir $RUN; PARLEY_KAFKA_BROKERS=$KAFKA_ADDR PARLEY_MONGO_URI=$MONGO_URI"
  return "$rc"
}

cmd_wait() {
  local c
  for c in "$@"; do
    pid_of "$c" >/dev/null || die "$c is not running in $RUN; run: $0 start $c"
    wait_ready "$c" || exit 1
  done
  say "ready"
}

cmd_destroy() {
  # shellcheck disable=SC2046 # component names are single words
  cmd_stop $(kafka_nodes) mongo
  rm -rf "$PG_DATA" "$RUN"
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  destroy) cmd_destroy ;;
  start | stop | wait)
    comps=$(components "${2:-all}")
    # shellcheck disable=SC2086 # component names are single words
    "cmd_$1" $comps
    ;;
  status) cmd_status ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
