#!/usr/bin/env bash
# Runs libFuzzer targets (fuzz/fuzz_<name>.c, built by `make fuzz-build`
# into build/fuzz/bin) for a set time each, from their corpus in the tree
# (fuzz/corpus/<name>/, only read: what a run finds goes to a scratch
# folder). A crash, leak, sanitizer report or timeout fails the run; the
# input that did it is kept as build/fuzz/artifacts/<name>-crash-<sha1>
# (replay: build/fuzz/bin/fuzz_<name> <file>).
#   fuzz/run.sh BUILD_DIR SECONDS [name...]   (default: every target)
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: fuzz/run.sh BUILD_DIR SECONDS [name...]}
secs=${2:?usage: fuzz/run.sh BUILD_DIR SECONDS [name...]}
shift 2
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
  for f in fuzz/fuzz_*.c; do f=${f##*/fuzz_}; names+=("${f%.c}"); done
fi
mkdir -p "$dir/artifacts"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=0
for n in "${names[@]}"; do
  bin=$dir/bin/fuzz_$n
  if [[ ! -x $bin ]]; then
    echo "FAIL fuzz $n: $bin not built (make fuzz-build)"
    failed=$((failed + 1))
    continue
  fi
  scratch=$(mktemp -d)
  log=$(mktemp)
  # -timeout: one input running 10 s is a hang; -rss_limit_mb: a leak or
  # an allocation a client controls.
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/$n-" "$scratch" "fuzz/corpus/$n" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  if [[ $rc -eq 0 ]]; then
    echo "fuzz $n: ${runs:-?} inputs in ${secs}s, no finding"
  else
    failed=$((failed + 1))
    echo "FAIL fuzz $n (exit $rc; all of its output: $dir/artifacts/$n.log):"
    grep -vE '^#[0-9]+[[:space:]]|^INFO:|^[[:space:]]+#([89]|[0-9][0-9]+) ' "$log" | head -40 |
      sed 's/^/    /'
    cp "$log" "$dir/artifacts/$n.log"
  fi
  rm -rf "$scratch" "$log"
done
[[ $failed -eq 0 ]]
