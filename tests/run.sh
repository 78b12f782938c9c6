#!/usr/bin/env bash
# Runs Parley's test suites from a build folder: unit tests (no servers), then
# the end-to-end suite against parleyd (no servers: the fast one), then
# integration, end-to-end and browser tests against a real Kafka broker and
# MongoDB-wire server that this script starts on private ports and a private
# data folder, and stops on exit, pass or fail.
#   tests/run.sh BUILD_DIR [unit|parleyd|browser|all]   (browser: the stack
#   and the browser tests only, for iterating on the web client)
# The programs expected are derived from the sources (tests/<suite>/test_*.c):
# one that is not built fails. Each runs under a wall-clock limit, the whole
# run under a budget (docs/testing.md). PARLEY_TEST_ONLY=<regex> runs only
# the programs whose line (e.g. "build/san/tests/e2e/test_groups [stack]")
# matches; the stack starts only if one of them needs it.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: tests/run.sh BUILD_DIR [unit|parleyd|browser|all]}
what=${2:-all}
only=${PARLEY_TEST_ONLY:-}

# Wall-clock limits in seconds: per program (browser programs get twice as
# long: npm ci and a browser start), and for the whole run.
limit=${PARLEY_TEST_TIMEOUT:-300}
budget=${PARLEY_TEST_BUDGET:-1500}

passed=0
failed=0
failures=()
child=0
# Ctrl-C or a TERM from an outer guard reaches the running program too: it
# runs in a process group of its own (timeout's), with every service it
# started.
trap 'echo "tests/run.sh: interrupted"; [[ $child -gt 0 ]] && kill -TERM "$child" 2>/dev/null; exit 130' INT TERM

logs=$build/test-logs
rm -rf "$logs"

fail() { # line why [log]
  failed=$((failed + 1))
  failures+=("$1")
  echo "FAIL $1 ($2)"
  [[ -n ${3:-} ]] || return
  # check's failure lines first, even those the tail repeats: a sanitizer's
  # leak report can fill the tail, and CI's summary keeps only the head of
  # what is printed here. Then the tail; the whole log is kept.
  grep -E '^[^ ]+:[0-9]+:[EF]:' "$3" | head -n 20 | sed 's/^/    /'
  tail -n 60 "$3" | sed 's/^/    /'
  mkdir -p "$logs"
  local keep=$logs/$(echo "${1#"$build"/tests/}" | tr -c 'A-Za-z0-9_.-' '_').log
  cp "$3" "$keep" && echo "    (all of its output: $keep)"
}

