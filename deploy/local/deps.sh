#!/usr/bin/env bash
# Installs the Debian packages Parley builds and tests with, only those missing.
#   deps.sh        everything (build, tests, the local Kafka + MongoDB-wire stack)
#   deps.sh build  only what building needs (`make run`: parleyd needs no stack)
#   deps.sh image  a container engine and what makes a base image (`make image`)
#   deps.sh bench  what `make bench` needs beyond that: ejabberd, the peer it
#                  measures beside Parley, and gnuplot for its chart
#   deps.sh k8s    the image's, plus etcd, containerd and CNI plugins (`make test-k8s`)
set -euo pipefail

PKGS=(build-essential pkg-config librdkafka-dev libmicrohttpd-dev libwslay-dev
      libmongoc-dev libbson-dev check libsubunit-dev libprotobuf-c-dev
      protobuf-c-compiler libjansson-dev libsqlite3-dev libssl-dev libcurl4-openssl-dev
      zlib1g-dev)
[ "${1:-all}" = image ] &&
  PKGS=(podman buildah runc containernetworking-plugins fuse-overlayfs uidmap debootstrap)
[ "${1:-all}" = bench ] && PKGS=(ejabberd gnuplot-nox)
[ "${1:-all}" = k8s ] &&
  PKGS=(podman buildah runc containernetworking-plugins fuse-overlayfs uidmap debootstrap
        etcd-server containerd iproute2 iptables golang-go kcat jq curl default-jre-headless
        maven build-essential)
[ "${1:-all}" = build ] || [ "${1:-all}" = image ] || [ "${1:-all}" = bench ] ||
  [ "${1:-all}" = k8s ] ||
  PKGS+=(kcat jq curl default-jre-headless maven golang-go postgresql chromium nodejs npm
         python3-jwt python3-cryptography clang libclang-rt-dev)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Java, Maven, Go and Node.js may come from outside Debian on a developer
# machine (Chromium, for the browser tests, comes from Debian).
filtered=()
for p in "${missing[@]}"; do
  case "$p" in
    default-jre-headless) command -v java >/dev/null || filtered+=("$p") ;;
    maven) command -v mvn >/dev/null || filtered+=("$p") ;;
    golang-go) command -v go >/dev/null || command -v mongod >/dev/null || filtered+=("$p") ;;
    nodejs) command -v node >/dev/null || filtered+=("$p") ;;
    npm) command -v npm >/dev/null || filtered+=("$p") ;;
    *) filtered+=("$p") ;;
  esac
done
[ ${#filtered[@]} -eq 0 ] && exit 0

echo "deps: installing ${filtered[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${filtered[@]}" >/dev/null
# The package starts a system-wide ejabberd (ports 5222, 5269, 5280, 5443)
# where systemd runs; the bench starts its own (bench/ejabberd.sh, other
# ports, no Erlang distribution) and needs only the code, so the service
# this script just installed is stopped and disabled. One that was there
# before is left alone.
if [[ " ${filtered[*]} " == *" ejabberd "* ]] && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now ejabberd >/dev/null 2>&1 || true
fi
