#!/usr/bin/env bash
# AWS's public XKS proxy test client (aws-samples/aws-kms-xksproxy-test-client, a copy in
# ../shared/tools/xks-test-client) against a fresh `hsm-kms dev`: every round trip and error
# name it checks must pass. Where ../shared is not beside the checkout (a user's clone), the
# step says it skipped. It cannot tell a wrong AAD layout from a right one: tests/xks.rs does.
set -euo pipefail
cd "$(dirname "$0")/.."
client="$(cd .. && pwd)/shared/tools/xks-test-client"
if [ ! -x "$client/test-xks-proxy" ]; then
  echo "xks-test-client: SKIPPED ($client is not here; it is the team's copy, not part of hsm-kms)"
  exit 0
fi
bin="${HSM_KMS_BIN:-target/debug/hsm-kms}"
data="$(mktemp -d)"
log="$data/dev.log"
"$bin" dev --data-dir "$data/dev" --listen 127.0.0.1:0 --aws-listen 127.0.0.1:0 \
  --admin-listen 127.0.0.1:0 --xks-listen 127.0.0.1:0 >"$log" 2>&1 &
dev=$!
trap 'kill -TERM $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 600); do
  grep -q "hsm-kms dev is ready" "$log" && break
  kill -0 $dev 2>/dev/null || { cat "$log"; echo "xks-test-client: hsm-kms dev exited" >&2; exit 1; }
  sleep 0.2
done
grep -q "hsm-kms dev is ready" "$log" || { cat "$log"; echo "xks-test-client: hsm-kms dev did not start" >&2; exit 1; }
# shellcheck disable=SC1091
. "$data/dev/xks.env"
out="$data/client.log"
(cd "$client" && SCHEME= XKS_PROXY_HOST="$XKS_PROXY_HOST" URI_PREFIX="$XKS_URI_PREFIX" \
  SIGV4_ACCESS_KEY_ID="$XKS_ACCESS_KEY_ID" SIGV4_SECRET_ACCESS_KEY="$XKS_SECRET_ACCESS_KEY" \
  REGION="$XKS_REGION" KEY_ID="$XKS_KEY_ID" ANSI_ESCAPE=0 ./test-xks-proxy) >"$out" 2>&1 || true
summary="$(tr '\r' '\n' <"$out" | sed 's/\x1b\[[0-9;]*m//g' | grep -a "tests PASSED\|tests FAILED" | tail -n 1)"
echo "xks-test-client: $summary"
case "$summary" in
  *"All "*" tests PASSED."*) ;;
  *) tr '\r' '\n' <"$out" | sed 's/\x1b\[[0-9;]*m//g' | grep -a "FAILED" | cut -c1-200 >&2 || true
     echo "xks-test-client: FAILED" >&2; exit 1 ;;
esac
