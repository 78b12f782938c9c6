#!/usr/bin/env bash
# Runs the six services on this machine with exactly the environment the
# chart renders for their pods (helm/podenv.py), against a private local
# Kafka + MongoDB-wire stack (deploy/local/stack.sh, own ports and data dir),
# then checks what Kubernetes would: /healthz and /readyz answer 200 on the
# probe ports, /metrics serves parley_* series, one message goes from alice
# to bob through the gateway, and SIGTERM stops each service well inside its
# terminationGracePeriodSeconds. Stops and deletes everything it started.
# Only the listen addresses differ from a pod (loopback ports here, since the
# pods' 8080/9090 cannot all bind on one host), and the topic replication
# factor is 1 (one broker).
# SMOKE_RUNNER=podman runs each service from the image instead (PARLEY_IMAGE,
# default parley:dev, made by `make image`), as a pod would: read-only root,
# every capability dropped, no new privileges, its non-root user, host
# network; it also checks the image's user and that every binary finds its
# libraries.
# Needs: helm (HELM), built binaries (build/rel/bin or PARLEY_BIN) or the
# image, python3 with PyYAML, curl. Not part of `make test` or `make helm-check`.
set -uo pipefail
cd "$(dirname "$0")/.."

HELM=${HELM:-$(command -v helm || true)}
[ -n "$HELM" ] || [ ! -x "$(go env GOPATH 2>/dev/null)/bin/helm" ] || HELM=$(go env GOPATH)/bin/helm
BIN=${PARLEY_BIN:-build/rel/bin}
RUNNER=${SMOKE_RUNNER:-host}
IMAGE=${PARLEY_IMAGE:-parley:dev}
[ -n "$HELM" ] || { echo "smoke-local: helm not found (set HELM)"; exit 1; }
case $RUNNER in
  host) [ -x "$BIN/gateway" ] || { echo "smoke-local: no binaries in $BIN (run make)"; exit 1; } ;;
  podman)
    export CONTAINERS_CONF=$PWD/deploy/docker/containers.conf
    podman image exists "$IMAGE" || { echo "smoke-local: no image $IMAGE (run make image)"; exit 1; } ;;
  *) echo "smoke-local: SMOKE_RUNNER is host or podman"; exit 1 ;;
esac

# Default ports sit below Linux's ephemeral range (32768-60999): a port up
# there can be some outgoing connection's source port at the moment we bind.
export PARLEY_STACK_DIR=${PARLEY_STACK_DIR:-/tmp/parley-helm-smoke}
export PARLEY_KAFKA_PORT=${PARLEY_KAFKA_PORT:-31092}
export PARLEY_KAFKA_CONTROLLER_PORT=${PARLEY_KAFKA_CONTROLLER_PORT:-31093}
export PARLEY_MONGO_PORT=${PARLEY_MONGO_PORT:-31018}
export PARLEY_FERRETDB_BACKEND=${PARLEY_FERRETDB_BACKEND:-sqlite}
BASE=${SMOKE_PORT_BASE:-31080}
OUT=build/helm-smoke
mkdir -p "$OUT"

declare -A PORT=([gateway]=$BASE [presence]=$((BASE + 1)) [message-store]=$((BASE + 2))
                 [receipt]=$((BASE + 3)) [group-fanout]=$((BASE + 4)) [push]=$((BASE + 5)))
SERVICES=(presence message-store receipt group-fanout push gateway)
declare -A PID=()
SECRET=$(printf 'k%.0s' {1..48})

cleanup() {
  for s in "${!PID[@]}"; do kill -TERM "${PID[$s]}" 2>/dev/null; done
  wait 2>/dev/null
  [ "$RUNNER" = host ] || podman rm -f $(podman ps -aq --filter "name=smoke$$-") >/dev/null 2>&1
  bash deploy/local/stack.sh destroy >/dev/null 2>&1
}
trap cleanup EXIT

pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
ko() { fail=$((fail + 1)); echo "FAIL $*"; }

# cmd NAME [ENV...] [-- ARG...]: sets CMD to the command line that runs a
# service (or parleyctl) on the host, or from the image with a pod's
# restrictions.
cmd() {
  local name=$1 envs=() args=()
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  if [ "$RUNNER" = host ]; then
    CMD=(env -i "${envs[@]}" "$BIN/$name" "$@")
    return
  fi
  for e in "${envs[@]}"; do args+=(--env "$e"); done
  CMD=(podman run --rm --name "smoke$$-$name-$RANDOM" --network host --read-only --cap-drop ALL
       --security-opt no-new-privileges "${args[@]}" "$IMAGE" "/usr/local/bin/$name" "$@")
}

