#!/usr/bin/env bash
# A rolling upgrade with an older and a newer replica side by side: builds hsm-kms as it was
# at OLD (default below) and runs tests/replicas.rs `an_older_and_a_newer_replica_serve_side_by_side`
# with that binary as the older replica and this checkout's as the newer one. The newer one
# migrates the schema while the older one serves on it.
#
#   scripts/mixed-versions.sh [OLD]
#
# The default OLD, 3fd1954, predates the audit heads (bd4848e), the row cache's triggers
# (39acfe6) and the stores' state_since_ms (c5e77b7, 8a29b66): three migrations the newer
# replica makes under the older one.
#
# The older build shares target/ and this checkout's profile settings, so only hsm-kms
# itself is compiled again (about 2 minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:-3fd1954}
# A shallow clone lacks the older commit: fetch the history rather than pass unchecked.
if ! git cat-file -e "$old^{commit}" 2>/dev/null; then
  echo "mixed-versions: $old is not in this clone; fetching the history" >&2
  git fetch --quiet --unshallow 2>/dev/null || git fetch --quiet origin 2>/dev/null || true
fi
if ! git cat-file -e "$old^{commit}" 2>/dev/null; then
  echo "mixed-versions: FAILED: commit $old is not in this clone and could not be fetched" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
here=$PWD

mkdir "$work/tree"
git archive "$old" | tar -x -C "$work/tree"
(
  cd "$work/tree"
  CARGO_TARGET_DIR="$here/target" cargo build --locked --quiet --bin hsm-kms \
    --config 'profile.dev.debug="line-tables-only"' \
    --config 'profile.dev.package."*".debug=false' \
    --config 'profile.dev.package."*".opt-level=1'
)
cp target/debug/hsm-kms "$work/hsm-kms-old"
# Building the test links this checkout's binary to target/debug/hsm-kms again (the test's
# newer replica); make sure of it.
cargo test --locked --quiet --test replicas --no-run
if cmp -s "$work/hsm-kms-old" target/debug/hsm-kms; then
  echo "mixed-versions: target/debug/hsm-kms is still the build of $old" >&2
  exit 1
fi
HSM_KMS_REQUIRE_POSTGRES=1 HSM_KMS_TEST_BINARY="$work/hsm-kms-old" \
  cargo test --locked --quiet --test replicas an_older_and_a_newer_replica_serve_side_by_side -- --exact
echo "mixed-versions: OK ($old beside $(git rev-parse --short HEAD))"
