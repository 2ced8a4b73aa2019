#!/usr/bin/env bash
# Smoke test with grpcurl against a freshly started `hsm-kms dev`:
# DescribeCustomKeyStores -> CreateKey -> Encrypt -> Decrypt -> GenerateDataKey -> Decrypt,
# then aliases, tags, the key policy, ScheduleKeyDeletion -> CancelKeyDeletion -> EnableKey,
# the store's health, the metrics, a grant; then the AWS protocol with the aws CLI
# (create-key, encrypt, decrypt, generate-data-key) and an AWS Encryption SDK for Python
# envelope round trip; and the audit trail's hash chain.
# Exits non-zero on any failure or mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
bin=target/debug/hsm-kms
work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=warn "$bin" dev --data-dir "$work/data" --listen 127.0.0.1:0 --aws-listen 127.0.0.1:0 --xks-listen 127.0.0.1:0 \
  --admin-listen 127.0.0.1:0 >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 1 300); do
  grep -q "aws kms generate-data-key" "$work/out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/err" >&2; echo "smoke: hsm-kms dev exited" >&2; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/out" | head -n1)
[ -n "$addr" ] || { cat "$work/out" "$work/err" >&2; echo "smoke: no address" >&2; exit 1; }
svc=kms.v1.KeyManagementService
call() { grpcurl -plaintext -d "$2" "$addr" "$svc/$1"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

grpcurl -plaintext "$addr" list | grep -qx "$svc" || fail "reflection does not list $svc"

store=$(call DescribeCustomKeyStores '{"custom_key_store_name":"dev"}')
state=$(jq -r '.customKeyStores[0].connectionState' <<<"$store")
store_id=$(jq -r '.customKeyStores[0].customKeyStoreId' <<<"$store")
[ "$state" = CONNECTED ] || fail "dev store is $state"

key=$(call CreateKey "{\"custom_key_store_id\":\"$store_id\",\"origin\":\"AWS_CLOUDHSM\",\"description\":\"smoke\"}")
key_id=$(jq -r .keyMetadata.keyId <<<"$key")
key_arn=$(jq -r .keyMetadata.arn <<<"$key")
[ "$(jq -r .keyMetadata.keyState <<<"$key")" = Enabled ] || fail "new key is not Enabled"

plaintext=$(head -c 300 /dev/urandom | base64 -w0)
ctx='{"purpose":"smoke","run":"'$$'"}'
ct=$(call Encrypt "{\"key_id\":\"$key_id\",\"plaintext\":\"$plaintext\",\"encryption_context\":$ctx}" | jq -r .ciphertextBlob)
out=$(call Decrypt "{\"ciphertext_blob\":\"$ct\",\"encryption_context\":$ctx}")
[ "$(jq -r .plaintext <<<"$out")" = "$plaintext" ] || fail "Decrypt returned other bytes"
[ "$(jq -r .keyId <<<"$out")" = "$key_arn" ] || fail "Decrypt named another key"

# A wrong context must fail with InvalidCiphertextException.
if err=$(call Decrypt "{\"ciphertext_blob\":\"$ct\",\"encryption_context\":{\"purpose\":\"other\"}}" 2>&1); then
  fail "Decrypt with a wrong context succeeded"
fi
grep -q InvalidCiphertextException <<<"$err" || fail "wrong context gave: $err"

dk=$(call GenerateDataKey "{\"key_id\":\"$key_arn\",\"key_spec\":\"AES_256\"}")
dk_plain=$(jq -r .plaintext <<<"$dk")
[ "$(base64 -d <<<"$dk_plain" | wc -c)" -eq 32 ] || fail "data key is not 32 bytes"
dk_ct=$(jq -r .ciphertextBlob <<<"$dk")
back=$(call Decrypt "{\"ciphertext_blob\":\"$dk_ct\"}" | jq -r .plaintext)
[ "$back" = "$dk_plain" ] || fail "the data key did not decrypt to itself"

# Aliases: encrypt by alias name, decrypt with the alias ARN as KeyId.
call CreateAlias "{\"alias_name\":\"alias/smoke\",\"target_key_id\":\"$key_id\"}" >/dev/null
alias_arn=$(call ListAliases "{\"key_id\":\"$key_id\"}" | jq -r '.aliases[0].aliasArn')
[ "$alias_arn" = "${key_arn%%:key/*}:alias/smoke" ] || fail "alias ARN is $alias_arn"
ct=$(call Encrypt "{\"key_id\":\"alias/smoke\",\"plaintext\":\"$plaintext\"}" | jq -r .ciphertextBlob)
back=$(call Decrypt "{\"ciphertext_blob\":\"$ct\",\"key_id\":\"$alias_arn\"}" | jq -r .plaintext)
[ "$back" = "$plaintext" ] || fail "alias round trip"

# Tags and the default key policy.
call TagResource "{\"key_id\":\"$key_id\",\"tags\":[{\"tag_key\":\"team\",\"tag_value\":\"smoke\"}]}" >/dev/null
[ "$(call ListResourceTags "{\"key_id\":\"$key_id\"}" | jq -r '.tags[0].tagValue')" = smoke ] || fail "tags"
call GetKeyPolicy "{\"key_id\":\"$key_id\"}" | jq -r .policy | jq -e '.Statement[0].Action == "kms:*"' >/dev/null \
  || fail "default key policy"

# Schedule deletion, cancel it (the key comes back Disabled), enable it again.
[ "$(call ScheduleKeyDeletion "{\"key_id\":\"$key_id\",\"pending_window_in_days\":7}" | jq -r .keyState)" = PendingDeletion ] \
  || fail "ScheduleKeyDeletion"
call CancelKeyDeletion "{\"key_id\":\"$key_id\"}" >/dev/null
[ "$(call DescribeKey "{\"key_id\":\"alias/smoke\"}" | jq -r .keyMetadata.keyState)" = Disabled ] || fail "cancelled key is not Disabled"
call EnableKey "{\"key_id\":\"$key_id\"}" >/dev/null
[ "$(call DescribeKey "{\"key_id\":\"$key_id\"}" | jq -r .keyMetadata.keyState)" = Enabled ] || fail "EnableKey"

# Health per store, and the metrics the quickstart points at.
grpcurl -plaintext -d "{\"service\":\"$store_id\"}" "$addr" grpc.health.v1.Health/Check \
  | jq -e '.status == "SERVING"' >/dev/null || fail "store health"
metrics_url=$(sed -n 's/.*metrics: *curl -s \(http[^ ]*\).*/\1/p' "$work/out" | head -n1)
[ -n "$metrics_url" ] || fail "the quickstart names no metrics URL"
metrics=$(curl -fsS "$metrics_url")
grep -q '^hsm_kms_request_duration_seconds_count{operation="Encrypt",outcome="ok"} [1-9]' <<<"$metrics" \
  || fail "metrics do not count the Encrypt calls"
grep -q "^hsm_kms_store_state{custom_key_store_id=\"$store_id\",state=\"CONNECTED\"} 1" <<<"$metrics" \
  || fail "metrics do not show the store CONNECTED"
# The format is OpenMetrics, and says so; a strict OpenMetrics parser (Prometheus's Python
# client) reads all of it; the series operators alert on exist at zero before any event.
curl -fsS -o /dev/null -w '%{content_type}\n' "$metrics_url" |
  grep -q '^application/openmetrics-text; version=1.0.0' || fail "metrics content type"
printf '%s\n' "$metrics" >"$work/metrics"
python3 - "$store_id" "$work/metrics" <<'PY' || fail "metrics do not parse as OpenMetrics"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
store, path = sys.argv[1], sys.argv[2]
samples = {}
for family in text_string_to_metric_families(open(path).read()):
    for s in family.samples:
        samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
def zero(name, **labels):
    key = (name, tuple(sorted(labels.items())))
    assert samples.get(key) == 0, f"{name}{labels}: {samples.get(key)}"
zero("hsm_kms_throttled_requests_total", custom_key_store_id=store)
zero("hsm_kms_reconnects_total", custom_key_store_id=store, outcome="failed")
zero("hsm_kms_hsm_call_errors_total", function="C_Encrypt", error="DeviceError")
print(f"metrics: {len(samples)} samples parse as OpenMetrics")
PY

# A grant for another principal, listed and revoked.
grant_id=$(call CreateGrant "{\"key_id\":\"$key_id\",\"grantee_principal\":\"arn:aws:iam::111122223333:role/app\",\"operations\":[\"Decrypt\"]}" | jq -r .grantId)
[ "$(call ListGrants "{\"key_id\":\"$key_id\"}" | jq -r '.grants[0].grantId')" = "$grant_id" ] || fail "ListGrants"
call RevokeGrant "{\"key_id\":\"$key_id\",\"grant_id\":\"$grant_id\"}" >/dev/null

# The AWS protocol, with the endpoint and credentials dev wrote to aws.env.
[ "$(stat -c %a "$work/data/aws.env")" = 600 ] || fail "aws.env is not 0600"
(
  # shellcheck disable=SC1091
  . "$work/data/aws.env"
  aws_key=$(aws kms create-key --description smoke-aws --query KeyMetadata.Arn --output text)
  [ "$(aws kms describe-key --key-id "$aws_key" --query KeyMetadata.CustomKeyStoreId --output text)" = "$store_id" ] \
    || fail "aws create-key did not use the default store"
  head -c 1000 /dev/urandom >"$work/aws-plain"
  aws kms encrypt --key-id "$aws_key" --plaintext "fileb://$work/aws-plain" \
    --encryption-context purpose=smoke --query CiphertextBlob --output text | base64 -d >"$work/aws-ct"
  aws kms decrypt --ciphertext-blob "fileb://$work/aws-ct" --encryption-context purpose=smoke \
    --query Plaintext --output text | base64 -d >"$work/aws-back"
  cmp -s "$work/aws-plain" "$work/aws-back" || fail "aws decrypt returned other bytes"
  if err=$(aws kms decrypt --ciphertext-blob "fileb://$work/aws-ct" 2>&1); then
    fail "aws decrypt without the context succeeded"
  fi
  grep -q InvalidCiphertextException <<<"$err" || fail "aws decrypt without the context gave: $err"
  dk=$(aws kms generate-data-key --key-id "$aws_key" --key-spec AES_256 --query Plaintext --output text)
  [ "$(base64 -d <<<"$dk" | wc -c)" -eq 32 ] || fail "aws generate-data-key"
  python3 scripts/esdk_roundtrip.py "$aws_key" || fail "AWS Encryption SDK round trip"
  # boto3 knows the exceptions by the model's names.
  python3 - <<'PY' || fail "boto3 did not raise NotFoundException"
import boto3
kms = boto3.client("kms")
try:
    kms.describe_key(KeyId="alias/does-not-exist")
except kms.exceptions.NotFoundException as e:
    assert e.response["ResponseMetadata"]["RequestId"], e.response
    print("boto3: NotFoundException:", e.response["Error"]["Message"])
else:
    raise SystemExit("describe_key of a missing alias succeeded")
PY
)

# Stop the service (the audit writer flushes and closes), then check the audit chain.
audit=$(sed -n 's/.*audit trail: *\([^ ]*\).*/\1/p' "$work/out" | head -n1)
[ -n "$audit" ] || fail "the banner names no audit trail"
kill -TERM "$pid"
# SIGTERM is a clean stop: the server must exit 0.
status=0
wait "$pid" || status=$?
pid=""
[ "$status" = 0 ] || fail "hsm-kms exited with status $status on SIGTERM"
# Read all it says before looking (grep -q would close the pipe under it).
verified=$("$bin" audit verify "$audit") || fail "audit verify: $verified"
grep -q "chain intact" <<<"$verified" || fail "audit chain: $verified"
grep -q '"operation":"CreateGrant"' "$audit" || fail "the audit trail lacks CreateGrant"

echo "smoke: OK ($addr, store $store_id, key $key_id)"