if [ "$RUNNER" = podman ]; then
  uid=$(podman run --rm "$IMAGE" id -u)
  [ "$uid" = 10001 ] && ok "image runs as uid $uid" || ko "image runs as uid $uid, not 10001"
  missing=$(podman run --rm --entrypoint sh "$IMAGE" -c 'ldd /usr/local/bin/* | grep "not found"' | sort -u)
  [ -z "$missing" ] && ok "every binary in the image finds its libraries" || ko "missing libraries: $missing"
fi

bash deploy/local/stack.sh start >"$OUT/stack.log" 2>&1 || { cat "$OUT/stack.log"; exit 1; }
"$HELM" template parley helm/parley --kube-version 1.31.0 "$@" \
  --set kafka.replicationFactor=1 --set config.topicPrefix="smoke$$." >"$OUT/rendered.yaml" || exit 1

for s in "${SERVICES[@]}"; do
  mapfile -t envs < <(python3 helm/podenv.py "$OUT/rendered.yaml" "$s" \
    PARLEY_KAFKA_BROKERS=127.0.0.1:$PARLEY_KAFKA_PORT \
    PARLEY_MONGO_URI="mongodb://127.0.0.1:$PARLEY_MONGO_PORT/?retryWrites=false" \
    PARLEY_JWT_SECRET="$SECRET" PARLEY_PUSH_SECRET="$SECRET" \
    PARLEY_LISTEN=127.0.0.1:${PORT[$s]} PARLEY_ADMIN_LISTEN=127.0.0.1:${PORT[$s]})
  cmd "$s" "${envs[@]}"
  "${CMD[@]}" >"$OUT/$s.log" 2>&1 &
  PID[$s]=$!
done

for s in "${SERVICES[@]}"; do
  url=http://127.0.0.1:${PORT[$s]}
  code=000
  for _ in $(seq 120); do   # the startup probe allows 60 s
    code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$url/readyz")
    [ "$code" = 200 ] && break
    sleep 0.5
  done
  if [ "$code" = 200 ] && [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ]; then
    ok "$s: /healthz and /readyz 200"
  else
    ko "$s: /readyz $code (log: $OUT/$s.log)"
  fi
  n=$(curl -s -m 2 "$url/metrics" | grep -c '^parley_')
  [ "$n" -gt 0 ] && ok "$s: /metrics, $n parley_* lines" || ko "$s: no parley_* metrics"
done

ctl_env=(PARLEY_JWT_SECRET="$SECRET" PARLEY_URL=ws://127.0.0.1:${PORT[gateway]})
cmd parleyctl "${ctl_env[@]}" -- listen --as bob
timeout 20 "${CMD[@]}" >"$OUT/listen.out" 2>&1 &
sleep 3
cmd parleyctl "${ctl_env[@]}" -- send --as alice --to bob "smoke $$"
timeout 15 "${CMD[@]}" >"$OUT/send.out" 2>&1
for _ in $(seq 20); do grep -q "smoke $$" "$OUT/listen.out" && break; sleep 0.5; done
grep -q "\"body\":\"smoke $$\"" "$OUT/listen.out" && ok "alice -> bob delivered through the gateway" \
  || ko "message not delivered (send: $(cat "$OUT/send.out"))"

for s in gateway "${SERVICES[@]:0:5}"; do
  grace=$(python3 -c "
import sys, yaml
d = [x for x in yaml.safe_load_all(open('$OUT/rendered.yaml')) if x and x['kind'] in ('Deployment', 'StatefulSet')
     and x['metadata']['labels']['app.kubernetes.io/component'] == '$s'][0]
print(d['spec']['template']['spec']['terminationGracePeriodSeconds'])")
  t0=$(date +%s%N)
  kill -TERM "${PID[$s]}"
  wait "${PID[$s]}"
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  unset "PID[$s]"
  if [ "$rc" -eq 0 ] && [ "$ms" -lt $((grace * 1000)) ]; then
    ok "$s: SIGTERM -> exit 0 in $ms ms (grace ${grace} s)"
  else
    ko "$s: SIGTERM -> exit $rc in $ms ms (grace ${grace} s)"
  fi
done

echo "smoke-local: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
