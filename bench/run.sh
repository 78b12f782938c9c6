#!/usr/bin/env bash
# bench/run.sh BUILD_DIR (`make bench`): Parley's standard benchmark in
# microservice mode (Kafka + the MongoDB-wire server). Starts a private stack
# (own ports and data folder, so a running `make run` or `make test` is left
# alone), presence, message-store and two gateways, runs parley-bench's
# scenarios, writes bench/results/latest.{json,md} and stops everything it
# started. Timings are reported, never asserted.
#
# Environment (defaults):
#   BENCH_RATES ("50 200 1000")  BENCH_PAIRS (100)  BENCH_DURATION (20)
#   BENCH_SYNC_PENDING (10000; 0 skips)
#   BENCH_IDLE_SYNCED (1000): idle connections each waiting for `synced`
#   BENCH_IDLE_CONNS (30000): idle connections counted at the 101 upgrade
#     (the gateway's own memory and connect rate at the target's scale)
#   BENCH_IDLE_PROCS (3)  BENCH_IDLE_HOLD (10)  BENCH_OUT (bench/results)
# Every scenario runs against freshly started services with their own topics
# and database, so none waits behind another's backlog.
#   BENCH_KAFKA_PORT (39092) BENCH_MONGO_PORT (27048) BENCH_GW_PORT (38481, and +1)
# Needs jq for the report.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/rel}
bench=$build/bin/parley-bench

IDLE_CONNS=${BENCH_IDLE_CONNS:-30000}
IDLE_SYNCED=${BENCH_IDLE_SYNCED:-1000}
IDLE_PROCS=${BENCH_IDLE_PROCS:-3}
IDLE_HOLD=${BENCH_IDLE_HOLD:-10}
RATES=${BENCH_RATES:-50 200 1000}
PAIRS=${BENCH_PAIRS:-100}
DURATION=${BENCH_DURATION:-20}
SYNC_PENDING=${BENCH_SYNC_PENDING:-10000}
OUT=${BENCH_OUT:-bench/results}
GW_PORT=${BENCH_GW_PORT:-38481}

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
command -v jq >/dev/null || die "jq is needed for the report (apt-get install jq)"
[ -x "$bench" ] || die "$bench is missing; run make first"

# Each gateway holds up to 15k sockets and each load process up to 10k.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge 16000 ] || say "warning: ulimit -n is $(ulimit -n); large idle runs will fail"

export PARLEY_STACK_DIR=${BENCH_STACK_DIR:-$(mktemp -d /tmp/parley-bench-stack.XXXXXX)}
export PARLEY_KAFKA_PORT=${BENCH_KAFKA_PORT:-39092}
export PARLEY_KAFKA_CONTROLLER_PORT=$((PARLEY_KAFKA_PORT + 1))
export PARLEY_MONGO_PORT=${BENCH_MONGO_PORT:-27048}
export PARLEY_STACK_FRESH=1

