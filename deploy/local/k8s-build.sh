#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries and the kubelet from the Go
# module proxy into $PARLEY_CACHE/k8s-<version>/bin, once (a marker file
# says the build finished). Debian ships etcd and containerd but no
# kube-apiserver; `go install k8s.io/kubernetes/...` refuses because that
# module replaces its staging modules with local folders. So a wrapper
# module requires k8s.io/kubernetes and replaces each staging module with
# its published v0.<minor>.<patch> release.
#   PARLEY_CACHE     ($HOME/.cache/parley)  binaries, Go module and build caches
#   PARLEY_K8S_VERSION (1.31.0)  the published staging releases must exist
#                                on the proxy for the same minor.patch
set -euo pipefail

CACHE=$(realpath -m "${PARLEY_CACHE:-$HOME/.cache/parley}")
VERSION=${PARLEY_K8S_VERSION:-1.31.0}
OUT=$CACHE/k8s-$VERSION
CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

built() { [ "$(cat "$OUT/bin/.done" 2>/dev/null)" = "${CMDS[*]}" ]; }
built && exit 0

export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build \
  GOTOOLCHAIN=local GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0
mkdir -p "$OUT"
exec 8>"$OUT/build.lock"
flock 8 # a concurrent build waits, then finds the marker
built && exit 0

started=$(date +%s)
src=$OUT/wrapper
rm -rf "$src" && mkdir -p "$src"
gomod=$(go mod download -json "k8s.io/kubernetes@v$VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[ -f "$gomod" ] || { echo "k8s-build: go mod download k8s.io/kubernetes@v$VERSION failed" >&2; exit 1; }
{
  echo "module parley.local/k8s"
  echo
  echo "go $(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
  echo
  echo "require k8s.io/kubernetes v$VERSION"
  echo
  # k8s.io/X => ./staging/src/k8s.io/X  becomes  k8s.io/X => k8s.io/X v0.<minor>.<patch>
  sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*$|replace \1 => \1 v0.'"${VERSION#*.}"'|p' "$gomod"
} >"$src/go.mod"
{
  echo "package k8s"
  echo
  echo "import ("
  for c in "${CMDS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c/app\""; done
  echo ")"
} >"$src/tools.go"

cd "$src"
echo "k8s-build: resolving modules for k8s.io/kubernetes v$VERSION"
go mod tidy
# The version the binaries report: without it the API server says
# v0.0.0-master and the kubelet's version-skew checks and Helm's
# kubeVersion both see a nonsense version.
V=k8s.io/component-base/version
minor=${VERSION#*.}; minor=${minor%%.*}
ldflags="-s -w -X $V.gitVersion=v$VERSION -X $V.gitMajor=${VERSION%%.*} -X $V.gitMinor=$minor"
ldflags+=" -X $V.gitTreeState=clean -X $V.buildDate=1970-01-01T00:00:00Z"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=v$VERSION"
pkgs=()
for c in "${CMDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
echo "k8s-build: building ${CMDS[*]} (the first build takes 15 min and more)"
mkdir -p "$OUT/bin.tmp"
go build -trimpath -ldflags "$ldflags" -o "$OUT/bin.tmp/" "${pkgs[@]}"
rm -rf "$OUT/bin" && mv "$OUT/bin.tmp" "$OUT/bin"
cd / && rm -rf "$src"
echo "${CMDS[*]}" >"$OUT/bin/.done"
echo "k8s-build: done in $(( $(date +%s) - started )) s into $OUT/bin"
