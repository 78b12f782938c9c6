#!/usr/bin/env bash
# deploy/local/k8s.sh: owns a throwaway one-node Kubernetes on this machine,
# for `make test-k8s`: etcd and containerd from Debian, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy built from
# the Go module proxy (deploy/local/k8s-build.sh). Everything but the
# containerd shims' sockets lives in one directory and one network
# namespace that this script makes: the node's address is on a bridge in
# that namespace, the pods' veths hang off it (the CNI bridge plugin),
# kube-proxy writes its iptables rules there, and nothing reaches the
# host's own interfaces. Needs root (network namespaces, mounts, cgroups).
#
#   k8s.sh up         build if needed, start everything, wait for the node Ready
#   k8s.sh down       stop everything it started, delete pods' mounts, the
#                     namespace and the cgroups, keep the directory
#   k8s.sh destroy    down, then delete the directory (etcd's data included)
#   k8s.sh exec CMD   run CMD inside the namespace with KUBECONFIG set
#   k8s.sh import IMG copy a podman image into the node (podman save | ctr import)
#
# Environment (defaults):
#   PARLEY_CACHE ($HOME/.cache/parley)   the built binaries, the pause image
#   PARLEY_K8S_DIR ($PARLEY_CACHE/k8s-run) configs, certificates, data, logs
#   PARLEY_K8S_NETNS (parley-k8s)        the network namespace's name
#   PARLEY_K8S_PORT_BASE (25000)          ports: API server +443, etcd +379/+380,
#     controller manager +257, scheduler +259, kubelet +250/+248, kube-proxy
#     +249/+256, containerd streaming +10 (all inside the namespace)
#   PARLEY_K8S_TIMEOUT (180 s)            how long each start may take
# Addresses (inside the namespace only): node 10.88.0.1 on bridge cni0,
# pods 10.88.0.0/16, Services 10.96.0.0/16.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(realpath -m "${PARLEY_CACHE:-$HOME/.cache/parley}")
VERSION=${PARLEY_K8S_VERSION:-1.31.0}
BIN=$CACHE/k8s-$VERSION/bin
DIR=$(realpath -m "${PARLEY_K8S_DIR:-$CACHE/k8s-run}")
NS=${PARLEY_K8S_NETNS:-parley-k8s}
BASE=${PARLEY_K8S_PORT_BASE:-25000}
TIMEOUT=${PARLEY_K8S_TIMEOUT:-180}
NODE=parley-node
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/16
SVC_CIDR=10.96.0.0/16
SVC_IP=10.96.0.1
API_PORT=$((BASE + 443))
ETCD_PORT=$((BASE + 379))
PAUSE_IMAGE=localhost/parley-pause:1
CGROUP_ROOT=parley-k8s
CTRD_SOCK=$DIR/containerd/containerd.sock
export KUBECONFIG=$DIR/admin.kubeconfig
# Stopped in this order; started in the reverse one.
COMPONENTS=(kube-proxy kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd)

say() { echo "k8s: $*"; }
die() { echo "k8s: $*" >&2; exit 1; }
in_ns() { nsenter --net="/run/netns/$NS" -- "$@"; }
ctr_() { ctr --address "$CTRD_SOCK" -n k8s.io "$@"; }

# ---- network namespace ------------------------------------------------------

make_netns() {
  [ -e "/run/netns/$NS" ] || ip netns add "$NS"
  in_ns ip link set lo up
  in_ns ip link show cni0 >/dev/null 2>&1 || in_ns ip link add cni0 type bridge
  [[ "$(in_ns ip -4 -o addr show dev cni0)" == *" $NODE_IP/"* ]] ||
    in_ns ip addr add "$NODE_IP/${POD_CIDR#*/}" dev cni0
  in_ns ip link set cni0 up
  # A route for the Service range, so a connect() from the namespace itself
  # (the test's client) gets as far as kube-proxy's DNAT; there is no
  # default route.
  in_ns ip route replace "$SVC_CIDR" dev cni0 src "$NODE_IP"
  # Forwarding between pods and kube-proxy's DNAT of bridged traffic: both
  # are per namespace, so the host's settings stay untouched.
  in_ns sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
}

# ---- files made once per directory ------------------------------------------

make_pki() {
  [ -s "$DIR/pki/apiserver.crt" ] && return
  mkdir -p "$DIR/pki"
  (
    cd "$DIR/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=parley-k8s-ca \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr
    printf 'subjectAltName=IP:%s,IP:127.0.0.1,IP:%s,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost\n' \
      "$NODE_IP" "$SVC_IP" >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile san.ext -out apiserver.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    # One identity for every client (components, kubectl, helm): the test
    # checks the chart, not the cluster's own RBAC.
    printf '%s,admin,admin,system:masters\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >tokens.csv
  ) >"$DIR/pki.log" 2>&1 || die "making certificates failed; read $DIR/pki.log"
}

