#!/usr/bin/env bash
# tests/chaos/kill-one.sh BUILD_DIR: the first faults of issue 16's chaos
# set, run by hand (not part of make test). Starts a private HA stack
# (deploy/local/stack.sh --ha: three Kafka nodes, replication 3,
# min.insync.replicas 2), the microservices against it (two gateways,
# CHAOS_REPLICAS of each other service in one consumer group), and
# parley-bench's rate scenario (pairs crossing the gateways); kill -9 of one
# Kafka node, or of the first replica of one service (not restarted: the
# others take its partitions over), CHAOS_KILL_AT seconds in. Prints the bench's counts (sends,
# `sent` answers, received, not received after the grace period,
# duplicates) and its send-to-receive latency: the longest one bounds how
# long deliveries stopped. Stops everything it started.
#
# Environment (defaults): CHAOS_VICTIM (kafka2; kafka, kafka2, kafka3,
#   presence, message-store, receipt or group-fanout; none for the same run
#   without a fault, the baseline), CHAOS_REPLICAS (2),
#   CHAOS_KILL_AT (10 s), CHAOS_PAIRS (50), CHAOS_RATE (200 msg/s),
#   CHAOS_DURATION (40 s), CHAOS_GRACE (30 s),
#   CHAOS_KAFKA_PORT (29700; nodes +0, +10, +20; controllers +1),
#   CHAOS_MONGO_PORT (29750; its PostgreSQL 29760), CHAOS_GW_PORT (29780: gateways +0, +1; replica r of the services +10r..+10r+3),
#   CHAOS_KEEP (0; 1 keeps the work folder with every log).
set -euo pipefail

build=${1:?usage: tests/chaos/kill-one.sh BUILD_DIR (e.g. build/rel)}
victim=${CHAOS_VICTIM:-kafka2}
replicas=${CHAOS_REPLICAS:-2}
kill_at=${CHAOS_KILL_AT:-10}
pairs=${CHAOS_PAIRS:-50}
rate=${CHAOS_RATE:-200}
duration=${CHAOS_DURATION:-40}
grace=${CHAOS_GRACE:-30}
gw_port=${CHAOS_GW_PORT:-29780}
work=$(mktemp -d /tmp/parley-chaos.XXXXXX)

export PARLEY_STACK_DIR=$work/stack PARLEY_STACK_FRESH=1
export PARLEY_KAFKA_PORT=${CHAOS_KAFKA_PORT:-29700}
export PARLEY_KAFKA_CONTROLLER_PORT=$((PARLEY_KAFKA_PORT + 1))
export PARLEY_MONGO_PORT=${CHAOS_MONGO_PORT:-29750}
export PARLEY_PG_PORT=${CHAOS_PG_PORT:-29760}
export PARLEY_JWT_SECRET=chaos-$RANDOM$RANDOM PARLEY_LOG_LEVEL=info
stamp=$(date +%s)
export PARLEY_TOPIC_PREFIX=chaos$stamp. PARLEY_MONGO_DB=chaos_$stamp

say() { echo "chaos: $*" >&2; }
die() { say "$*"; exit 1; }

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash deploy/local/stack.sh destroy >/dev/null 2>&1 || true
  if [ "${CHAOS_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$build/bin/parley-bench" ] || die "build $build/bin/parley-bench and the services first"
command -v jq >/dev/null || die "needs jq"
bash deploy/local/stack.sh start all --ha >&2 || die "the HA stack did not start"
set -a
# shellcheck disable=SC1091 # written by stack.sh start
. "$PARLEY_STACK_DIR/stack.env"
set +a

declare -A first # service -> pid of its first replica
start() { # name port [gateway id | replica number]
  if [[ "${3:-}" == gw-* ]]; then
    PARLEY_GATEWAY_ID=$3 PARLEY_LISTEN=127.0.0.1:$2 PARLEY_ADMIN_LISTEN=off \
      "$build/bin/$1" >>"$work/$1-$3.log" 2>&1 &
  else
    PARLEY_ADMIN_LISTEN=127.0.0.1:$2 "$build/bin/$1" >>"$work/$1-$3.log" 2>&1 &
    [ "$3" != 1 ] || first[$1]=$!
  fi
  pids+=($!)
}
ready() { # port: /readyz answers 200 within 90 s
  local i
  for ((i = 0; i < 900; i++)); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.1
  done
  tail -n 20 "$work"/*.log >&2
  die "the service on port $1 never became ready"
}

ports=("$gw_port" $((gw_port + 1)))
for ((r = 1; r <= replicas; r++)); do # admin ports gw_port + 10r .. + 10r + 3
  i=0
  for svc in presence message-store group-fanout receipt; do
    start "$svc" $((gw_port + 10 * r + i)) "$r"
    ports+=($((gw_port + 10 * r + i)))
    i=$((i + 1))
  done
done
start gateway "$gw_port" gw-1
start gateway $((gw_port + 1)) gw-2
for p in "${ports[@]}"; do ready "$p"; done
say "services ready; load average $(cut -d' ' -f1-3 /proc/loadavg)"

"$build/bin/parley-bench" rate --url "ws://127.0.0.1:$gw_port" --url2 "ws://127.0.0.1:$((gw_port + 1))" \
  --pairs "$pairs" --rate "$rate" --duration "$duration" --grace "$grace" >"$work/bench.json" 2>"$work/bench.err" &
bench=$!
if [ "$victim" != none ]; then
  sleep "$kill_at"
  if [[ "$victim" == kafka* ]]; then vpid=$(cat "$PARLEY_STACK_DIR/$victim.pid")
  else vpid=${first[$victim]:?no service $victim}; fi
  kill -KILL "$vpid"
  say "kill -9 $victim (pid $vpid) at $(date -u +%T.%N | cut -c1-12)"
fi
wait "$bench" || { cat "$work/bench.err" >&2; die "parley-bench failed"; }
say "load average $(cut -d' ' -f1-3 /proc/loadavg)"
jq -c '{sends, sent_answers, received, not_received, duplicates, errors,
        latency_ms: {p50: .latency_ms.p50, p99: .latency_ms.p99, max: .latency_ms.max}}' "$work/bench.json"
lost=$(jq '.sent_answers - .received' "$work/bench.json")
[ "$lost" -le 0 ] || die "$lost messages answered sent were not received"
