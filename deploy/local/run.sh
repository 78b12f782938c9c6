#!/usr/bin/env bash
# `make run`: starts parleyd, the all-in-one Parley (every service in one
# process over an embedded SQLite bus and store), in dev mode on
# PARLEY_LISTEN (default 0.0.0.0:8080), data in PARLEY_DATA_DIR (default
# ./data/). No Kafka, no MongoDB. Ctrl-C stops it; the data stays.
# The microservice mode is `make run-stack` (deploy/local/run-stack.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build/rel}

export PARLEY_DEV=${PARLEY_DEV:-1}
export PARLEY_LISTEN=${PARLEY_LISTEN:-0.0.0.0:8080}
export PARLEY_DATA_DIR=${PARLEY_DATA_DIR:-data}

echo "parley: parleyd and the web client on http://${PARLEY_LISTEN/0.0.0.0/localhost}/ (dev mode, data in $PARLEY_DATA_DIR/); Ctrl-C stops"
exec "$build/bin/parleyd"
