#!/usr/bin/env bash
# Browser tests of the web client: starts Parley from a build folder in dev
# mode, either parleyd (PARLEY_BROWSER_MODE=parleyd: one process, a data
# folder of its own) or the services (their own topic prefix and database)
# against the Kafka + MongoDB-wire stack that tests/run.sh started, installs playwright-core
# (npm ci) if missing, runs tests/browser/*.test.mjs in headless Chromium
# against the gateway, stops the services. Screenshots of each step go to
# $PARLEY_BROWSER_SHOTS (default build/browser-shots).
#   tests/browser/run.sh BUILD_DIR
# The stack mode needs PARLEY_KAFKA_BROKERS and PARLEY_MONGO_URI (tests/run.sh
# sets them).
set -uo pipefail
cd "$(dirname "$0")/../.."
build=${1:?usage: tests/browser/run.sh BUILD_DIR}
root=$PWD
mode=${PARLEY_BROWSER_MODE:-stack}
if [[ $mode == stack ]]; then
  : "${PARLEY_KAFKA_BROKERS:?start the stack first (tests/run.sh does)}"
  : "${PARLEY_MONGO_URI:?start the stack first (tests/run.sh does)}"
fi

base=$(( ${PARLEY_E2E_PORT:-18080} + 20 ))
# The one address the tests use: the gateway now, parleyd once it serves.
export PARLEY_WEB_URL=http://127.0.0.1:$base
export PARLEY_BROWSER_SHOTS=${PARLEY_BROWSER_SHOTS:-$root/build/browser-shots}
export PARLEY_CHROMIUM=${PARLEY_CHROMIUM:-/usr/bin/chromium}
mkdir -p "$PARLEY_BROWSER_SHOTS" && rm -f "$PARLEY_BROWSER_SHOTS"/*.png

logs=$(mktemp -d "${TMPDIR:-/tmp}/parley-browser.XXXXXX")
run_id=web$(date +%s).$$
export PARLEY_TOPIC_PREFIX=$run_id.
export PARLEY_MONGO_DB=${run_id//./_}
export PARLEY_DEV=1
export PARLEY_JWT_SECRET=browser-test-secret
export PARLEY_HEARTBEAT_MS=500 PARLEY_PRESENCE_CACHE_MS=200 PARLEY_PARTITIONS=4

if [[ ! -x $PARLEY_CHROMIUM ]]; then
  echo "browser: no Chromium at $PARLEY_CHROMIUM (make deps installs Debian's)"
  exit 1
fi
# npm ci again whenever the lock file changed since the last install.
if [[ ! tests/browser/node_modules/.package-lock.json -nt tests/browser/package-lock.json ]]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) || exit 1
fi

pids=()
stop_all() {
  local bad=0
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" || bad=1; done
  pids=()
  return $bad
}
trap 'stop_all; exit 1' INT TERM

start() { # name port-answering-readyz [VAR=value...]
  local name=$1 port=$2
  shift 2
  env PARLEY_ADMIN_LISTEN=127.0.0.1:$port "$@" "$build/bin/$name" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  ports+=("$port")
}

ready() { # port
  local i
  for i in $(seq 1 600); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.1
  done
  return 1
}

# Started in waves: a consumer that subscribes to a topic created a moment
# before may miss it until librdkafka's next metadata refresh (minutes), so
# every topic is made by an earlier wave (the gateway makes the user topics,
# message-store the receipt topic) before its consumers start.
wave() {
  local p
  for p in "${ports[@]}"; do
    if ! ready "$p"; then
      echo "browser: a service on port $p was not ready in 60 s; logs in $logs"
      stop_all
      exit 1
    fi
  done
  ports=()
}
ports=()
if [[ $mode == parleyd ]]; then
  # Everything in one process: its /readyz is the gateway's.
  start parleyd $base PARLEY_LISTEN=127.0.0.1:$base PARLEY_DATA_DIR="$logs/data"
  wave
else
  start gateway $base PARLEY_LISTEN=127.0.0.1:$base PARLEY_GATEWAY_ID=gw-web PARLEY_ADMIN_LISTEN=off
  wave
  start message-store $((base + 2))
  wave
  start presence $((base + 1))
  start receipt $((base + 3))
  start group-fanout $((base + 4))
  wave
fi

out=$logs/node-test.out
timeout 600 node --test --test-concurrency=1 tests/browser/ 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
# Summary lines for tests/run.sh: the counts, and why anything was skipped.
echo "report: browser tests ($mode): $(grep -E '^# (pass|fail|skipped) [0-9]+$' "$out" | cut -c3- | paste -sd, - | sed 's/,/, /g')"
grep -E '^ok .* # SKIP ' "$out" | sed -E 's/^ok [0-9]+ - (.*) # SKIP (.*)/report: skipped "\1": \2/'
if ! stop_all; then
  echo "browser: a service did not exit cleanly (sanitizer report?); logs in $logs"
  tail -n 20 "$logs"/*.log
  rc=1
fi
[[ $rc -eq 0 ]] && rm -rf "$logs" || echo "browser: service logs in $logs"
exit $rc
