#!/usr/bin/env bash
# tests/chaos/run.sh BUILD_DIR [FAULT...]: issue 16's fault matrix. Starts
# two gateways and two replicas of presence, message-store, receipt and
# group-fanout (one consumer group each) against one stack, then for each
# FAULT in turn runs `parley-bench chaos` (pairs crossing the gateways,
# clients that reconnect with backoff and resend unanswered sends with the
# same id, receivers that read every message; groups of four members over
# both gateways) and injects the fault
# CHAOS_FAULT_AT seconds into its sends. One line per fault: messages
# answered `sent`, delivered, lost (answered, never delivered: must be 0,
# else the run fails), duplicates on the wire, receipts (delivered + read)
# received live of expected, and how many more came when every client
# connected once more at the end (pending, not lost), the longest a message
# waited past the fault, p99
# inside and outside the fault window; then the same for group messages'
# copies (one per member but the sender): group sends answered `sent`,
# copies delivered of expected, lost (must be 0 too), duplicates, the
# longest a copy waited past the fault; the load average. Every fault leaves
# the system as it found it (what it killed is restarted and ready) before
# the next starts, so one stack serves the whole matrix.
#
# The stack: when PARLEY_KAFKA_BROKERS is set (tests/run.sh's stack, one
# broker), that one; else a private three-node one (deploy/local/stack.sh
# --ha: replication 3, min.insync.replicas 2) on CHAOS_KAFKA_PORT.
#
# Faults (default: the whole matrix, `make test-chaos`):
#   none                   the same run without a fault (the baseline)
#   kill:SERVICE:R         kill -9 of replica R (1|2) of SERVICE (presence,
#                          message-store, receipt, group-fanout), restarted
#                          CHAOS_RESTART_AFTER s later (past the 6 s
#                          consumer session: the survivor takes over first)
#   term:SERVICE           rolling restart by SIGTERM (a Helm upgrade): each
#                          replica in turn stops (must exit 0), starts, ready
#   gateway                kill -9 of gateway 1 (its clients reconnect to
#                          gateway 2), restarted CHAOS_GW_RESTART_AFTER s later
#   kafka-controller       kill -9 of the KRaft quorum leader (a broker too),
#                          restarted CHAOS_RESTART_AFTER s later
#   kafka-leader           the same for another broker leading partitions
#   mongo                  the MongoDB-wire server (FerretDB and its
#                          PostgreSQL) stopped and started again
#
# Environment (defaults): CHAOS_PAIRS (150: 300 clients), CHAOS_RATE (100
#   msg/s), CHAOS_GROUPS (20 groups of 4: two pairs each), CHAOS_GROUP_RATE
#   (10 group msgs/s: 30 copies/s), CHAOS_DURATION (30 s of sends), CHAOS_FAULT_AT (8 s),
#   CHAOS_WINDOW (10 s: the window ends that long after the fault's end),
#   CHAOS_GRACE (40 s), CHAOS_RESTART_AFTER (12 s), CHAOS_GW_RESTART_AFTER
#   (3 s), CHAOS_KAFKA_PORT (29700; nodes +0, +10, +20, controllers +1),
#   CHAOS_MONGO_PORT (29750), CHAOS_PG_PORT (29760), CHAOS_PORT (29780:
#   gateways +0, +1; replica r's admin ports +10r .. +10r+3),
#   CHAOS_KEEP (0; 1 keeps the work folder with every log), CHAOS_STACK_DIR
#   (unset; the run dir of an HA stack already started, used and kept; export
#   the PARLEY_*_PORT it was started with too: a node restarts with them),
#   CHAOS_RESULTS (unset; a file that gets one JSON line per fault),
#   CHAOS_PREFIX (unset; put before each line of the table: tests/run.sh
#   shows lines that start with "report: "), CHAOS_QUICK (unset; 1: each
#   run ends once every message is in, without waiting for receipts).
set -euo pipefail
cd "$(dirname "$0")/../.."

