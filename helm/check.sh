#!/usr/bin/env bash
# `make helm-check`: offline checks of the Helm chart, no cluster needed.
#   1. helm lint --strict, with the default values and each ci/*-values.yaml
#   2. helm template of the same, into build/helm/
#   3. values that must be refused (schema ranges, cross-field checks) are
#   4. NOTES.txt renders
#   5. when the service binaries are built (build/rel/bin, or PARLEY_BIN):
#      each service starts with the rendered ConfigMap and env and gets past
#      its configuration checks (it then fails to reach Kafka, on purpose)
#   6. the rendered manifests against the Kubernetes OpenAPI schemas, with
#      kubernetes-validate (PyPI) when it is installed
# Skips (exit 0, with the reason) when helm is not installed: the chart is
# not part of `make test`, and helm is not a build dependency.
# Env: HELM (helm binary), KUBE_VERSION (default 1.31.0),
#      KUBERNETES_VALIDATE (kubernetes-validate binary), PARLEY_BIN.
set -uo pipefail
cd "$(dirname "$0")/.."

CHART=helm/parley
OUT=build/helm
KUBE_VERSION=${KUBE_VERSION:-1.31.0}

HELM=${HELM:-$(command -v helm || true)}
if [ -z "$HELM" ] && command -v go >/dev/null && [ -x "$(go env GOPATH)/bin/helm" ]; then
  HELM="$(go env GOPATH)/bin/helm"
fi
if [ -z "$HELM" ] || ! [ -x "$HELM" ]; then
  echo "helm-check: SKIPPED: helm is not installed."
  echo "  Install it with: GOFLAGS=-modcacherw go install helm.sh/helm/v3/cmd/helm@v3.22.0"
  echo "  (or put helm on PATH, or set HELM=/path/to/helm)"
  exit 0
fi
KV=${KUBERNETES_VALIDATE:-$(command -v kubernetes-validate || true)}

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
ko() { fail=$((fail + 1)); echo "FAIL $*"; }

mkdir -p "$OUT"
echo "helm-check: $("$HELM" version --short 2>/dev/null || "$HELM" version), Kubernetes $KUBE_VERSION"

