#!/usr/bin/env bash
# Set-up command two: install what is missing, then run the whole test suite: unit and
# property tests, the integration tests (real hsm-kms processes on fresh SoftHSM2 tokens,
# over gRPC), and the grpcurl smoke test against `hsm-kms dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked --all-targets -- --test-threads "${TEST_THREADS:-4}"
scripts/smoke.sh