build=${1:?usage: tests/chaos/run.sh BUILD_DIR [FAULT...]}
shift
faults=("$@")
[ ${#faults[@]} -gt 0 ] || faults=(none
  kill:presence:1 kill:presence:2 kill:message-store:1 kill:message-store:2
  kill:receipt:1 kill:receipt:2 kill:group-fanout:1 kill:group-fanout:2
  term:presence term:message-store term:receipt term:group-fanout
  kafka-controller kafka-leader mongo gateway)
services=(presence message-store group-fanout receipt)
pairs=${CHAOS_PAIRS:-150}
rate=${CHAOS_RATE:-100}
groups=${CHAOS_GROUPS:-20}
group_rate=${CHAOS_GROUP_RATE:-10}
duration=${CHAOS_DURATION:-30}
fault_at=${CHAOS_FAULT_AT:-8}
window=${CHAOS_WINDOW:-10}
grace=${CHAOS_GRACE:-40}
restart_after=${CHAOS_RESTART_AFTER:-12}
gw_restart_after=${CHAOS_GW_RESTART_AFTER:-3}
port=${CHAOS_PORT:-29780}
work=$(mktemp -d "${TMPDIR:-/tmp}/parley-chaos.XXXXXX")

say() { echo "chaos: $*" >&2; }
die() { say "$*"; exit 1; }

declare -A pid # "service/replica" or "gateway/1" -> pid
own_stack=0
cleanup() {
  local p i alive
  for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  # A service whose store stopped answering may not finish its stop: 30 s.
  for ((i = 0; i < 300; i++)); do
    alive=0
    for p in "${pid[@]}"; do ! kill -0 "$p" 2>/dev/null || alive=1; done
    [ "$alive" = 1 ] || break
    sleep 0.1
  done
  for p in "${pid[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pid[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "$own_stack" != 1 ] || bash deploy/local/stack.sh destroy >/dev/null 2>&1 || true
  if [ "${CHAOS_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$build/bin/parley-bench" ] || die "build $build/bin/parley-bench and the services first"
command -v jq >/dev/null || die "needs jq"
if [ -n "${CHAOS_STACK_DIR:-}" ]; then # a running HA stack, kept (while developing)
  own_stack=2
  export PARLEY_STACK_DIR=$CHAOS_STACK_DIR PARLEY_STACK_FRESH=0
  set -a
  # shellcheck disable=SC1091 # written by stack.sh start
  . "$PARLEY_STACK_DIR/stack.env"
  set +a
elif [ -z "${PARLEY_KAFKA_BROKERS:-}" ]; then
  own_stack=1
  export PARLEY_STACK_DIR=$work/stack PARLEY_STACK_FRESH=1
  export PARLEY_KAFKA_PORT=${CHAOS_KAFKA_PORT:-29700}
  export PARLEY_KAFKA_CONTROLLER_PORT=$((PARLEY_KAFKA_PORT + 1))
  export PARLEY_MONGO_PORT=${CHAOS_MONGO_PORT:-29750}
  export PARLEY_PG_PORT=${CHAOS_PG_PORT:-29760}
  bash deploy/local/stack.sh start all --ha >&2 || die "the HA stack did not start"
  export PARLEY_STACK_FRESH=0 # restarts below keep their data
  set -a
  # shellcheck disable=SC1091 # written by stack.sh start
  . "$PARLEY_STACK_DIR/stack.env"
  set +a
fi
export PARLEY_JWT_SECRET=chaos-$RANDOM$RANDOM PARLEY_LOG_LEVEL=${PARLEY_LOG_LEVEL:-info}
stamp=$(date +%s)
export PARLEY_TOPIC_PREFIX=chaos$stamp. PARLEY_MONGO_DB=chaos_$stamp

admin_port() { # service replica
  local i
  for i in "${!services[@]}"; do [ "${services[$i]}" != "$1" ] || break; done
  echo $((port + 10 * $2 + i))
}
start() { # service replica
  if [ "$1" = gateway ]; then
    PARLEY_GATEWAY_ID=gw-$2 PARLEY_LISTEN=127.0.0.1:$((port + $2 - 1)) PARLEY_ADMIN_LISTEN=off \
      "$build/bin/gateway" >>"$work/gateway-$2.log" 2>&1 &
  else
    PARLEY_ADMIN_LISTEN=127.0.0.1:$(admin_port "$1" "$2") "$build/bin/$1" >>"$work/$1-$2.log" 2>&1 &
  fi
  pid[$1/$2]=$!
}
ready() { # service replica: /readyz answers 200 within 90 s
  local p i starts=1
  if [ "$1" = gateway ]; then p=$((port + $2 - 1)); else p=$(admin_port "$1" "$2"); fi
  for ((i = 0; i < 900; i++)); do
    curl -fs -o /dev/null "http://127.0.0.1:$p/readyz" && return 0
    if ! kill -0 "${pid[$1/$2]}" 2>/dev/null; then
      # As an orchestrator would: a replica that exits while starting (the
      # database too slow to answer its first ping) is started again, after
      # a pause that grows.
      [ "$starts" -lt 8 ] || break
      say "$1 replica $2 exited while starting; starting it again in ${starts}s"
      sleep "$starts"
      starts=$((starts + 1))
      start "$1" "$2"
    fi
    sleep 0.1
  done
  tail -n 20 "$work/$1-$2.log" >&2
  die "$1 replica $2 never became ready"
}
stop_term() { # service replica: SIGTERM, which must end in exit status 0
  local p=${pid[$1/$2]} rc=0
  kill -TERM "$p"
  wait "$p" || rc=$?
  [ "$rc" = 0 ] || die "$1 replica $2 exited with status $rc on SIGTERM"
}
kill9() { # service replica
  kill -KILL "${pid[$1/$2]}" 2>/dev/null || true
  wait "${pid[$1/$2]}" 2>/dev/null || true
}
# What an orchestrator does between faults: a replica that ended by itself
# (a service exits on a Kafka producer's fatal idempotence error, e.g. the
# "sequence desynchronization" librdkafka 2.0.2 reports after a partition
# leader's kill -9) is started again, and the run says so.
revive() {
  local svc r
  for r in 1 2; do for svc in "${services[@]}" gateway; do
    if ! kill -0 "${pid[$svc/$r]}" 2>/dev/null; then
      say "$svc replica $r had exited by itself; starting it again"
      start "$svc" "$r"
      ready "$svc" "$r"
    fi
  done; done
}

# The KRaft quorum leader: the highest epoch's leaderId in the voters' state.
kafka_node() { [ "$1" = 1 ] && echo kafka || echo "kafka$1"; }
controller_leader() {
  cat "$PARLEY_STACK_DIR"/kafka*-data/__cluster_metadata-0/quorum-state 2>/dev/null |
    jq -s 'max_by(.leaderEpoch) | .leaderId'
}
# A broker other than the quorum leader that leads partitions of Parley's topics.
partition_leader() {
  local ctl
  ctl=$(controller_leader)
  kcat -b "$PARLEY_KAFKA_BROKERS" -L -J 2>/dev/null |
    jq --arg p "$PARLEY_TOPIC_PREFIX" --argjson c "$ctl" '[.topics[] | select(.topic | startswith($p))
      | .partitions[].leader | select(. != $c)] | group_by(.) | max_by(length) | .[0]'
}
kafka_kill() { # node id
  local c
  c=$(kafka_node "$1")
  kill -KILL "$(cat "$PARLEY_STACK_DIR/$c.pid")"
  say "kill -9 of Kafka node $1 ($c)"
  sleep "$restart_after"
  bash deploy/local/stack.sh start "$c" >&2
}

fault() { # name: runs the fault to its end (what it broke is back and ready)
  local svc r
  case $1 in
    none) ;;
    kill:*:[12])
      IFS=: read -r _ svc r <<<"$1"
      kill9 "$svc" "$r"
      sleep "$restart_after"
      start "$svc" "$r"
      ready "$svc" "$r" ;;
    term:*)
      svc=${1#term:}
      for r in 1 2; do stop_term "$svc" "$r"; start "$svc" "$r"; ready "$svc" "$r"; done ;;
    gateway)
      kill9 gateway 1
      sleep "$gw_restart_after"
      start gateway 1
      ready gateway 1 ;;
    kafka-controller)
      [ "$own_stack" != 0 ] || die "$1 needs the HA stack"
      kafka_kill "$(controller_leader)" ;;
    kafka-leader)
      [ "$own_stack" != 0 ] || die "$1 needs the HA stack"
      kafka_kill "$(partition_leader)" ;;
    mongo)
      [ "$own_stack" != 0 ] || die "$1 needs a stack of its own"
      bash deploy/local/stack.sh stop mongo >&2
      bash deploy/local/stack.sh start mongo >&2 ;;
    *) die "unknown fault $1" ;;
  esac
}