pids=()
workdir=$(mktemp -d /tmp/parley-bench.XXXXXX)
keep_logs=0
stop_pid() { # pid name: TERM, then KILL after 15 s (a backlog must not hold the run)
  local i
  kill -TERM "$1" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then
    say "$2 (pid $1) did not stop within 15 s of SIGTERM; killed"
    kill -KILL "$1" 2>/dev/null || true
    keep_logs=1
  fi
  wait "$1" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  services_down
  cp "$PARLEY_STACK_DIR"/*.log "$workdir/" 2>/dev/null || true
  bash deploy/local/stack.sh destroy >&2 || true
  if [ "$keep_logs" = 1 ]; then say "service logs kept in $workdir"; else rm -rf "$workdir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$SECONDS
bash deploy/local/stack.sh start all >&2 || die "the local stack did not start"

stamp=$(date +%s)
export PARLEY_KAFKA_BROKERS=127.0.0.1:$PARLEY_KAFKA_PORT
export PARLEY_MONGO_URI="mongodb://127.0.0.1:$PARLEY_MONGO_PORT/?retryWrites=false"
export PARLEY_JWT_SECRET=bench-$stamp-$RANDOM$RANDOM
export PARLEY_LOG_LEVEL=${PARLEY_LOG_LEVEL:-warn}
export PARLEY_MAX_CONNS=${PARLEY_MAX_CONNS:-19000}
kafka_pid=$(cat "$PARLEY_STACK_DIR/kafka.pid")
mongo_pid=$(cat "$PARLEY_STACK_DIR/mongo.pid")

# name port [gateway-id]: gateways listen on port, the others serve admin there.
start() {
  if [ -n "${3:-}" ]; then
    PARLEY_GATEWAY_ID=$3 PARLEY_LISTEN=127.0.0.1:$2 PARLEY_ADMIN_LISTEN=off \
      "$build/bin/$1" >>"$workdir/$1-$3.log" 2>&1 &
  else
    PARLEY_ADMIN_LISTEN=127.0.0.1:$2 "$build/bin/$1" >>"$workdir/$1.log" 2>&1 &
  fi
  pids+=($!)
}
ready() { # port: /readyz answers 200 within 60 s
  local i
  for ((i = 0; i < 600; i++)); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.1
  done
  return 1
}

# Each scenario gets fresh services, topics and database: the MongoDB-wire
# server here scans whole collections, so whatever one scenario left behind
# (inbox backlog, dedupe marks, presence churn) would slow the next one.
declare -A comp
services_up() { # tag
  local port
  export PARLEY_TOPIC_PREFIX=bench$stamp$1. PARLEY_MONGO_DB=bench_${stamp}_$1
  pids=()
  start presence $((GW_PORT + 10))
  start message-store $((GW_PORT + 11))
  start gateway "$GW_PORT" gw-1
  start gateway $((GW_PORT + 1)) gw-2
  for port in $((GW_PORT + 10)) $((GW_PORT + 11)) "$GW_PORT" $((GW_PORT + 1)); do
    ready "$port" || { tail -n 20 "$workdir"/*.log >&2; die "a service on $port never became ready"; }
  done
  comp=([kafka]=$kafka_pid [mongo]=$mongo_pid [presence]=${pids[0]} [message_store]=${pids[1]}
    [gateway_1]=${pids[2]} [gateway_2]=${pids[3]})
}
services_down() {
  local p
  for p in "${pids[@]}"; do stop_pid "$p" "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-40)"; done
  pids=()
}

# ---- CPU accounting: what each component burned during a scenario ---------

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU of this shell's reaped children, i.e. parley-bench and its load
# processes, into $bench_ticks. `times` must run in this shell, not in a
# subshell, which would start with no children of its own.
bench_ticks=0
bench_ticks_now() {
  times >"$workdir/times"
  bench_ticks=$(awk -v hz="$(getconf CLK_TCK)" 'NR == 2 { gsub(/[ms]/, " "); print int(($1 * 60 + $2 + $3 * 60 + $4) * hz) }' "$workdir/times")
}
declare -A before
cpu_mark() {
  local c
  for c in "${!comp[@]}"; do before[$c]=$(ticks "${comp[$c]}"); done
  bench_ticks_now
  before[bench]=$bench_ticks
  before[wall]=$(date +%s.%N)
}
cpu_json() { # percent of one core per component since cpu_mark
  local c wall json="{}"
  wall=$(awk -v a="${before[wall]}" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  for c in "${!comp[@]}"; do
    json=$(jq -c --arg c "$c" --argjson t "$(($(ticks "${comp[$c]}") - before[$c]))" \
      --argjson w "$wall" --argjson hz "$(getconf CLK_TCK)" '. + {($c): (($t / $hz / $w * 1000 | round) / 10)}' <<<"$json")
  done
  jq -c --argjson t "$((bench_ticks - before[bench]))" --argjson w "$wall" \
    --argjson hz "$(getconf CLK_TCK)" '. + {bench: (($t / $hz / $w * 1000 | round) / 10)}' <<<"$json"
}

results=$workdir/results.jsonl
: >"$results"
url1=ws://127.0.0.1:$GW_PORT
url2=ws://127.0.0.1:$((GW_PORT + 1))
run() { # tag, then parley-bench arguments; appends its JSON with the CPU split
  local line tag=$1 t0=$SECONDS
  shift
  services_up "$tag"
  cpu_mark
  if ! line=$("$bench" "$@" --url "$url1" --url2 "$url2" --gw-pids "${comp[gateway_1]},${comp[gateway_2]}"); then
    say "parley-bench $1 reported a shortfall (kept in the results)"
  fi
  bench_ticks_now
  if [ -n "$line" ]; then
    jq -c --argjson cpu "$(cpu_json)" '. + {cpu_percent: $cpu}' <<<"$line" >>"$results"
  else
    say "parley-bench $1 produced no result"
  fi
  services_down
  say "$tag done in $((SECONDS - t0)) s"
}

say "stack up in $((SECONDS - t_start)) s"
for r in $RATES; do
  run "rate$r" rate --rate "$r" --pairs "$PAIRS" --duration "$DURATION" --procs 1 --grace 15
done
[ "$SYNC_PENDING" -le 0 ] || run sync sync --pending "$SYNC_PENDING" --grace 120
[ "$IDLE_SYNCED" -le 0 ] || run idlesynced idle --conns "$IDLE_SYNCED" --procs "$IDLE_PROCS" --hold "$IDLE_HOLD"
[ "$IDLE_CONNS" -le 0 ] || run idle idle --conns "$IDLE_CONNS" --procs "$IDLE_PROCS" --hold "$IDLE_HOLD" --upgrade-only

# ---- report ------------------------------------------------------------------

mkdir -p "$OUT"
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
jq -s --arg when "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --argjson nproc "$(nproc)" --argjson mem "$mem_kb" --arg kernel "$(uname -r)" \
  --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
  --arg mongo "$(command -v mongod >/dev/null && echo mongod || echo "FerretDB 1.24 over ${PARLEY_FERRETDB_BACKEND:-$(ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 && echo postgresql || echo sqlite)}")" \
  --argjson total "$((SECONDS - t_start))" \
  '{when: $when, commit: $commit, mode: ("microservices: Kafka + " + (if $mongo == "mongod" then "MongoDB" else "FerretDB" end)),
    machine: {nproc: $nproc, mem_total_kb: $mem, kernel: $kernel, cpu: $cpu},
    settings: {kafka: "Apache Kafka 4.1 KRaft, one node, 8 partitions", store: $mongo,
               gateways: 2, gateway_workers: 2, presence_cache_ms: 2000,
               topology: "receivers on gateway 1, senders on gateway 2 (every message crosses gateways)",
               body_bytes: 100, all_on_one_machine: true},
    results: .}' "$results" >"$OUT/latest.json.tmp"
total=$((SECONDS - t_start))
jq --argjson total "$total" '. + {run_seconds: $total}' "$OUT/latest.json.tmp" >"$OUT/latest.json"
rm -f "$OUT/latest.json.tmp"

jq -r '
  def f1: (. * 10 | round) / 10;
  def f2: (. * 100 | round) / 100;
  def cpu: [to_entries[] | select(.value >= 1) | "\(.key) \(.value | round)%"] | join(", ");
  "# Parley benchmark (\(.mode))",
  "",
  "\(.when), commit \(.commit); \(.machine.nproc) cores (\(.machine.cpu)), \(.machine.mem_total_kb / 1048576 | f1) GiB, Linux \(.machine.kernel); whole run \(.run_seconds) s.",
  "Each scenario runs on freshly started services with their own topics and database. Everything (Kafka, \(.settings.store), presence, message-store, 2 gateways and the load generator) shares these cores. \(.settings.topology).",
  "",
  ([.results[] | select(.scenario == "idle")] | select(length > 0) |
    "## Idle connections (2 gateways, held \(.[0].hold_s) s)",
    "",
    "| connections | counted at | load processes | ready | failed | connect rate | connect to ready p50 / p99 | gateway RSS growth per connection | dropped while held |",
    "|---|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.conns) | `\(.counted_at)` | \(.procs) | \(.synced) | \(.failed) | \(.conns_per_s | round)/s | \(.connect_to_ready_ms.p50 | f1) / \(.connect_to_ready_ms.p99 | f1) ms | \([.gateways[] | "\(.bytes_per_conn / 1024 | f2) KiB (\(.conns))"] | join(", ")) | \(.dropped_while_held) |"),
    "",
    "`synced` needs presence and message-store to write and read the database for every connection; `upgrade` is the gateway alone (HTTP upgrade, token check, registration produced to Kafka). Each row starts on fresh gateways.",
    "",
    (.[] | "CPU while connecting \(.conns) (`\(.counted_at)`) and holding: \(.cpu_percent | cpu)."),
    ""),
  ([.results[] | select(.scenario == "rate")] | select(length > 0) |
    "## 1:1 messages at a fixed rate (\(.[0].pairs) sender/receiver pairs, \(.[0].body_bytes)-byte bodies, \(.[0].duration_s) s each)",
    "",
    "| offered rate | delivered/s | `sent` answers | not received | p50 | p90 | p99 | p99.9 | max |",
    "|---|---|---|---|---|---|---|---|---|",
    (.[] | "| \(.rate | round)/s | \(.delivered_per_s | round) | \(.sent_answers) of \(.sends) | \(.not_received) | \(.latency_ms.p50 | f2) ms | \(.latency_ms.p90 | f2) ms | \(.latency_ms.p99 | f2) ms | \(.latency_ms.p999 | f2) ms | \(.latency_ms.max | f2) ms |"),
    "",
    "Latency is send to receive (the sender stamps CLOCK_MONOTONIC into the body; one machine, one clock).",
    "",
    (.[] | "CPU at \(.rate | round)/s: \(.cpu_percent | cpu)."),
    ""),
  (.results[] | select(.scenario == "sync") |
    "## Reconnect with pending messages",
    "",
    "| pending | connect to `synced` | connect to last message | rate | before `synced` |",
    "|---|---|---|---|---|",
    "| \(.pending) | \(if .connect_to_synced_ms < 0 then "none in \(.gave_up_after_s) s" else "\(.connect_to_synced_ms | round) ms" end) | \(if .connect_to_all_ms < 0 then "\(.received) received in \(.gave_up_after_s) s" else "\(.connect_to_all_ms | round) ms" end) | \(if .msgs_per_s > 0 then "\(.msgs_per_s | round)/s" else "\(.received / .gave_up_after_s | round)/s" end) | \(.before_synced) |",
    "",
    "Filling the inbox: \(.fill_s | f1) s for the sends; message-store held all of them \(.store_catch_up_s | f1) s later. CPU during the scenario: \(.cpu_percent | cpu).",
    "")
' "$OUT/latest.json" >"$OUT/latest.md"

say "results: $OUT/latest.md and $OUT/latest.json (whole run $total s)"
cat "$OUT/latest.md"
