#!/usr/bin/env bash
# tests/k8s/test.sh (`make test-k8s`): the Helm chart on a real one-node
# Kubernetes (deploy/local/k8s.sh) running the image of `make image`.
#   1. the cluster up; a Kafka and a MongoDB-wire server (deploy/local/stack.sh)
#      on the node's address, which the pods reach over the CNI bridge
#   2. for each value set (the chart's defaults, ci/small-values.yaml,
#      ci/prod-values.yaml): install into a namespace that enforces the
#      `restricted` Pod Security Standard, wait for every pod Ready, send
#      1:1, group and receipt traffic through the gateway Service
#      (tests/k8s/client.py; right after an install, repeated until it
#      works, at most 6 min, and the delay printed: docs/deploy.md),
#      uninstall and wait for every pod gone
#   3. on the default install, also: a `helm upgrade` that rolls every
#      workload (the five services and push) while a client sends (every
#      message answered `sent` must arrive: counted), the generated JWT key
#      kept by the upgrade, and message-store scaled to 2 replicas and back
#      with traffic checked at each size
#   4. everything it started stopped (trap), pass/fail counts printed.
# Values every install overrides, because of this one 2-core node and its
# local stack: the image (localhost/parley:dev, pullPolicy Never: images
# are imported, no registry), Kafka's and MongoDB's addresses, topic
# replication 1, small CPU and memory requests; prod also gets plaintext
# Kafka, the Secrets it names (made here; its push webhook's host does not
# exist, which only the push workload's calls notice), 2 replicas where it
# asks for 3-8, and its edge node label on the node.
# Environment: PARLEY_IMAGE (parley:dev; built by deploy/docker/image.sh
# when missing; `make test-k8s` builds it first), HELM, PARLEY_K8S_SETS
# ("default small prod"), PARLEY_K8S_KEEP=1 leaves the cluster up after
# the test (k8s.sh down stops it), and those of deploy/local/k8s.sh and
# stack.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."

HELM=${HELM:-$(command -v helm || true)}
[ -n "$HELM" ] || [ ! -x "$(go env GOPATH 2>/dev/null)/bin/helm" ] || HELM=$(go env GOPATH)/bin/helm
[ -n "$HELM" ] || { echo "test-k8s: helm not found (set HELM)"; exit 1; }
command -v kubectl >/dev/null || { echo "test-k8s: kubectl not found"; exit 1; }
IMAGE=${PARLEY_IMAGE:-parley:dev}
SETS=${PARLEY_K8S_SETS:-default small prod}
K8S=deploy/local/k8s.sh
CACHE=$(realpath -m "${PARLEY_CACHE:-$HOME/.cache/parley}")
export PARLEY_K8S_DIR=${PARLEY_K8S_DIR:-$CACHE/k8s-run}
export PARLEY_STACK_DIR=${PARLEY_STACK_DIR:-$PARLEY_K8S_DIR/stack}
export PARLEY_STACK_HOST=10.88.0.1     # the node's address (k8s.sh)
export PARLEY_FERRETDB_BACKEND=${PARLEY_FERRETDB_BACKEND:-sqlite}
KAFKA=$PARLEY_STACK_HOST:${PARLEY_KAFKA_PORT:-19092}
MONGO="mongodb://$PARLEY_STACK_HOST:${PARLEY_MONGO_PORT:-27018}/?retryWrites=false"
OUT=build/test-k8s
mkdir -p "$OUT"
RUN_ID=$$
SOAK_PID=

pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
ko() { fail=$((fail + 1)); echo "FAIL $*"; }
ns_() { bash "$K8S" exec "$@"; }
kc() { ns_ kubectl "$@"; }
hm() { ns_ "$HELM" "$@"; }
t0=$SECONDS
took() { echo "$((SECONDS - $1)) s"; }

cleanup() {
  [ -z "$SOAK_PID" ] || kill "$SOAK_PID" 2>/dev/null
  ns_ bash deploy/local/stack.sh destroy >/dev/null 2>&1
  if [ "${PARLEY_K8S_KEEP:-0}" != 1 ]; then bash "$K8S" down; fi
  echo "test-k8s: $pass passed, $fail failed in $(took "$t0")"
}
trap cleanup EXIT

# ---- the cluster, the stack, the image ----------------------------------------

