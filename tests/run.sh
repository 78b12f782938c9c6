#!/usr/bin/env bash
# Runs Parley's test suites from a build folder: unit tests (no servers), then
# the end-to-end suite against parleyd (no servers: the fast one), then
# integration, end-to-end and browser tests against a real Kafka broker and
# MongoDB-wire server that this script starts on private ports and a private
# data folder, and stops on exit, pass or fail.
#   tests/run.sh BUILD_DIR [unit|parleyd|browser|all]   (browser: the stack
#   and the browser tests only, for iterating on the web client)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: tests/run.sh BUILD_DIR [unit|browser|all]}
what=${2:-all}

passed=0
failed=0
failures=()

run_one() { # program [args...]; RUN_LABEL (if set) tags the line
  local bin=$1 label=${RUN_LABEL:+ [$RUN_LABEL]} log
  log=$(mktemp)
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "PASS $bin$label ($((SECONDS - t0))s): $(grep -E '^[0-9]+%: Checks' "$log" | tail -1)"
    grep -E '^report: ' "$log" | sed 's/^/    /' || true
  else
    failed=$((failed + 1))
    failures+=("$bin$label")
    echo "FAIL $bin$label ($((SECONDS - t0))s)"
    tail -n 60 "$log" | sed 's/^/    /'
  fi
  rm -f "$log"
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Gateways free a quiet connection's WebSocket context at every chance
# (production waits 2 s), so every test runs through park and unpark.
export PARLEY_WS_PARK_MS=${PARLEY_WS_PARK_MS:-0}

for t in "$build"/tests/unit/test_*; do
  [[ $what != browser && -x $t && $t != *.d && $t != *.o ]] && run_one "$t"
done

run_e2e() { # folder label
  local t
  for t in "$build/tests/$1"/test_*; do
    [[ -x $t && $t != *.d && $t != *.o ]] && RUN_LABEL=$2 run_one "$t"
  done
}

if [[ $what == all || $what == parleyd ]]; then
  for t in "$build"/tests/integration/test_*_sqlite; do
    [[ -x $t ]] && run_one "$t"
  done
  export PARLEY_BUILD=$build
  export PARLEY_E2E_MODE=parleyd
  run_e2e e2e-parleyd parleyd
  # The web client in headless Chromium, against a parleyd of its own.
  RUN_LABEL=parleyd PARLEY_BROWSER_MODE=parleyd run_one tests/browser/run.sh "$build"
fi

if [[ $what == all || $what == browser ]]; then
  export PARLEY_STACK_DIR=${PARLEY_TEST_STACK_DIR:-$(mktemp -d /tmp/parley-test-stack.XXXXXX)}
  export PARLEY_KAFKA_PORT=${PARLEY_TEST_KAFKA_PORT:-29092}
  export PARLEY_KAFKA_CONTROLLER_PORT=${PARLEY_TEST_KAFKA_CONTROLLER_PORT:-29093}
  export PARLEY_MONGO_PORT=${PARLEY_TEST_MONGO_PORT:-27028}
  export PARLEY_STACK_FRESH=1
  stop_stack() { bash deploy/local/stack.sh destroy || true; }
  trap stop_stack EXIT
  if ! bash deploy/local/stack.sh start all; then
    echo "FAIL: the local stack did not start (logs above)"
    exit 1
  fi
  export PARLEY_KAFKA_BROKERS=127.0.0.1:$PARLEY_KAFKA_PORT
  export PARLEY_MONGO_URI="mongodb://127.0.0.1:$PARLEY_MONGO_PORT/?retryWrites=false"
  for t in "$build"/tests/integration/test_*; do
    [[ $what == all && -x $t && $t != *.d && $t != *.o && $t != *_sqlite ]] && run_one "$t"
  done
  export PARLEY_BUILD=$build
  export PARLEY_E2E_MODE=stack
  [[ $what == all ]] && run_e2e e2e stack
  # The web client again, against services of its own on the stack.
  RUN_LABEL=stack PARLEY_BROWSER_MODE=stack run_one tests/browser/run.sh "$build"
fi

echo
echo "programs: $passed passed, $failed failed"
for f in "${failures[@]}"; do echo "  failed: $f"; done
[[ $failed -eq 0 ]]