# Value sets: the defaults, then every ci/*-values.yaml.
sets=("default:")
for f in "$CHART"/ci/*-values.yaml; do
  [ -e "$f" ] && sets+=("$(basename "$f" -values.yaml):$f")
done

for s in "${sets[@]}"; do
  name=${s%%:*}
  file=${s#*:}
  args=()
  [ -n "$file" ] && args=(-f "$file")
  if "$HELM" lint --strict "$CHART" "${args[@]}" --kube-version "$KUBE_VERSION" >"$OUT/lint-$name.log" 2>&1; then
    ok "lint --strict ($name)"
  else
    ko "lint --strict ($name): see $OUT/lint-$name.log"; cat "$OUT/lint-$name.log"
  fi
  if "$HELM" template parley "$CHART" --namespace parley "${args[@]}" \
       --kube-version "$KUBE_VERSION" >"$OUT/$name.yaml" 2>"$OUT/template-$name.log"; then
    ok "template ($name) -> $OUT/$name.yaml ($(grep -c '^kind:' "$OUT/$name.yaml") objects)"
  else
    ko "template ($name): $(cat "$OUT/template-$name.log")"
  fi
done

# Values the chart must refuse, each with the message that says why.
refuse() {
  local why=$1 expect=$2
  shift 2
  local msg
  if msg=$("$HELM" template parley "$CHART" --kube-version "$KUBE_VERSION" "$@" 2>&1 >/dev/null); then
    ko "accepted $why ($*)"
  elif grep -q -- "$expect" <<<"$msg"; then
    ok "refused $why"
  else
    ko "refused $why, but not for the expected reason ($expect): $msg"
  fi
}
refuse "partitions out of range" "partitions" --set config.partitions=0
refuse "idleMs <= pingMs" "must exceed config.pingMs" --set config.idleMs=30000
refuse "unknown service type" "type" --set gateway.service.type=Ingress
refuse "privileged admin port" "adminPort" --set messageStore.adminPort=90
refuse "HPA min > max" "minReplicas exceeds" --set receipt.autoscaling.enabled=true \
  --set receipt.autoscaling.minReplicas=9 --set receipt.autoscaling.maxReplicas=3
refuse "misspelt value" "additional properties" --set gateway.replica=3
refuse "non-mongodb URI" "uri" --set mongo.uri=postgres://db/parley
refuse "no token key at all" "no auth.jwks" --set auth.hs256=false
refuse "SASL without a password" "needs saslMechanism" --set kafka.security.protocol=sasl_ssl \
  --set kafka.security.saslMechanism=PLAIN --set kafka.security.username=parley
refuse "unknown Kafka protocol" "protocol" --set kafka.security.protocol=tls
refuse "JWKS from two places" "not both" --set auth.jwks.existingSecret=a \
  --set auth.jwks.existingConfigMap=b
refuse "push without a signing key" "refuses to start without the signing key" \
  --set pushNotifications.url=https://push.example/hook
refuse "push URL not http(s)" "url" --set pushNotifications.url=ftp://push.example/hook

# NOTES.txt is rendered only by install/upgrade, which want a cluster:
# render it through a copy of the chart where it is an ordinary template.
notes_dir=$(mktemp -d)
trap 'rm -rf "$notes_dir"' EXIT
cp -r "$CHART" "$notes_dir/parley"
{ echo '{{- define "parley.notesCheck" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end }}'; } \
  >"$notes_dir/parley/templates/_notes_check.tpl"
rm "$notes_dir/parley/templates/NOTES.txt"
printf 'notes: |\n  {{- include "parley.notesCheck" . | nindent 2 }}\n' >"$notes_dir/parley/templates/notes-check.yaml"
for s in "${sets[@]}"; do
  name=${s%%:*}
  file=${s#*:}
  args=()
  [ -n "$file" ] && args=(-f "$file")
  if "$HELM" template parley "$notes_dir/parley" --kube-version "$KUBE_VERSION" "${args[@]}" \
       --show-only templates/notes-check.yaml >"$OUT/notes-$name.txt" 2>&1; then
    ok "NOTES.txt renders ($name) -> $OUT/notes-$name.txt"
  else
    ko "NOTES.txt ($name): $(cat "$OUT/notes-$name.txt")"
  fi
done

# The gateway id must come from the pod name (unique, stable).
if grep -q 'fieldPath: metadata.name' "$OUT/default.yaml"; then
  ok "PARLEY_GATEWAY_ID from metadata.name"
else
  ko "PARLEY_GATEWAY_ID is not taken from metadata.name"
fi

# Chart faults a real cluster found (issue 19), one check each.
# 1. A ServiceMonitor only where its CRD is: prod values ask for one; a
#    cluster without the Prometheus Operator refused the whole install.
count_kind() { grep -c "^kind: $1\$" || true; }
n=$("$HELM" template parley "$CHART" -f "$CHART/ci/prod-values.yaml" --kube-version "$KUBE_VERSION" | count_kind ServiceMonitor)
m=$("$HELM" template parley "$CHART" -f "$CHART/ci/prod-values.yaml" --kube-version "$KUBE_VERSION" \
      --api-versions monitoring.coreos.com/v1/ServiceMonitor | count_kind ServiceMonitor)
if [ "$n" = 0 ] && [ "$m" = 1 ]; then
  ok "ServiceMonitor rendered only with its CRD (without: $n, with: $m)"
else
  ko "ServiceMonitor without the CRD: $n object(s), with it: $m (want 0 and 1)"
fi
# 2. Every ci value set installs on its own: each serviceAccountName a pod
#    names is created by the same render.
if python3 -c "import yaml" 2>/dev/null; then
  for s in "${sets[@]}"; do
    name=${s%%:*}
    if why=$(python3 - "$OUT/$name.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
have = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
for d in docs:
    spec = d.get("spec", {}).get("template", {}).get("spec", {})
    sa = spec.get("serviceAccountName")
    if sa and sa not in have:
        print(f'{d["kind"]} {d["metadata"]["name"]} runs as ServiceAccount {sa}, which nothing creates')
        sys.exit(1)
PY
    ); then
      ok "every ServiceAccount the pods use is created ($name)"
    else
      ko "ServiceAccount ($name): $why"
    fi
  done
fi

# An existing ServiceAccount (serviceAccount.create=false): none rendered,
# every pod runs as the one named.
ext=$("$HELM" template parley "$CHART" --kube-version "$KUBE_VERSION" \
        --set serviceAccount.create=false --set serviceAccount.name=corp-sa)
if [ "$(count_kind ServiceAccount <<<"$ext")" = 0 ] &&
   [ "$(grep -c 'serviceAccountName: corp-sa' <<<"$ext")" = "$(grep -c 'serviceAccountName:' <<<"$ext")" ]; then
  ok "an existing ServiceAccount is used, not created"
else
  ko "serviceAccount.create=false still renders a ServiceAccount, or a pod runs as another"
fi

# The services refuse a setting that does not parse (exit 2, "bad
# configuration"): run each one with exactly the environment the chart
# gives its pod (a JWKS in the tree stands for the mounted one). Kafka
# points at a closed local port so nothing gets past start-up (no listener
# is bound); the run is cut after 3 s.
BIN=${PARLEY_BIN:-build/rel/bin}
if [ -x "$BIN/gateway" ] && python3 -c "import yaml" 2>/dev/null; then
  for s in "${sets[@]}"; do
    name=${s%%:*}
    for svc in gateway presence message-store receipt group-fanout push; do
      mapfile -t envs < <(python3 helm/podenv.py "$OUT/$name.yaml" "$svc" \
        PARLEY_KAFKA_BROKERS=127.0.0.1:1 PARLEY_JWT_SECRET="$(printf 'x%.0s' {1..48})" \
        PARLEY_JWT_JWKS_FILE=fuzz/jwt.jwks.json PARLEY_PUSH_SECRET=check-push-secret \
        PARLEY_MONGO_URI='mongodb://127.0.0.1:1/?retryWrites=false')
      log=$(timeout 3 env -i "${envs[@]}" "$BIN/$svc" 2>&1)
      rc=$?
      if [ "$rc" -eq 2 ] || grep -q '"bad configuration"' <<<"$log"; then
        ko "$svc refuses the $name configuration: $(grep -m1 'bad configuration' <<<"$log")"
      else
        ok "$svc accepts the $name configuration"
      fi
    done
  done
else
  echo "skip service configuration check: no service binaries in $BIN (run make, or set PARLEY_BIN), or no python3 with PyYAML"
fi

if [ -n "$KV" ]; then
  for s in "${sets[@]}"; do
    name=${s%%:*}
    # CRDs (ServiceMonitor) have no schema there: a warning, not a failure.
    if "$KV" -k "$KUBE_VERSION" --strict --quiet "$OUT/$name.yaml" >"$OUT/validate-$name.log" 2>&1; then
      ok "kubernetes-validate --strict -k $KUBE_VERSION ($name)$(grep -q WARN "$OUT/validate-$name.log" && echo ": $(grep WARN "$OUT/validate-$name.log" | sed 's/.*WARN [^ ]* //' | tr '\n' ' ')")"
    else
      ko "kubernetes-validate ($name)"; cat "$OUT/validate-$name.log"
    fi
  done
else
  echo "skip kubernetes schema validation: kubernetes-validate is not installed (pip install kubernetes-validate)"
fi

echo "helm-check: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
