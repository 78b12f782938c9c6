#!/usr/bin/env bash
# `make run-stack`: starts the local Kafka + MongoDB-wire server and every Parley
# service in dev mode, gateway on PARLEY_LISTEN (default 0.0.0.0:8080).
# Ctrl-C stops the services; the stack keeps running for the next start
# (`make stack-stop` stops it).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build/rel}

bash deploy/local/stack.sh start all
export PARLEY_KAFKA_BROKERS=${PARLEY_KAFKA_BROKERS:-127.0.0.1:${PARLEY_KAFKA_PORT:-19092}}
export PARLEY_MONGO_URI=${PARLEY_MONGO_URI:-mongodb://127.0.0.1:${PARLEY_MONGO_PORT:-27018}/?retryWrites=false}
export PARLEY_DEV=${PARLEY_DEV:-1}
export PARLEY_LISTEN=${PARLEY_LISTEN:-0.0.0.0:8080}

pids=()
stop() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT

start() { # name admin-port
  PARLEY_ADMIN_LISTEN=127.0.0.1:$2 "$build/bin/$1" &
  pids+=($!)
}
start presence 9091
start message-store 9092
start receipt 9093
start group-fanout 9094
start push 9095
PARLEY_ADMIN_LISTEN=off "$build/bin/gateway" &
pids+=($!)

echo "parley: gateway and web client on http://${PARLEY_LISTEN/0.0.0.0/localhost}/ (dev mode); Ctrl-C stops"
wait -n || true
stop
