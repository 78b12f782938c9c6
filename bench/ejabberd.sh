#!/usr/bin/env bash
# bench/ejabberd.sh DIR PORT [DOMAIN]: runs a private ejabberd, the peer that
# `make bench` measures beside Parley (bench/run.sh's peer mode), in the
# foreground until SIGTERM. Everything is its own: the config written here
# into DIR, Mnesia's spool and the logs in DIR, one listener on
# 127.0.0.1:PORT (XMPP over WebSocket at /ws, RFC 7395), SASL ANONYMOUS
# logins only (no registration, no accounts), no shaper. It runs as the
# current user, without Erlang distribution (no node name, no epmd), so the
# system's own ejabberd service, if one runs, is left alone.
# Debian's ejabberd (deploy/local/deps.sh bench) provides the code; its
# ejabberdctl is not used: it insists on the ejabberd user and /etc paths.
# `ejabberd.sh check` only says whether ejabberd is installed (exit 0).
set -euo pipefail
lib=$(ls -d /usr/lib/*/ejabberd-*/ebin 2>/dev/null | head -n 1)
if [ -z "$lib" ] || ! command -v erl >/dev/null; then
  echo "ejabberd.sh: Debian's ejabberd is not installed (deploy/local/deps.sh bench)" >&2
  exit 1
fi
[ "${1:-}" != check ] || exit 0
dir=${1:?usage: ejabberd.sh DIR PORT [DOMAIN]}
port=${2:?usage: ejabberd.sh DIR PORT [DOMAIN]}
domain=${3:-localhost}
mkdir -p "$dir/spool"
# The defaults that would slow a load test down are set off: the c2s
# shaper (a few KB/s per connection in Debian's example config) and the
# listener's accept backlog (5).
cat >"$dir/ejabberd.yml" <<YML
loglevel: warning
log_rotate_count: 0
hosts:
  - $domain
auth_method: anonymous
anonymous_protocol: sasl_anon
allow_multiple_connections: true
listen:
  -
    port: $port
    ip: "127.0.0.1"
    module: ejabberd_http
    backlog: 1024
    request_handlers:
      /ws: ejabberd_http_ws
shaper_rules:
  c2s_shaper: none
access_rules:
  c2s:
    allow: all
modules: {}
YML
cd "$dir"
export ERL_LIBS=${lib%/ejabberd-*/ebin}
export EJABBERD_CONFIG_PATH=$dir/ejabberd.yml EJABBERD_LOG_PATH=$dir/ejabberd.log
export ERL_CRASH_DUMP=$dir/erl_crash.dump ERL_CRASH_DUMP_BYTES=0
# +K: kernel poll; +P: enough processes for many connections. SIGTERM
# makes the VM stop cleanly (init:stop).
exec erl -noinput -noshell +K true +P 250000 -mnesia dir "\"$dir/spool\"" -s ejabberd