t=$SECONDS
bash "$K8S" up || { ko "the cluster did not come up"; exit 1; }
ok "cluster up in $(took "$t") (kube-apiserver, controller manager, scheduler, containerd, kubelet, kube-proxy)"
t=$SECONDS
ns_ bash deploy/local/stack.sh start >"$OUT/stack.log" 2>&1 || { cat "$OUT/stack.log"; ko "stack"; exit 1; }
ok "Kafka and MongoDB-wire server on $PARLEY_STACK_HOST in $(took "$t")"
export CONTAINERS_CONF=$PWD/deploy/docker/containers.conf
podman image exists "$IMAGE" || bash deploy/docker/image.sh "$IMAGE" || { ko "make image"; exit 1; }
t=$SECONDS
bash "$K8S" import "$IMAGE" >/dev/null || { ko "importing $IMAGE into the node"; exit 1; }
ok "$IMAGE imported into containerd in $(took "$t")"
repo=${IMAGE%:*}; [[ "$repo" == */* ]] || repo=localhost/$repo

# ---- helpers ---------------------------------------------------------------------

# The values every install gets (see the header).
common_sets() {
  local set=$1
  echo --set image.repository="$repo" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never
  echo --set kafka.brokers="$KAFKA" --set kafka.replicationFactor=1
  echo --set config.topicPrefix="k8s$RUN_ID$set."
  local c
  for c in gateway presence messageStore receipt groupFanout push; do
    echo --set "$c.resources.requests.cpu=20m" --set "$c.resources.requests.memory=64Mi"
  done
}

# wait_ready NS: every pod of the namespace Ready, none left over from an old
# ReplicaSet (bounded).
wait_ready() {
  local ns=$1 deadline=$((SECONDS + 300)) not
  while [ "$SECONDS" -lt "$deadline" ]; do
    not=$(kc get pods -n "$ns" --no-headers \
      -o custom-columns=N:.metadata.name,R:'.status.conditions[?(@.type=="Ready")].status',D:.metadata.deletionTimestamp 2>/dev/null |
      awk '$2 != "True" || $3 != "<none>"' | wc -l)
    [ "$(kc get pods -n "$ns" --no-headers 2>/dev/null | wc -l)" -gt 0 ] && [ "$not" -eq 0 ] && return 0
    sleep 1
  done
  kc get pods -n "$ns" -o wide
  local p
  for p in $(kc get pods -n "$ns" --no-headers | awk '$2 !~ /^([0-9]+)\/\1$/ { print $1 }'); do
    echo "--- $p (last lines of its log)"
    kc logs -n "$ns" "$p" --tail=3 2>&1
  done
  return 1
}

# check NS SET TAG [quiet]: client.py's 1:1, receipt and group scenario through the
# gateway Service's cluster IP.
check() {
  local ns=$1 set=$2 tag=$3 ip port secret
  ip=$(kc get svc -n "$ns" parley-gateway -o jsonpath='{.spec.clusterIP}')
  port=$(kc get svc -n "$ns" parley-gateway -o jsonpath='{.spec.ports[0].port}')
  secret=$(jwt_secret "$ns" "$set")
  if ns_ env PARLEY_JWT_ISSUER="${ISSUER:-}" PARLEY_JWT_AUDIENCE="${AUDIENCE:-}" \
      timeout 300 python3 tests/k8s/client.py check "$ip" "$port" "$secret" "$tag$RUN_ID" >"$OUT/check-$set-$tag.log" 2>&1; then
    ok "$set ($tag): 1:1, delivered + read receipts, group through Service $ip:$port"
  elif [ "${4:-}" = quiet ]; then
    return 1
  else
    ko "$set ($tag): traffic through the gateway Service: $(tail -n 1 "$OUT/check-$set-$tag.log")"
  fi
}

# first_check NS SET: the same scenario right after an install, repeated
# (new users each time) until it passes or 6 minutes pass. A fresh
# install's services create their topics as they start, and a consumer
# that subscribed before its topic existed may wait for librdkafka's next
# metadata refresh (up to 5 min) before it consumes: every pod is Ready,
# yet receipts or group answers do not come yet. The delay is printed.
first_check() {
  local ns=$1 set=$2 t=$SECONDS n=0
  while :; do
    n=$((n + 1))
    check "$ns" "$set" "first$n" quiet && break
    if [ $((SECONDS - t)) -ge 360 ]; then
      ko "$set: traffic through the gateway Service never worked in 6 min: $(tail -n 1 "$OUT/check-$set-first$n.log")"
      return 1
    fi
  done
  [ "$n" -eq 1 ] || echo "note $set: the first $((n - 1)) attempts failed; traffic fully worked $(took "$t") after every pod was Ready (logs: $OUT/check-$set-first*.log)"
}

jwt_secret() {
  local key=PARLEY_JWT_SECRET name=parley
  [ "$2" = prod ] && { key=secret; name=parley-jwt; }
  kc get secret -n "$1" "$name" -o jsonpath="{.data.$key}" | base64 -d
}

install() {
  local set=$1 ns=parley-$1 t=$SECONDS args
  mapfile -t args < <(common_sets "$set" | tr ' ' '\n')
  case $set in
    small) args+=(-f helm/parley/ci/small-values.yaml --set gateway.image.tag="${IMAGE##*:}"
                  --set gateway.image.pullPolicy=Never --set mongo.uri="$MONGO") ;;
    prod) args+=(-f helm/parley/ci/prod-values.yaml "${PROD_SETS[@]}") ;;
    *) args+=(--set mongo.uri="$MONGO" --set messageStore.replicas=1) ;;
  esac
  kc delete namespace "$ns" --ignore-not-found --timeout=180s >/dev/null 2>&1 # a run that was cut short
  kc create namespace "$ns" >/dev/null
  kc label namespace "$ns" pod-security.kubernetes.io/enforce=restricted >/dev/null
  [ "$set" != prod ] || prod_prepare "$ns"
  if hm install parley helm/parley -n "$ns" "${args[@]}" >"$OUT/install-$set.log" 2>&1 && wait_ready "$ns"; then
    ok "$set: helm install into a restricted namespace, $(kc get pods -n "$ns" --no-headers | wc -l) pods Ready in $(took "$t")"
    return 0
  fi
  ko "$set: install or readiness (log: $OUT/install-$set.log)"
  tail -n 5 "$OUT/install-$set.log"
  return 1
}

uninstall() {
  local set=$1 ns=parley-$1 t=$SECONDS
  local deadline=$((SECONDS + 180)) left=1
  if hm uninstall parley -n "$ns" --wait --timeout 3m >"$OUT/uninstall-$set.log" 2>&1; then
    # Pods end after their grace period, which helm does not wait for.
    while [ "$SECONDS" -lt "$deadline" ]; do
      left=$(kc get all -n "$ns" --no-headers 2>/dev/null | wc -l)
      [ "$left" -eq 0 ] && break
      sleep 1
    done
  fi
  if [ "$left" -eq 0 ]; then
    ok "$set: helm uninstall --wait, nothing left, in $(took "$t")"
  else
    ko "$set: uninstall left: $(kc get all -n "$ns" --no-headers 2>&1 | head -n 3)"
  fi
  kc delete namespace "$ns" --wait=false >/dev/null 2>&1
}

# ---- prod: what its values name, made here --------------------------------------

ISSUER=; AUDIENCE=
PROD_SETS=(--set kafka.security.protocol=plaintext --set kafka.security.saslMechanism=
           --set kafka.security.username= --set kafka.security.passwordSecret=
           --set kafka.security.tlsSecret= --set mongo.tlsSecret=
           --set gateway.replicas=2 --set gateway.autoscaling.minReplicas=2
           --set messageStore.autoscaling.minReplicas=2 --set presence.replicas=2
           --set receipt.replicas=2 --set groupFanout.replicas=2)
# A JWKS with one RS256 public key (the gateway refuses one without a
# signing key it can use); the private half is thrown away: the test's
# tokens are HS256.
test_jwks() {
  openssl genrsa 2048 2>/dev/null | openssl rsa -noout -modulus | cut -d= -f2 | python3 -c '
import base64, json, sys
n = base64.urlsafe_b64encode(bytes.fromhex(sys.stdin.read().strip())).rstrip(b"=").decode()
print(json.dumps({"keys": [{"kty": "RSA", "kid": "k8s-test", "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"}]}))'
}

prod_prepare() {
  local ns=$1
  kc create secret generic -n "$ns" parley-jwt --from-literal=secret="$(head -c 36 /dev/urandom | base64)" >/dev/null
  kc create secret generic -n "$ns" parley-mongo --from-literal=connectionString="$MONGO" >/dev/null
  kc create secret generic -n "$ns" parley-push --from-literal=PARLEY_PUSH_SECRET="$(head -c 24 /dev/urandom | base64)" >/dev/null
  kc create secret generic -n "$ns" parley-idp-jwks --from-literal=jwks.json="$(test_jwks)" >/dev/null
  kc label node parley-node node-role/edge=true --overwrite >/dev/null
  ISSUER=https://login.example.com/ AUDIENCE=parley
}

# ---- the default install: upgrade under traffic, scaling --------------------------

upgrade_under_traffic() {
  local ns=parley-default stop=$OUT/soak.stop ip port secret key_before t
  ip=$(kc get svc -n "$ns" parley-gateway -o jsonpath='{.spec.clusterIP}')
  port=$(kc get svc -n "$ns" parley-gateway -o jsonpath='{.spec.ports[0].port}')
  secret=$(jwt_secret "$ns" default)
  rm -f "$stop"
  ns_ python3 tests/k8s/client.py soak "$ip" "$port" "$secret" "$RUN_ID" "$stop" >"$OUT/soak.log" 2>&1 &
  SOAK_PID=$!
  # Wait until the first messages flow, so the roll happens under traffic.
  local deadline=$((SECONDS + 60))
  until grep -q "first sent" "$OUT/soak.log" || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.5; done
  declare -A before=()
  local w
  for w in $(kc get deploy,statefulset -n "$ns" -o name); do
    before[$w]=$(kc get -n "$ns" "$w" -o jsonpath='{.metadata.generation}')
  done
  t=$SECONDS
  if hm upgrade parley helm/parley -n "$ns" --reuse-values --set-string podAnnotations.rolled="$RUN_ID" \
       --wait --timeout 10m >"$OUT/upgrade.log" 2>&1 && wait_ready "$ns"; then
    local rolled=0 total=0
    for w in "${!before[@]}"; do
      total=$((total + 1))
      # A new generation, fully rolled out to pods carrying the annotation.
      [ "$(kc get -n "$ns" "$w" -o jsonpath='{.metadata.generation}')" -gt "${before[$w]}" ] &&
        kc rollout status -n "$ns" "$w" --timeout=10s >/dev/null 2>&1 && rolled=$((rolled + 1))
    done
    local stale
    stale=$(kc get pods -n "$ns" -o jsonpath='{range .items[*]}{.metadata.annotations.rolled}{"\n"}{end}' | grep -cvx "$RUN_ID")
    if [ "$rolled" -eq "$total" ] && [ "$total" -ge 5 ] && [ "$stale" -eq 0 ]; then
      ok "helm upgrade rolled all $total workloads in $(took "$t"), every pod replaced"
    else
      ko "helm upgrade: $rolled of $total workloads rolled, $stale pods not replaced"
    fi
  else
    ko "helm upgrade (log: $OUT/upgrade.log)"
  fi
  touch "$stop"
  wait "$SOAK_PID"
  local rc=$?
  SOAK_PID=
  if [ "$rc" -eq 0 ]; then ok "during the upgrade: $(grep '^soak:' "$OUT/soak.log" | tail -n 1)"
  else ko "messages lost during the upgrade: $(tail -n 2 "$OUT/soak.log" | tr '\n' ' ')"; fi
  [ "$(jwt_secret "$ns" default)" = "$secret" ] && ok "helm upgrade kept the generated JWT key (lookup)" ||
    ko "helm upgrade changed the generated JWT key: issued tokens are void"
}

scale_message_store() {
  local ns=parley-default n t
  for n in 2 1; do
    t=$SECONDS
    kc scale -n "$ns" deployment/parley-message-store --replicas=$n >/dev/null
    kc rollout status -n "$ns" deployment/parley-message-store --timeout=5m >/dev/null 2>&1
    if wait_ready "$ns" &&
       [ "$(kc get pods -n "$ns" -l app.kubernetes.io/component=message-store --no-headers | wc -l)" -eq "$n" ]; then
      ok "message-store scaled to $n in $(took "$t")"
    else
      ko "message-store did not reach $n Ready replicas"
    fi
    check "$ns" default "scaled$n"
  done
}

for set in $SETS; do
  install "$set" || { uninstall "$set"; continue; }
  first_check "parley-$set" "$set"
  if [ "$set" = default ]; then
    upgrade_under_traffic
    check "parley-$set" "$set" upgraded
    scale_message_store
  fi
  uninstall "$set"
  ISSUER=; AUDIENCE=
done

[ "$fail" -eq 0 ]
