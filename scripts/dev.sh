#!/usr/bin/env bash
# Set-up command one: install what is missing, then run `hsm-kms dev` (a SoftHSM2-backed
# instance with a connected custom key store named `dev`). Extra arguments go to `hsm-kms dev`,
# e.g. scripts/dev.sh --listen 127.0.0.1:50052 --data-dir /tmp/hsm-kms-dev
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --locked -- dev "$@"