write_configs() {
  local token
  token=$(cut -d, -f1 "$DIR/pki/tokens.csv")
  cat >"$DIR/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: parley
  cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: "$DIR/pki/ca.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: parley
  context: {cluster: parley, user: admin}
current-context: parley
EOF
  chmod 600 "$DIR/admin.kubeconfig"
  mkdir -p "$DIR/cni" "$DIR/containerd" "$DIR/kubelet"
  cat >"$DIR/cni/10-parley.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "parley",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$DIR/cni/ipam"}}
  ]
}
EOF
  local cri='"io.containerd.grpc.v1.cri"'
  cat >"$DIR/containerd/config.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/containerd/opt"
[plugins.$cri]
  sandbox_image = "$PAUSE_IMAGE"
  # Without it runc cannot start a sandbox here ("can't get final child's
  # PID from pipe"): the kubelet asks for oom_score_adj values this
  # machine does not let a process lower itself to.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "$((BASE + 10))"
  [plugins.$cri.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins.$cri.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.$cri.containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins.$cri.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni"
EOF
  cat >"$DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $((BASE + 250))
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $((BASE + 248))
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failSwapOn: false
containerRuntimeEndpoint: unix://$CTRD_SOCK
resolvConf: /etc/resolv.conf
podLogsDir: $DIR/kubelet/pod-logs
serializeImagePulls: false
# A shared development machine: never evict the test's pods for disk or
# memory that other people's work uses.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  cat >"$DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$DIR/admin.kubeconfig"}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$((BASE + 256))
metricsBindAddress: 127.0.0.1:$((BASE + 249))
# Leave the kernel's conntrack limits alone (they are not per namespace).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# The sandbox ("pause") image: a static C program that sleeps until a
# signal, FROM scratch, saved once under PARLEY_CACHE. No registry here
# serves registry.k8s.io/pause.
pause_tar() {
  local tar=$CACHE/k8s-pause.tar dir
  [ -s "$tar" ] && { echo "$tar"; return; }
  dir=$(mktemp -d)
  cat >"$dir/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void)
{
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
EOF
  gcc -static -O2 -o "$dir/pause" "$dir/pause.c" >&2
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$dir/Containerfile"
  CONTAINERS_CONF=$HERE/../docker/containers.conf podman build -q -t "$PAUSE_IMAGE" -f "$dir/Containerfile" "$dir" >&2
  CONTAINERS_CONF=$HERE/../docker/containers.conf podman save -o "$tar.part" "$PAUSE_IMAGE" >&2
  mv "$tar.part" "$tar"
  rm -rf "$dir"
  echo "$tar"
}

# ---- processes ----------------------------------------------------------------

pid_of() {
  local f=$DIR/$1.pid p
  [ -f "$f" ] || return 1
  p=$(cat "$f")
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
  echo "$p"
}

# start NAME CMD...: runs CMD in the namespace, its output in NAME.log.
start() {
  local name=$1
  shift
  pid_of "$name" >/dev/null && return
  nohup nsenter --net="/run/netns/$NS" -- "$@" >>"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

# wait_for NAME CHECK...: polls CHECK until it succeeds or NAME dies.
wait_for() {
  local name=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    pid_of "$name" >/dev/null || die "$name exited during startup; read $DIR/$name.log"
    [ "$SECONDS" -lt "$deadline" ] || die "$name not ready in ${TIMEOUT}s; read $DIR/$name.log"
    sleep 0.5
  done
}

healthz() { in_ns curl -fsk -m 3 "https://127.0.0.1:$1/healthz"; }
api_ready() { in_ns curl -fs -m 3 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $(cut -d, -f1 "$DIR/pki/tokens.csv")" "https://$NODE_IP:$API_PORT/readyz"; }
node_ready() { in_ns kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True; }

# The kubelet's pods' cgroups go under /<CGROUP_ROOT> in every hierarchy.
make_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -e "$h/cgroup.procs" ] || continue
    mkdir -p "$h/$CGROUP_ROOT"
  done
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, mounts, cgroups)"
  local t0=$SECONDS
  bash "$HERE/k8s-build.sh"
  for b in etcd containerd ctr runc nsenter openssl gcc podman; do
    command -v "$b" >/dev/null || die "$b missing: run deploy/local/deps.sh k8s"
  done
  mkdir -p "$DIR"
  make_netns
  make_pki
  write_configs
  make_cgroups
  local pause
  pause=$(pause_tar)

  start etcd etcd --name parley --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((BASE + 380))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((BASE + 380))" \
    --initial-cluster "parley=http://127.0.0.1:$((BASE + 380))"
  wait_for etcd in_ns curl -fs -m 3 "http://127.0.0.1:$ETCD_PORT/health"
  say "etcd ready ($((SECONDS - t0)) s)"

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
    --tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" --token-auth-file="$DIR/pki/tokens.csv" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$DIR/pki/sa.pub" --service-account-signing-key-file="$DIR/pki/sa.key" \
    --service-cluster-ip-range="$SVC_CIDR" \
    --kubelet-preferred-address-types=InternalIP --profiling=false
  wait_for kube-apiserver api_ready
  say "kube-apiserver ready ($((SECONDS - t0)) s)"

  local kc=$DIR/admin.kubeconfig
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port=$((BASE + 257)) --leader-elect=false \
    --service-account-private-key-file="$DIR/pki/sa.key" --root-ca-file="$DIR/pki/ca.crt" \
    --use-service-account-credentials=false --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port=$((BASE + 259)) --leader-elect=false --profiling=false
  start containerd containerd --config "$DIR/containerd/config.toml"
  wait_for kube-controller-manager healthz $((BASE + 257))
  wait_for kube-scheduler healthz $((BASE + 259))
  wait_for containerd ctr_ version
  say "controller manager, scheduler, containerd ready ($((SECONDS - t0)) s)"

  ctr_ images import "$pause" >/dev/null
  start kubelet "$BIN/kubelet" --config="$DIR/kubelet/config.yaml" --kubeconfig="$kc" \
    --root-dir="$DIR/kubelet/root" --cert-dir="$DIR/kubelet/pki" \
    --hostname-override="$NODE" --node-ip="$NODE_IP"
  start kube-proxy "$BIN/kube-proxy" --config="$DIR/kube-proxy.yaml"
  wait_for kubelet node_ready
  wait_for kube-proxy in_ns curl -fs -m 3 "http://127.0.0.1:$((BASE + 256))/healthz"
  say "node $NODE Ready, kube-proxy up: the cluster is up in $((SECONDS - t0)) s (KUBECONFIG=$KUBECONFIG)"
}

stop_one() {
  local name=$1 p i
  p=$(pid_of "$name") || return 0
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$p" 2>/dev/null || true
  rm -f "$DIR/$name.pid"
}

# The containers (and their shims) containerd ran: killed through
# containerd, so nothing of a pod outlives the node.
stop_tasks() {
  pid_of containerd >/dev/null || return 0
  local t
  for t in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks kill -s KILL "$t" >/dev/null 2>&1 || true
  done
  for t in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true
  done
  for t in $(ctr_ containers ls -q 2>/dev/null); do
    ctr_ containers delete "$t" >/dev/null 2>&1 || true
  done
}

cmd_down() {
  local name m h
  [ -d "$DIR" ] || return 0
  # Pods first, while the kubelet can still tear their sandboxes down (CNI
  # DEL, network namespace, mounts) the normal way.
  if pid_of kube-apiserver >/dev/null && pid_of kubelet >/dev/null; then
    in_ns kubectl delete pods --all --all-namespaces --grace-period=5 --wait=true --timeout=60s \
      >/dev/null 2>&1 || true
  fi
  for name in kube-proxy kubelet; do stop_one "$name"; done
  stop_tasks
  for name in "${COMPONENTS[@]:2}"; do stop_one "$name"; done
  # Leftover shims of this containerd (named by its socket, so only ours).
  for m in $(pgrep -f -- "-address $CTRD_SOCK" || true); do kill -KILL "$m" 2>/dev/null || true; done
  # Mounts under the directory (volumes, sandboxes' /dev/shm, root file
  # systems, network namespaces), innermost first.
  awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ -e "/run/netns/$NS" ]; then ip netns delete "$NS"; fi
  for h in /sys/fs/cgroup/*/"$CGROUP_ROOT" /sys/fs/cgroup/"$CGROUP_ROOT"; do
    if [ -d "$h" ]; then find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  say "stopped (data kept in $DIR)"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  destroy) cmd_down; rm -rf "$DIR"; say "deleted $DIR" ;;
  exec) shift; exec nsenter --net="/run/netns/$NS" -- "$@" ;;
  import)
    [ -n "${2:-}" ] || die "usage: k8s.sh import IMAGE"
    CONTAINERS_CONF=$HERE/../docker/containers.conf podman save "$2" | ctr_ images import - >/dev/null
    say "imported $2" ;;
  *) sed -n '2,/^set -e/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
