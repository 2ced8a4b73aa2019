#!/usr/bin/env bash
# Try hsm-kms as several replicas, with one command: installs what is missing, then starts
#   - PostgreSQL (Debian's package; a throwaway cluster in DIR/pg, on a Unix socket only),
#   - three hsm-kms replicas sharing it, each with its own PKCS#11 login to one SoftHSM2
#     token, its own audit trail (DIR/rN/audit.jsonl) and its own admin port,
#   - HAProxy (Debian's package) in front, with deploy/haproxy-replicas.cfg: each gRPC and
#     AWS-protocol request balanced over the replicas, a replica out of rotation while its
#     /readyz says 503, and a request re-sent only when no connection was made,
# and prints the endpoints, a grpcurl line and an aws CLI line that work through it. Ctrl-C
# stops everything.
#
#   scripts/cluster.sh [--check] [DIR]
#
# DIR defaults to a new temporary directory, removed at exit (a DIR you name is kept).
# --check: instead of waiting for Ctrl-C, send requests through HAProxy (gRPC and the AWS
# CLI), check that every replica served some and that every replica's audit chain verifies,
# then stop.
# Environment: CLUSTER_PORT (HAProxy's gRPC port, default 50060; the replicas' gRPC ports are
# the next three, their AWS ports the three after, HAProxy's AWS port +7, admin listeners
# +11 to +13, PostgreSQL +20), HSM_KMS_BIN (a built binary; default: cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
scripts/setup.sh
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
# HAProxy, and openssl for the stand-in cluster's trust anchor.
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "cluster: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"