run_one() { # line limit program [args...]
  local line=$1 max=$2 bin=$3 log rc left=$((budget - SECONDS))
  shift 2
  if [[ $bin == */tests/* && ! -x $bin ]]; then
    fail "$line" "not built; make SAN=1 all builds it"
    return
  fi
  if [[ $left -le 0 ]]; then
    fail "$line" "not run: the run's budget of ${budget}s was spent"
    return
  fi
  [[ $left -lt $max ]] && max=$left
  log=$(mktemp)
  # Each program's services write their logs and data under a TMPDIR of its
  # own: removed when it passes, kept (and named) when it fails.
  local tmp t0=$SECONDS
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/parley-test.XXXXXX")
  TMPDIR=$tmp timeout -k 10 "$max" "$@" >"$log" 2>&1 </dev/null &
  child=$!
  wait "$child"
  rc=$?
  child=0
  if [[ $rc -eq 0 ]]; then
    passed=$((passed + 1))
    echo "PASS $line ($((SECONDS - t0))s): $(grep -E '^[0-9]+%: Checks|^fuzz ' "$log" | tail -1)"
    grep -E '^report: ' "$log" | sed 's/^/    /' || true
  elif [[ $rc -eq 124 || ($rc -eq 137 && $((SECONDS - t0)) -ge $max) ]]; then
    fail "$line" "TIMEOUT: killed after ${max}s, the limit (PARLEY_TEST_TIMEOUT=$limit, budget left ${left}s)" "$log"
  else
    fail "$line" "exit status $rc, $((SECONDS - t0))s" "$log"
  fi
  if [[ $rc -eq 0 ]]; then
    rm -rf "$tmp"
  else
    echo "    (its services' logs and data: $tmp)"
  fi
  rm -f "$log"
}

# The plan: "phase|program|label" for every program expected, in run order.
# Programs are named by their sources, so a new test needs no edit here and
# a missing binary fails instead of vanishing.
plan=()
names() { # suite: its test programs' names
  local f
  for f in tests/"$1"/test_*.c; do
    f=${f##*/}
    echo "${f%.c}"
  done
}
for n in $(names unit); do plan+=("unit|$build/tests/unit/$n|"); done
# Each libFuzzer target (fuzz/fuzz_<name>.c, built into build/fuzz by
# `make fuzz-build`) for PARLEY_FUZZ_SECONDS from its corpus in the tree.
for f in fuzz/fuzz_*.c; do
  f=${f##*/fuzz_}
  plan+=("unit|fuzz/run.sh|${f%.c}")
done
for n in $(names integration); do
  [[ $n == *_sqlite ]] && plan+=("parleyd|$build/tests/integration/$n|")
done
for n in $(names e2e); do plan+=("parleyd|$build/tests/e2e-parleyd/$n|parleyd"); done
plan+=("parleyd|tests/browser/run.sh|parleyd")
for n in $(names integration); do
  [[ $n != *_sqlite ]] && plan+=("stack|$build/tests/integration/$n|")
done
for n in $(names e2e); do plan+=("stack|$build/tests/e2e/$n|stack"); done
plan+=("stack|tests/browser/run.sh|stack")
# The short fault run (docs/high-availability.md): replicas of every
# service, a gateway and a message-store replica killed under load.
plan+=("stack|tests/chaos/run.sh|short")

# What this run takes: by the mode, then by PARLEY_TEST_ONLY.
selected=()
need_stack=0
for entry in "${plan[@]}"; do
  IFS='|' read -r phase bin label <<<"$entry"
  case $what in
    unit) [[ $phase == unit ]] || continue ;;
    parleyd) [[ $phase != stack ]] || continue ;;
    browser) [[ $phase == stack && $bin == tests/browser/* ]] || continue ;;
    all) ;;
    *) echo "tests/run.sh: unknown mode $what (unit|parleyd|browser|all)"; exit 2 ;;
  esac
  line="$bin${label:+ [$label]}"
  [[ -n $only ]] && ! [[ $line =~ $only ]] && continue
  selected+=("$entry")
  [[ $phase == stack ]] && need_stack=1
done
if [[ ${#selected[@]} -eq 0 ]]; then
  echo "FAIL: no program matches PARLEY_TEST_ONLY='$only' in mode $what"
  exit 1
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Gateways free a quiet connection's WebSocket context at every chance
# (production waits 2 s), so every test runs through park and unpark.
export PARLEY_WS_PARK_MS=${PARLEY_WS_PARK_MS:-0}
export PARLEY_BUILD=$build

run_phase() { # phase
  local entry phase bin label max
  for entry in "${selected[@]}"; do
    IFS='|' read -r phase bin label <<<"$entry"
    [[ $phase == "$1" ]] || continue
    max=$limit
    [[ $bin == tests/browser/* ]] && max=$((2 * limit))
    if [[ $bin == fuzz/run.sh ]]; then
      run_one "$bin [$label]" "$max" bash "$bin" "$(dirname "$build")/fuzz" \
        "${PARLEY_FUZZ_SECONDS:-4}" "$label"
    elif [[ $bin == tests/browser/* ]]; then
      PARLEY_BROWSER_MODE=$label run_one "$bin [$label]" "$max" "$bin" "$build"
    elif [[ $bin == tests/chaos/* ]]; then
      CHAOS_PORT=$((${PARLEY_E2E_PORT:-18080} + 40)) CHAOS_PAIRS=50 CHAOS_RATE=100 \
        CHAOS_DURATION=15 CHAOS_FAULT_AT=4 CHAOS_GRACE=30 CHAOS_QUICK=1 CHAOS_PREFIX='report: ' \
        run_one "$bin [$label]" "$max" bash "$bin" "$build" gateway kill:message-store:1
    elif [[ -n $label ]]; then
      PARLEY_E2E_MODE=$label run_one "$bin [$label]" "$max" "$bin"
    else
      run_one "$bin" "$max" "$bin"
    fi
  done
}

run_phase unit
run_phase parleyd

if [[ $need_stack -eq 1 ]]; then
  export PARLEY_STACK_DIR=${PARLEY_TEST_STACK_DIR:-$(mktemp -d /tmp/parley-test-stack.XXXXXX)}
  export PARLEY_KAFKA_PORT=${PARLEY_TEST_KAFKA_PORT:-29092}
  export PARLEY_KAFKA_CONTROLLER_PORT=${PARLEY_TEST_KAFKA_CONTROLLER_PORT:-29093}
  export PARLEY_MONGO_PORT=${PARLEY_TEST_MONGO_PORT:-27028}
  export PARLEY_STACK_FRESH=1
  stop_stack() { bash deploy/local/stack.sh destroy || true; }
  trap stop_stack EXIT
  # The first start on a machine fetches Kafka and builds FerretDB (~2 min).
  # PARLEY_TEST_TLS=1 (make test-tls): everything reaches Kafka through a
  # SASL_SSL listener and FerretDB through TLS (stack.sh --tls).
  tls=()
  [[ ${PARLEY_TEST_TLS:-0} == 1 ]] && tls=(--tls)
  timeout -k 10 600 bash deploy/local/stack.sh start "${tls[@]}" all
  rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "FAIL: the local stack did not start (exit status $rc; 124: not in 600 s; logs above)"
    exit 1
  fi
  if [[ ${#tls[@]} -gt 0 ]]; then
    set -a
    . "$PARLEY_STACK_DIR/stack-tls.env"
    set +a
    echo "tests/run.sh: over TLS: Kafka $PARLEY_KAFKA_BROKERS ($PARLEY_KAFKA_SECURITY_PROTOCOL), $PARLEY_MONGO_URI"
  else
    export PARLEY_KAFKA_BROKERS=127.0.0.1:$PARLEY_KAFKA_PORT
    export PARLEY_MONGO_URI="mongodb://127.0.0.1:$PARLEY_MONGO_PORT/?retryWrites=false"
  fi
  run_phase stack
fi

echo
echo "programs: $passed passed, $failed failed, of ${#selected[@]} expected${only:+ (PARLEY_TEST_ONLY='$only')} in ${SECONDS}s"
for f in "${failures[@]}"; do echo "  failed: $f"; done
[[ $failed -eq 0 ]]
