#!/usr/bin/env bash
# `make image`: builds the Parley image (deploy/docker/Dockerfile) with
# podman, or docker when that is what the machine has. Where no registry
# serves the Debian base images, they are made here: debootstrap (minbase,
# bookworm) from the mirror this machine's own apt sources name, imported as
# debian:12 and debian:12-slim. The root file system is cached under
# PARLEY_CACHE (~/.cache/parley), so only the first build fetches it.
#   deploy/docker/image.sh [TAG]   (default parley:dev, or PARLEY_IMAGE)
# podman runs with deploy/docker/containers.conf (runc, file and process
# limits a container may set): its defaults (crun, the host's ulimits) fail
# on kernels with hybrid cgroups and in unprivileged sandboxes.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=${1:-${PARLEY_IMAGE:-parley:dev}}
cache=${PARLEY_CACHE:-$HOME/.cache/parley}
say() { echo "image: $*" >&2; }

engine=${PARLEY_ENGINE:-$(command -v podman || command -v docker || true)}
if [ -z "$engine" ]; then
  bash deploy/local/deps.sh image
  engine=$(command -v podman)
fi
[ "$(basename "$engine")" = podman ] && export CONTAINERS_CONF=$PWD/deploy/docker/containers.conf

# The first deb URI of the machine's apt sources (deb822 or one-line form):
# the mirror it is allowed to reach, never a host written here.
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
    [ -r "$f" ] || continue
    awk '/^URIs:/ { print $2; exit } /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' "$f"
  done | grep -v security | head -n 1
}

base_image() {
  # `image inspect`, not podman's `image exists`: docker has only the former.
  "$engine" image inspect debian:12 >/dev/null 2>&1 &&
    "$engine" image inspect debian:12-slim >/dev/null 2>&1 && return
  if timeout 60 "$engine" pull -q docker.io/library/debian:12 >/dev/null 2>&1 &&
     timeout 60 "$engine" pull -q docker.io/library/debian:12-slim >/dev/null 2>&1; then
    return
  fi
  local tar=$cache/debian-12-minbase.tar mirror root
  if [ ! -s "$tar" ]; then
    command -v debootstrap >/dev/null || bash deploy/local/deps.sh image
    mirror=$(apt_mirror)
    [ -n "$mirror" ] || { say "no registry and no apt mirror to bootstrap Debian from"; exit 1; }
    say "no registry serves debian:12: debootstrap bookworm from $mirror"
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
      { tail -n 20 "$cache/debootstrap.log"; rm -rf "$root"; exit 1; }
    mkdir -p "$cache"
    tar -C "$root" -cf "$tar.part" . && mv "$tar.part" "$tar"
    rm -rf "$root"
  fi
  "$engine" import "$tar" debian:12 >/dev/null
  "$engine" tag debian:12 debian:12-slim
}

base_image
say "building $tag with $(basename "$engine")"
ignore=()
[ "$(basename "$engine")" = podman ] && ignore=(--ignorefile deploy/docker/Dockerfile.dockerignore)
DOCKER_BUILDKIT=1 "$engine" build "${ignore[@]}" -f deploy/docker/Dockerfile -t "$tag" .
say "built $tag: $("$engine" image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