check_fault() { # name: known before anything starts
  case $1 in
    none | gateway | mongo | kafka-controller | kafka-leader) ;;
    kill:presence:[12] | kill:message-store:[12] | kill:receipt:[12] | kill:group-fanout:[12]) ;;
    term:presence | term:message-store | term:receipt | term:group-fanout) ;;
    *) die "unknown fault $1" ;;
  esac
}
for f in "${faults[@]}"; do check_fault "$f"; done

for r in 1 2; do for svc in "${services[@]}"; do start "$svc" "$r"; done; done
start gateway 1
start gateway 2
for r in 1 2; do for svc in "${services[@]}" gateway; do ready "$svc" "$r"; done; done
say "services ready; load average $(cut -d' ' -f1-3 /proc/loadavg)"

row="${CHAOS_PREFIX:-}%-22s %7s %7s %9s %5s %5s %15s %6s %9s %9s %9s %6s %13s %5s %5s %8s %s\n"
# shellcheck disable=SC2059 # the format is row's
printf "$row" fault sends sent delivered lost dups receipts resync resume_s p99_in_ms p99_out_ms \
  g_sent g_delivered g_lost g_dups g_resume load
failed=0
n=0
for f in "${faults[@]}"; do
  revive
  n=$((n + 1))
  out=$work/bench-$n.json err=$work/bench-$n.err
  "$build/bin/parley-bench" chaos --url "ws://127.0.0.1:$port" --url2 "ws://127.0.0.1:$((port + 1))" \
    --pairs "$pairs" --rate "$rate" --duration "$duration" --grace "$grace" --window "$window" \
    --groups "$groups" --group-rate "$group_rate" \
    --src-base $((10 + 2 * (n % 100))) ${CHAOS_QUICK:+--quick} >"$out" 2>"$err" &
  bench=$!
  until grep -qs "^parley-bench: go" "$err"; do
    kill -0 "$bench" 2>/dev/null || { cat "$err" >&2; die "parley-bench ended before it started sending"; }
    sleep 0.1
  done
  sleep "$fault_at"
  load=$(cut -d' ' -f1 /proc/loadavg)
  kill -USR1 "$bench"
  fault "$f"
  kill -USR2 "$bench" 2>/dev/null || true # it may have finished before the fault did
  rc=0
  wait "$bench" || rc=$?
  load="$load-$(cut -d' ' -f1 /proc/loadavg)"
  [ -s "$out" ] || { cat "$err" >&2; die "parley-bench gave no report for $f"; }
  jq -r --arg f "$f" --arg load "$load" 'def s: if . == null then "-" else (. / 1000 * 100 | round / 100) end;
    .chaos as $c | $c.groups as $g |
    [$f, .sends, $c.answered, .received, $c.lost, .duplicates,
     "\($c.receipts_received - $c.receipts_after_resync)/\($c.receipts_expected)", $c.receipts_after_resync,
     ($c.resume_ms | s), ($c.latency_in_ms.p99 | round), ($c.latency_out_ms.p99 | round),
     "\($g.answered)/\($g.sends)", "\($g.copies_received)/\($g.copies_expected)", $g.lost,
     $g.duplicates, ($g.resume_ms | s), $load] |
    map(tostring) | join(" ")' "$out" |
    xargs printf "$row"
  jq -c '{fault: $f, sends, received, duplicates, chaos}' --arg f "$f" "$out" >>"$work/results.jsonl"
  lost=$(jq '.chaos.lost + .chaos.groups.lost' "$out")
  if [ "$rc" != 0 ] || [ "$lost" != 0 ]; then
    failed=$((failed + 1))
    say "FAIL $f: $lost lost, parley-bench exit status $rc"
    tail -n 5 "$err" >&2
  fi
  if [ "$(jq '.chaos.receipts_received - .chaos.receipts_after_resync < .chaos.receipts_expected' "$out")" = true ]; then
    say "$f: receipts missing: $(jq -c '.chaos | {receipts_delivered, receipts_read, receipts_expected}' "$out")"
  fi
done
[ -z "${CHAOS_RESULTS:-}" ] || cp "$work/results.jsonl" "$CHAOS_RESULTS"
say "load average $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$failed" = 0 ] || die "$failed of ${#faults[@]} faults lost messages or failed"