bin=${HSM_KMS_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked --quiet
  bin=$repo/target/release/hsm-kms
fi
bin=$(realpath "$bin")

if [ -n "${1:-}" ]; then
  dir=$1; keep=1; mkdir -p "$dir"
else
  dir=$(mktemp -d /tmp/hsm-kms-cluster.XXXXXX); keep=0
fi
dir=$(realpath "$dir")
# The postgres user must reach its directories below this one.
chmod 711 "$dir"
port=${CLUSTER_PORT:-50060}
aws_port=$((port + 7))
pg_port=$((port + 20))
replicas=(r1 r2 r3)

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pids=()
stop_all() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  [ -f "$dir/pg/postmaster.pid" ] && as_postgres "$pgbin/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null
  [ "$keep" = 1 ] || rm -rf "$dir"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# PostgreSQL: a cluster of its own, reachable only through its socket in DIR/pgsock.
mkdir -p "$dir/pgsock"
if [ ! -f "$dir/pg/PG_VERSION" ]; then
  mkdir -p "$dir/pg"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/pg" "$dir/pgsock"
  as_postgres "$pgbin/initdb" -D "$dir/pg" -U hsm_kms --auth=trust -E UTF8 >"$dir/initdb.log"
fi
as_postgres "$pgbin/pg_ctl" -D "$dir/pg" -l "$dir/pg/server.log" -w \
  -o "-p $pg_port -k $dir/pgsock -c listen_addresses=" start >/dev/null
as_postgres "$pgbin/psql" -h "$dir/pgsock" -p "$pg_port" -U hsm_kms -d postgres -qtA \
  -c "SELECT 1 FROM pg_database WHERE datname = 'hsm_kms'" | grep -q 1 ||
  as_postgres "$pgbin/createdb" -h "$dir/pgsock" -p "$pg_port" -U hsm_kms hsm_kms
url="host=$dir/pgsock port=$pg_port user=hsm_kms dbname=hsm_kms"

# One SoftHSM2 token, the stand-in for the HSM cluster every replica logs in to.
module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
  [ -e "$m" ] && module=$m && break
done
[ -n "$module" ] || { echo "cluster: no SoftHSM2 module found" >&2; exit 1; }
mkdir -p -m 700 "$dir/tokens"
cat >"$dir/softhsm2.conf" <<EOF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
export SOFTHSM2_CONF=$dir/softhsm2.conf
random() { head -c 512 /dev/urandom | tr -dc "${2:-A-Za-z0-9}" | head -c "$1"; }
if [ ! -f "$dir/kmsuser.password" ]; then
  (umask 077; random 20 >"$dir/kmsuser.password")
  softhsm2-util --init-token --free --label hsm-kms-cluster --so-pin "$(random 20)" \
    --pin "$(cat "$dir/kmsuser.password")" >/dev/null
fi
# What a real cluster gives you: its trust anchor, and a sealing key every replica shares
# (with [database] hsm-kms never makes one up).
[ -f "$dir/trust-anchor.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -nodes -keyout /dev/null -subj "/CN=hsm-kms cluster.sh trust anchor" -days 365 \
  -out "$dir/trust-anchor.pem" 2>/dev/null
[ -f "$dir/sealing.key" ] || (umask 077; head -c 32 /dev/urandom >"$dir/sealing.key")
# The AWS protocol's access key, standing for the account root, its secret in a file.
[ -f "$dir/aws-secret-access-key" ] || (umask 077; random 40 >"$dir/aws-secret-access-key")
[ -f "$dir/aws-access-key-id" ] || echo "AKIA$(random 16 A-Z2-7)" >"$dir/aws-access-key-id"
[ -f "$dir/cluster-id" ] || echo "cluster-$(random 11 a-z2-7)" >"$dir/cluster-id"
[ -f "$dir/hsm-ids" ] || echo "hsm-$(random 11 a-z2-7) hsm-$(random 11 a-z2-7)" >"$dir/hsm-ids"
cluster_id=$(cat "$dir/cluster-id")
read -r hsm_a hsm_b <"$dir/hsm-ids"

for i in 1 2 3; do
  r=r$i
  mkdir -p -m 700 "$dir/$r"
  cat >"$dir/$r.toml" <<EOF
# Replica $r of scripts/cluster.sh; every setting is documented in deploy/hsm-kms.example.toml.
[server]
listen = "127.0.0.1:$((port + i))"
aws_listen = "127.0.0.1:$((port + 3 + i))"
# HAProxy checks /readyz every second and takes a replica out after 2 failures.
drain_seconds = 3

[database]
url = "$url"
pool_size = 8

[storage]
sqlite_path = "$dir/$r/unused.sqlite3"

[security]
sealing_key_file = "$dir/sealing.key"
# SoftHSM2 2.6.1 keeps accepting a PIN in one process after another changed it; a real
# HSM does not. Rotation stays off with SoftHSM2.
rotate_kmsuser_password = false

[hsm]
softhsm2_conf = "$dir/softhsm2.conf"
session_pool_size = 2

[auth]
allow_plaintext_loopback = true

[[auth.access_keys]]
access_key_id = "$(cat "$dir/aws-access-key-id")"
secret_file = "$dir/aws-secret-access-key"
principal = "arn:aws:iam::111122223333:root"

[audit]
file = "$dir/$r/audit.jsonl"
replica = "$r"

[admin]
enabled = true
listen = "127.0.0.1:$((port + 10 + i))"

[kms]
default_custom_key_store = "cluster"

[[clusters]]
id = "$cluster_id"
module = "$module"
token_label = "hsm-kms-cluster"
trust_anchor_file = "$dir/trust-anchor.pem"
pin_format = "password"
crypto_user = "kmsuser"

[[clusters.hsms]]
id = "$hsm_a"
availability_zone = "us-east-1a"

[[clusters.hsms]]
id = "$hsm_b"
availability_zone = "us-east-1b"
EOF
done

start_replica() {
  RUST_LOG=${RUST_LOG:-warn} "$bin" serve --config "$dir/$1.toml" >"$dir/$1/out.log" 2>"$dir/$1/err.log" &
  pids+=($!)
  echo $! >"$dir/$1/pid"
}
wait_ready() { # replica number; waits for /readyz 200
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$((port + 10 + $1))/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "cluster: replica r$1 did not become ready; its log:" >&2
  cat "$dir/r$1/err.log" >&2
  exit 1
}
S=kms.v1.KeyManagementService

# The first replica creates and connects the key store; the others follow it.
start_replica r1
wait_ready 1
r1=127.0.0.1:$((port + 1))
store=$(grpcurl -plaintext -d '{"custom_key_store_name":"cluster"}' "$r1" $S/DescribeCustomKeyStores 2>/dev/null |
  jq -r '.customKeyStores[0].customKeyStoreId // empty' || true)
if [ -z "$store" ]; then
  store=$(jq -n --arg id "$cluster_id" --rawfile anchor "$dir/trust-anchor.pem" \
    --rawfile pw "$dir/kmsuser.password" \
    '{custom_key_store_name:"cluster", cloud_hsm_cluster_id:$id, trust_anchor_certificate:$anchor, key_store_password:$pw}' |
    grpcurl -plaintext -d @ "$r1" $S/CreateCustomKeyStore | jq -r .customKeyStoreId)
fi
state() {
  grpcurl -plaintext -d "{\"custom_key_store_id\":\"$store\"}" "$r1" $S/DescribeCustomKeyStores |
    jq -r '.customKeyStores[0].connectionState'
}
[ "$(state)" = CONNECTED ] ||
  grpcurl -plaintext -d "{\"custom_key_store_id\":\"$store\"}" "$r1" $S/ConnectCustomKeyStore >/dev/null
for _ in $(seq 1 300); do
  [ "$(state)" = CONNECTED ] && break
  sleep 0.1
done
[ "$(state)" = CONNECTED ] || { echo "cluster: the key store did not connect: $(state)" >&2; exit 1; }
# One at a time: a SoftHSM2 2.6.1 process that reads the token's file while another
# process's C_Login rewrites it can stop seeing new keys for good (see docs/REPLICAS.md).
start_replica r2
wait_ready 2
start_replica r3
wait_ready 3

# deploy/haproxy-replicas.cfg, its placeholders filled in.
servers() { # the replicas' first port (offset from $port) and what ends each line
  for i in 1 2 3; do
    echo "    server r$i 127.0.0.1:$((port + $1 + i - 1)) check port $((port + 10 + i))$2"
  done
}
config=$(cat deploy/haproxy-replicas.cfg)
config=${config//@BIND@/127.0.0.1}
config=${config//@ERRORS@/$repo/deploy/haproxy-errors}
config=${config//@GRPC_PORT@/$port}
config=${config//@AWS_PORT@/$aws_port}
config=${config//@GRPC_SERVERS@/$(servers 1 " proto h2")}
config=${config//@AWS_SERVERS@/$(servers 4 "")}
printf '%s\n' "$config" >"$dir/haproxy.cfg"
haproxy -c -q -f "$dir/haproxy.cfg"
haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  grpcurl -plaintext 127.0.0.1:"$port" list >/dev/null 2>&1 && break
  sleep 0.1
done

endpoint=127.0.0.1:$port
aws_endpoint=http://127.0.0.1:$aws_port
cat >"$dir/aws.env" <<EOF
export AWS_ENDPOINT_URL_KMS=$aws_endpoint
export AWS_ACCESS_KEY_ID=$(cat "$dir/aws-access-key-id")
export AWS_SECRET_ACCESS_KEY=$(cat "$dir/aws-secret-access-key")
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
EOF
chmod 600 "$dir/aws.env"
try="grpcurl -plaintext -d '{\"description\":\"made through HAProxy\"}' $endpoint $S/CreateKey"
if [ "$check" = 1 ]; then
  key=$(eval "$try" | jq -r .keyMetadata.keyId)
  for n in $(seq 1 9); do
    ct=$(grpcurl -plaintext -d "{\"key_id\":\"$key\",\"plaintext\":\"$(printf 'round %s' "$n" | base64)\"}" \
      "$endpoint" $S/Encrypt | jq -r .ciphertextBlob)
    out=$(grpcurl -plaintext -d "{\"ciphertext_blob\":\"$ct\"}" "$endpoint" $S/Decrypt | jq -r .plaintext | base64 -d)
    [ "$out" = "round $n" ] || { echo "cluster: round $n decrypted to '$out'" >&2; exit 1; }
  done
  # The AWS protocol through the same balancer, with the AWS CLI.
  (
    . "$dir/aws.env"
    arn=$(aws kms describe-key --key-id "$key" --query KeyMetadata.Arn --output text)
    for n in $(seq 1 6); do
      printf 'aws round %s' "$n" >"$dir/plain"
      aws kms encrypt --key-id "$arn" --plaintext "fileb://$dir/plain" --encryption-context n="$n" \
        --query CiphertextBlob --output text | base64 -d >"$dir/secret"
      out=$(aws kms decrypt --ciphertext-blob "fileb://$dir/secret" --encryption-context n="$n" \
        --query Plaintext --output text | base64 -d)
      [ "$out" = "aws round $n" ] || { echo "cluster: AWS round $n decrypted to '$out'" >&2; exit 1; }
    done
  )
  for i in 1 2 3; do
    kill -TERM "${pids[$((i - 1))]}"
    wait "${pids[$((i - 1))]}" || { echo "cluster: r$i did not stop cleanly" >&2; exit 1; }
    served=$(grep -c '"operation":"\(Encrypt\|Decrypt\)","resources":\["arn' "$dir/r$i/audit.jsonl" || true)
    [ "$served" -gt 0 ] || { echo "cluster: r$i served no Encrypt or Decrypt" >&2; exit 1; }
    "$bin" audit verify --config "$dir/r$i.toml" >/dev/null || { echo "cluster: r$i's audit chain" >&2; exit 1; }
    echo "cluster: r$i served $served of the 30 cryptographic requests; its audit chain verifies"
  done
  echo "cluster: OK"
  exit 0
fi

cat <<EOF

hsm-kms: three replicas on PostgreSQL, behind HAProxy

  endpoint (gRPC, plaintext):  $endpoint
  endpoint (AWS protocol):     $aws_endpoint   (. $dir/aws.env for the aws CLI)
  key store:                   cluster ($store), the default for CreateKey
  replicas:                    127.0.0.1:$((port + 1))-$((port + 3)) (gRPC), $((port + 4))-$((port + 6)) (AWS), admin (/readyz, /metrics) on $((port + 11))-$((port + 13))
  PostgreSQL:                  psql "$url"
  files, logs, audit trails:   $dir

Try it:
  $try
  grpcurl -plaintext -d '{"key_id":"KEY_ID","plaintext":"aGVsbG8="}' $endpoint $S/Encrypt
  . $dir/aws.env; aws kms list-keys

Stop a replica (kill -TERM \$(cat $dir/r2/pid)) and requests keep being served by the
others. Ctrl-C stops everything$([ "$keep" = 1 ] || echo " and removes $dir").
EOF
wait "${pids[@]}"
