//! `hsm-kms bench`: the raw PKCS#11 ceiling and the service's throughput, in one run.
//!
//! 1. Raw: AES-256-GCM C_Encrypt and C_Decrypt straight through PKCS#11 on a token key made
//!    with the service's own template, same payload, with 1 session and with N sessions
//!    (one thread each).
//! 2. Service: starts `hsm-kms serve` on its own fresh SoftHSM2 token (or targets `--target`),
//!    and drives Encrypt, Decrypt and GenerateDataKey over gRPC at each concurrency level
//!    with connection reuse.
//! 3. Reports throughput, p50/p99/max latency, errors, server RSS and the service/raw ratio,
//!    as a table and as one JSON document; with `--keys N`, Encrypt at one level again with
//!    the store holding N keys, spread over all of them.
//! 4. With `--aws`, Encrypt again at each level over the AWS KMS protocol (HTTP/1.1, SigV4)
//!    and over the XKS proxy API (as AWS KMS calls it) beside gRPC.
//! 5. With `--hsm-latency-ms 0.5,2,5` instead: a network HSM's latency, modelled by the
//!    test-only faulty PKCS#11 module (testing/faulty-pkcs11) adding that much to every call
//!    that would cross the network; Encrypt, Decrypt and GenerateDataKey at each level
//!    against the bound `sessions / latency`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use hsm_kms::config::{
    AdminSettings, ClusterSettings, GcmIvMode, HsmEntry, HsmSettings, LifecycleSettings, PinFormat,
    SecuritySettings, ServerSettings, Settings, StorageSettings, ThrottlingSettings,
};
use hsm_kms::hsm::single::OneCall;
use hsm_kms::hsm::{self, Modules};
use hsm_kms::proto::key_management_service_client::KeyManagementServiceClient;
use hsm_kms::proto::*;

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Plaintext size in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Concurrency levels for the gRPC load.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    pub levels: Vec<usize>,
    /// Measured seconds per level (after a short warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Sessions (threads) for the multi-session raw measurement.
    #[arg(long, default_value_t = 4)]
    pub raw_sessions: usize,
    /// Also measure Encrypt with the store holding this many keys (1 = skip).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Concurrency for the many-keys comparison.
    #[arg(long, default_value_t = 64)]
    pub keys_level: usize,
    /// Drive an already running service (with a CONNECTED store) instead of starting one;
    /// the raw measurement is then skipped.
    #[arg(long)]
    pub target: Option<String>,
    /// HTTP/2 connections the load is spread over (one load thread each).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// The started service's `hsm.session_pool_size`. SoftHSM2 computes in the calling
    /// thread and serialises on its own locks, so sessions beyond the CPU count add
    /// wake-ups and lock contention rather than throughput. Default: the number of CPUs.
    #[arg(long)]
    pub session_pool_size: Option<usize>,
    /// The started service's `server.worker_threads`. On this 2-CPU host, shared with the
    /// load generator and the token, one async thread used less CPU per request than two.
    /// Default: 1, and 2 with --hsm-latency-ms (there the CPU is not what limits, and one
    /// thread answering the 16 operations that finish together puts them in a queue).
    #[arg(long)]
    pub server_worker_threads: Option<usize>,
    /// Model a network HSM: per-call latencies in milliseconds (sub-millisecond allowed),
    /// each measured on a fresh service whose token is reached through the faulty module.
    /// The session pool is then 16 unless --session-pool-size says otherwise.
    #[arg(long, value_delimiter = ',')]
    pub hsm_latency_ms: Vec<f64>,
    /// Drive Encrypt with h2load (Debian's nghttp2-client) instead of the built-in client, at
    /// each level (streams over --connections connections): less CPU on the load side, so
    /// the service's own cost shows. The raw single-session ceiling is measured before and
    /// after; errors are counted from the service's audit trail (h2load does not read gRPC
    /// trailers).
    #[arg(long)]
    pub h2load: bool,
    /// Also drive Encrypt over the AWS KMS protocol at each level, beside gRPC: HTTP/1.1
    /// keep-alive with one connection per caller (the AWS SDKs keep a pool of them), each
    /// caller signing its request once and sending it again (the service verifies every
    /// copy in full), so that the load side's CPU stays small, as with gRPC. And the same
    /// over the XKS proxy API, as AWS KMS calls it (its p99 against AWS KMS's 250 ms).
    #[arg(long)]
    pub aws: bool,
    /// The faulty PKCS#11 module for --hsm-latency-ms (`cargo build --release -p
    /// faulty-pkcs11`). Default: libfaulty_pkcs11.so beside this executable.
    #[arg(long)]
    pub faulty_module: Option<PathBuf>,
    /// Measure the service as N replicas, for each N listed (e.g. 1,2,3): one throwaway
    /// PostgreSQL database and one token shared by N processes, each reaching the token
    /// through the modelled network HSM (the first --hsm-latency-ms, default 5 ms) with its
    /// own session pool (--session-pool-size, default 4), the load spread over them.
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RawResult {
    pub operation: String,
    pub sessions: usize,
    pub ops_per_sec: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LevelResult {
    pub operation: String,
    pub concurrency: usize,
    /// How many keys the load was spread over.
    pub keys: usize,
    /// How many keys the store held during the measurement.
    pub store_keys: usize,
    pub requests: usize,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: usize,
    pub server_rss_mib: Option<f64>,
    /// Throughput over the raw single-session ceiling of the same PKCS#11 operation.
    pub ratio_to_raw_1_session: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub payload_bytes: usize,
    pub seconds_per_level: f64,
    pub cpus: usize,
    /// The started service's tuning (absent in reports of earlier runs and with --target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_pool_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_worker_threads: Option<usize>,
    pub raw: Vec<RawResult>,
    pub service: Vec<LevelResult>,
    /// The modelled network HSM (`--hsm-latency-ms`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hsm_latency: Vec<LatencyResult>,
    /// CPU per request (`--h2load`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu: Vec<CpuResult>,
}

/// CPU time per request of one `--h2load` drive, from the kernel's accounting of the service
/// process and of h2load.
#[derive(Debug, Serialize, Deserialize)]
pub struct CpuResult {
    pub operation: String,
    pub concurrency: usize,
    /// The service process, all its threads (PKCS#11 sessions and audit writer included).
    pub service_us: Option<f64>,
    pub load_generator_us: f64,
    /// Encrypt only: the most Encrypt/s these CPUs could serve if a request cost no more CPU
    /// than a health check (load generator included) plus one operation of the raw
    /// single-session loop, whose thread keeps one CPU busy. No service whose handler does
    /// anything at all can exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_ops_per_sec: Option<f64>,
}

/// One operation at one concurrency against a modelled network HSM.
#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyResult {
    pub latency_ms: f64,
    pub sessions: usize,
    pub level: LevelResult,
    /// `sessions / (latency x HSM calls per operation)`, in operations per second.
    pub bound_ops_per_sec: f64,
    pub ratio_to_bound: f64,
    /// The p99 target at concurrency <= sessions: 1.5 x the HSM time of the operation
    /// (latency x its HSM calls) + 1 ms.
    pub p99_target_ms: f64,
    /// With --replicas: the replicas sharing the load (`sessions` is over all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
}

const PASSWORD: &str = "bench-kmsuser-pw";
const LABEL: &str = "hsm-kms-bench";

/// A fresh SoftHSM2 token in `dir`; returns the module path.
fn make_token(dir: &Path) -> anyhow::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let module = hsm_kms::dev::softhsm2_module()?;
    Ok(module)
}

/// AES-GCM as the service calls it: C_EncryptInit, then one C_Encrypt (hsm/single.rs).
fn gcm_encrypt(
    calls: &OneCall,
    s: &Session,
    key: ObjectHandle,
    pt: &[u8],
) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [7u8; 12];
    let aad = [0u8; 33];
    let params = GcmParams::new(&mut iv, &aad, 128.into())?;
    s.encrypt_init(&Mechanism::AesGcm(params), key)?;
    let mut out = vec![0u8; pt.len() + 16];
    calls.encrypt(s, pt, &mut out)?;
    Ok(out)
}

fn gcm_decrypt(
    calls: &OneCall,
    s: &Session,
    key: ObjectHandle,
    ct: &[u8],
) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [7u8; 12];
    let aad = [0u8; 33];
    let params = GcmParams::new(&mut iv, &aad, 128.into())?;
    s.decrypt_init(&Mechanism::AesGcm(params), key)?;
    let mut out = vec![0u8; ct.len()];
    calls.decrypt(s, ct, &mut out)?;
    Ok(out)
}

/// Runs `op` on `sessions` threads, each with its own session, for `seconds`.
#[allow(clippy::too_many_arguments)]
fn raw_run(
    ctx: &Pkcs11,
    calls: &Arc<OneCall>,
    slot: cryptoki::slot::Slot,
    key: ObjectHandle,
    sessions: usize,
    seconds: f64,
    decrypt: bool,
    payload: usize,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..sessions {
        let session = ctx.open_rw_session(slot)?;
        let stop = Arc::clone(&stop);
        let pt = vec![0x5a; payload];
        let calls = Arc::clone(calls);
        handles.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let ct = gcm_encrypt(&calls, &session, key, &pt)?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if decrypt {
                    gcm_decrypt(&calls, &session, key, &ct)?;
                } else {
                    gcm_encrypt(&calls, &session, key, &pt)?;
                }
                n += 1;
            }
            Ok(n)
        }));
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("raw thread panicked"))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn raw_ceiling(module: &Path, opts: &Options) -> anyhow::Result<Vec<RawResult>> {
    let modules = Modules::default();
    let (ctx, calls) = modules
        .get_with_calls(module)
        .map_err(|e| anyhow::anyhow!(e))?;
    let raw_label = format!("{LABEL}-raw");
    hsm::init_token(&ctx, &raw_label, "bench-so-pin", PASSWORD)?;
    let slot = hsm::find_token(&ctx, &raw_label)?.context("raw token vanished")?;
    let anchor = ctx.open_rw_session(slot)?;
    anchor.login(UserType::User, Some(&AuthPin::from(PASSWORD)))?;
    let id = uuid::Uuid::new_v4();
    let key = anchor.generate_key(
        &Mechanism::AesKeyGen,
        &hsm::key_template(&id, "arn:aws:kms:us-east-1:111122223333:key/raw-bench"),
    )?;
    let mut out = Vec::new();
    for (op, decrypt) in [("Encrypt", false), ("Decrypt", true)] {
        for sessions in [1, opts.raw_sessions] {
            let ops = raw_run(
                &ctx,
                &calls,
                slot,
                key,
                sessions,
                opts.seconds,
                decrypt,
                opts.payload,
            )?;
            eprintln!("raw {op:8} sessions={sessions:<3} {ops:>10.0} ops/s");
            out.push(RawResult {
                operation: op.to_string(),
                sessions,
                ops_per_sec: ops,
            });
        }
    }
    Ok(out)
}

/// Raw single-session Encrypt on the service's own token (after the many-keys set-up), to
/// tell the token's cost of holding many objects from the service's.
fn raw_on_service_token(module: &Path, opts: &Options) -> anyhow::Result<f64> {
    let modules = Modules::default();
    let (ctx, calls) = modules
        .get_with_calls(module)
        .map_err(|e| anyhow::anyhow!(e))?;
    let slot = hsm::find_token(&ctx, LABEL)?.context("the service token is gone")?;
    let anchor = ctx.open_rw_session(slot)?;
    anchor.login(UserType::User, Some(&AuthPin::from(PASSWORD)))?;
    let key = anchor
        .find_objects(&[cryptoki::object::Attribute::Class(
            cryptoki::object::ObjectClass::SECRET_KEY,
        )])?
        .into_iter()
        .next()
        .context("no key in the service token")?;
    raw_run(
        &ctx,
        &calls,
        slot,
        key,
        1,
        opts.seconds,
        false,
        opts.payload,
    )
}

/// A started service process.
struct Server {
    child: Child,
    addr: String,
    /// The AWS protocol listener.
    aws: String,
    /// The XKS proxy API listener.
    xks: String,
}

/// The bench's access key for the AWS protocol (its secret travels in the environment).
const AWS_KEY: (&str, &str) = (
    "AKIABENCHBENCHBENCH0",
    "bench-secret-not-for-production-use-00000",
);
const AWS_SECRET_ENV: &str = "HSM_KMS_BENCH_AWS_SECRET";

/// The bench's XKS credential (AWS KMS's, in production): its URI prefix, access key id
/// and secret (in the environment). It stands for the account root, whom the bench key's
/// default policy allows.
const XKS_KEY: (&str, &str, &str) = (
    "bench",
    "XKSBENCHBENCHBENCHBENCH234",
    "benchXksSecretNotForProductionUse0123456789abc=",
);
const XKS_SECRET_ENV: &str = "HSM_KMS_BENCH_XKS_SECRET";

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A replica among several sharing a PostgreSQL database (`start_server`).
struct ReplicaOf<'a> {
    name: &'a str,
    database: &'a hsm_kms::config::DatabaseSettings,
}

/// Starts `hsm-kms serve` on a fresh token of `module`; the service reaches the token
/// through `service_module` (the same, or the faulty module wrapping it) with `env`. As a
/// `replica`, it uses the database and keeps its config and audit trail under its name.
fn start_server(
    dir: &Path,
    module: &Path,
    service_module: &Path,
    env: &[(&str, String)],
    pool: usize,
    workers: usize,
    replica: Option<ReplicaOf<'_>>,
) -> anyhow::Result<Server> {
    let modules = Modules::default();
    let ctx = modules.get(module).map_err(|e| anyhow::anyhow!(e))?;
    if hsm::find_token(&ctx, LABEL)?.is_none() {
        hsm::init_token(&ctx, LABEL, "bench-so-pin", PASSWORD)?;
    }
    let anchor = dir.join("anchor.pem");
    if !anchor.exists() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(
            &anchor,
            params.self_signed(&rcgen::KeyPair::generate()?)?.pem(),
        )?;
    }
    let sealing_key = dir.join("sealing.key");
    if replica.is_some() && !sealing_key.exists() {
        // Replicas share one key, made here as an operator would (the service never makes
        // one with a database).
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut key[..]).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&sealing_key)?
            .write_all(&key[..])?;
    }
    let name = replica.as_ref().map_or("hsm-kms", |r| r.name);
    let settings = Settings {
        server: ServerSettings {
            listen: "127.0.0.1:0".parse()?,
            aws_listen: Some("127.0.0.1:0".parse()?),
            xks_listen: Some("127.0.0.1:0".parse()?),
            shutdown_grace_seconds: 1,
            worker_threads: Some(workers),
            ..Default::default()
        },
        account: Default::default(),
        storage: StorageSettings {
            sqlite_path: dir.join("metadata.sqlite3"),
        },
        database: replica.as_ref().map(|r| r.database.clone()),
        security: SecuritySettings {
            sealing_key_file: sealing_key,
            rotate_kmsuser_password: false,
        },
        hsm: HsmSettings {
            softhsm2_conf: Some(dir.join("softhsm2.conf")),
            session_pool_size: pool,
            ..Default::default()
        },
        lifecycle: LifecycleSettings::default(),
        // The bench measures the service, not the AWS-style quota.
        throttling: ThrottlingSettings {
            store_requests_per_second: 0,
        },
        admin: AdminSettings {
            enabled: false,
            ..Default::default()
        },
        tls: Default::default(),
        xks: hsm_kms::config::XksSettings {
            credentials: vec![hsm_kms::config::XksCredential {
                uri_prefix: XKS_KEY.0.into(),
                access_key_id: XKS_KEY.1.into(),
                secret_file: None,
                secret_env: Some(XKS_SECRET_ENV.into()),
                principal: "arn:aws:iam::111122223333:root".into(),
            }],
            ..Default::default()
        },
        // The load generator is on loopback; the audit trail is written as in production.
        auth: hsm_kms::config::AuthSettings {
            allow_plaintext_loopback: true,
            access_keys: vec![hsm_kms::config::AccessKeySettings {
                access_key_id: AWS_KEY.0.into(),
                secret_file: None,
                secret_env: Some(AWS_SECRET_ENV.into()),
                principal: "arn:aws:iam::111122223333:root".into(),
            }],
            ..Default::default()
        },
        audit: hsm_kms::config::AuditSettings {
            file: match &replica {
                Some(r) => dir.join(format!("{}-audit.jsonl", r.name)),
                None => dir.join("audit.jsonl"),
            },
            fsync: false,
            replica: name.into(),
        },
        kms: Default::default(),
        clusters: vec![ClusterSettings {
            id: "cluster-benchbenchbe".into(),
            module: service_module.to_path_buf(),
            token_label: LABEL.into(),
            trust_anchor_file: anchor,
            state: Default::default(),
            lineage: None,
            pin_format: PinFormat::Password,
            gcm_iv: GcmIvMode::Service,
            crypto_user: "kmsuser".into(),
            hsms: vec![
                HsmEntry {
                    id: "hsm-a".into(),
                    availability_zone: "az-a".into(),
                    state: Default::default(),
                },
                HsmEntry {
                    id: "hsm-b".into(),
                    availability_zone: "az-b".into(),
                    state: Default::default(),
                },
            ],
        }],
    };
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml::to_string_pretty(&settings)?)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env(AWS_SECRET_ENV, AWS_KEY.1)
        .env(XKS_SECRET_ENV, XKS_KEY.2)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut aws, mut xks) = (String::new(), String::new());
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("hsm-kms AWS protocol listening on ") {
                    aws = a.to_string();
                }
                if let Some(a) = l.strip_prefix("hsm-kms XKS proxy API listening on ") {
                    xks = a.to_string();
                }
                if let Some(a) = l.strip_prefix("hsm-kms listening on ") {
                    break a.to_string();
                }
            }
            _ => bail!("the service did not start"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Server {
        child,
        addr,
        aws,
        xks,
    })
}

fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

type Client = KeyManagementServiceClient<Channel>;

/// An HTTP/2 connection to `addr` (HOST:PORT) over a `transport::Coalesced` stream, as the
/// service's own are, so that a request goes out in one write rather than two.
async fn connect(addr: &str) -> anyhow::Result<Client> {
    let target = addr.to_string();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let target = target.clone();
        async move {
            let s = tokio::net::TcpStream::connect(target.as_str()).await?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(hsm_kms::transport::Coalesced(
                s,
            )))
        }
    });
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await?;
    Ok(KeyManagementServiceClient::new(ch))
}

async fn setup_store(c: &mut Client) -> anyhow::Result<String> {
    let stores = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest::default())
        .await?
        .into_inner()
        .custom_key_stores;
    if let Some(s) = stores.iter().find(|s| s.connection_state == "CONNECTED") {
        return Ok(s.custom_key_store_id.clone());
    }
    bail!("no CONNECTED custom key store at the target")
}

#[derive(Clone, Copy)]
enum Op {
    Encrypt,
    Decrypt,
    GenerateDataKey,
}

impl Op {
    /// The calls that reach the HSM per operation: GenerateDataKey encrypts its key, whose
    /// 32 bytes come from the token's generator in blocks of 4,096 (128 keys a call).
    fn hsm_calls(self) -> f64 {
        match self {
            Op::Encrypt | Op::Decrypt => 1.0,
            Op::GenerateDataKey => 1.0 + 1.0 / 128.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
            Op::GenerateDataKey => "GenerateDataKey",
        }
    }
}

/// Drives `op` at `concurrency` for `seconds`; returns per-request latencies and errors.
///
/// The load generator shares the machine with the service, so it is kept lean: each HTTP/2
/// connection has its own thread with a single-threaded runtime that runs the connection and
/// its share of the callers, so a request and its response never cross threads on this side.
async fn drive(
    addrs: &[String],
    connections: usize,
    load: &Load,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<(Vec<Duration>, usize, f64)> {
    let front = load.front;
    let connections = connections.clamp(1, concurrency.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    // Every connection is up before the clock starts.
    let ready = Arc::new(std::sync::Barrier::new(connections + 1));
    let mut threads = Vec::new();
    for t in 0..connections {
        // Connections go round the addresses (replicas), one after another.
        let (addr, load) = (addrs[t % addrs.len()].clone(), load.clone());
        let (stop, ready) = (Arc::clone(&stop), Arc::clone(&ready));
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let mine: Vec<usize> = (t..concurrency).step_by(connections).collect();
            let connected = match &rt {
                Ok(rt) => rt.block_on(open(front, &addr, mine.len())),
                Err(e) => Err(anyhow::anyhow!("starting a client runtime: {e}")),
            };
            ready.wait();
            let (rt, connected) = (rt?, connected?);
            rt.block_on(async move {
                let callers: Vec<_> = match connected {
                    Connections::Grpc(client) => mine
                        .into_iter()
                        .map(|w| {
                            let (c, load, stop) = (client.clone(), load.clone(), Arc::clone(&stop));
                            tokio::spawn(caller(c, load, w, concurrency, stop))
                        })
                        .collect(),
                    Connections::Aws(senders) => mine
                        .into_iter()
                        .zip(senders)
                        .map(|(w, sender)| {
                            let (addr, load, stop) =
                                (addr.clone(), load.clone(), Arc::clone(&stop));
                            tokio::spawn(http_caller(sender, addr, load, w, stop))
                        })
                        .collect(),
                };
                let mut lat = Vec::new();
                let mut errors = 0;
                for c in callers {
                    let (l, e) = c.await?;
                    lat.extend(l);
                    errors += e;
                }
                Ok::<_, anyhow::Error>((lat, errors))
            })
        }));
    }
    tokio::task::block_in_place(|| ready.wait());
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = tokio::task::block_in_place(|| {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked"))
            })
            .collect::<Vec<_>>()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    let mut errors = 0;
    for outcome in outcomes {
        let (l, e) = outcome??;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors, elapsed))
}

/// How the load reaches the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    /// gRPC: the callers of one load thread share its HTTP/2 connection.
    Grpc,
    /// The AWS KMS protocol (Encrypt only): one HTTP/1.1 keep-alive connection per caller.
    Aws,
    /// The XKS proxy API (Encrypt only), as AWS KMS calls it: one HTTP/1.1 keep-alive
    /// connection per caller.
    Xks,
}

/// A load thread's connections.
enum Connections {
    Grpc(Client),
    Aws(Vec<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>),
}

async fn open(front: Front, addr: &str, callers: usize) -> anyhow::Result<Connections> {
    match front {
        Front::Grpc => Ok(Connections::Grpc(connect(addr).await?)),
        Front::Aws | Front::Xks => {
            let mut senders = Vec::with_capacity(callers);
            for _ in 0..callers {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(connection);
                senders.push(sender);
            }
            Ok(Connections::Aws(senders))
        }
    }
}

/// One caller over the AWS protocol or the XKS API: its Encrypt request signed once (by
/// aws-sigv4, as the SDKs and AWS KMS sign), then sent back to back until `stop`; its
/// latencies and error count.
async fn http_caller(
    mut sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: String,
    load: Load,
    first: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Duration>, usize) {
    use base64::Engine as _;
    use hsm_kms::api::aws::sigv4;
    use http_body_util::BodyExt as _;
    let key = &load.keys[first % load.keys.len()];
    let plaintext = base64::engine::general_purpose::STANDARD.encode(vec![0x42u8; load.payload]);
    let (mut lat, mut errors) = (Vec::with_capacity(4096), 0);
    let (path, body, signed) = if load.front == Front::Xks {
        let path = format!("/{}/kms/xks/v1/keys/{key}/encrypt", XKS_KEY.0);
        let body = serde_json::json!({
            "requestMetadata": {
                "awsPrincipalArn": "arn:aws:iam::111122223333:user/bench",
                "kmsKeyArn": format!("arn:aws:kms:us-east-1:111122223333:key/{key}"),
                "kmsOperation": "Encrypt",
                "kmsRequestId": "bench",
            },
            "plaintext": plaintext,
            "encryptionAlgorithm": "AES_GCM",
        })
        .to_string();
        let headers = [
            ("host", addr.as_str()),
            ("content-type", "application/json"),
        ];
        let signed = sigv4::sign_request(
            sigv4::XKS_SERVICE,
            &path,
            &headers,
            body.as_bytes(),
            XKS_KEY.1,
            XKS_KEY.2,
            "us-east-1",
            std::time::SystemTime::now(),
        );
        (path, body, signed)
    } else {
        let body = serde_json::json!({ "KeyId": key, "Plaintext": plaintext }).to_string();
        let headers = [
            ("host", addr.as_str()),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "TrentService.Encrypt"),
        ];
        let signed = sigv4::sign_post(
            &headers,
            body.as_bytes(),
            AWS_KEY.0,
            AWS_KEY.1,
            "us-east-1",
            std::time::SystemTime::now(),
        );
        ("/".to_string(), body, signed)
    };
    let Ok(signed) = signed else {
        return (lat, 1);
    };
    let body = bytes::Bytes::from(body);
    while !stop.load(Ordering::Relaxed) {
        let mut request = hyper::Request::post(path.as_str());
        for (n, v) in &signed {
            request = request.header(n, v);
        }
        let Ok(request) = request.body(http_body_util::Full::new(body.clone())) else {
            return (lat, errors + 1);
        };
        let t = Instant::now();
        let ok = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                response.into_body().collect().await.is_ok() && status == 200
            }
            Err(_) => {
                // The connection is gone: the rest of this caller's run is errors.
                lat.push(t.elapsed());
                return (lat, errors + 1);
            }
        };
        lat.push(t.elapsed());
        if !ok {
            errors += 1;
        }
    }
    (lat, errors)
}

/// What the callers send: the operation, the keys and ciphertexts to use, the plaintext size.
#[derive(Clone)]
struct Load {
    front: Front,
    op: Op,
    keys: Arc<Vec<String>>,
    blobs: Arc<Vec<Vec<u8>>>,
    payload: usize,
}

/// One caller: requests back to back until `stop`; its latencies and error count.
async fn caller(
    mut c: Client,
    load: Load,
    first: usize,
    stride: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Duration>, usize) {
    let Load {
        op,
        keys,
        blobs,
        payload,
        ..
    } = load;
    let mut lat = Vec::with_capacity(4096);
    let mut errors = 0;
    let pt = vec![0x42u8; payload];
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        i = i.wrapping_add(stride);
        let key = keys[i % keys.len()].clone();
        let t = Instant::now();
        let ok = match op {
            Op::Encrypt => c
                .encrypt(EncryptRequest {
                    key_id: key,
                    plaintext: pt.clone(),
                    ..Default::default()
                })
                .await
                .is_ok(),
            Op::Decrypt => c
                .decrypt(DecryptRequest {
                    ciphertext_blob: blobs[i % blobs.len()].clone(),
                    ..Default::default()
                })
                .await
                .is_ok(),
            Op::GenerateDataKey => c
                .generate_data_key(GenerateDataKeyRequest {
                    key_id: key,
                    key_spec: Some("AES_256".into()),
                    ..Default::default()
                })
                .await
                .is_ok(),
        };
        lat.push(t.elapsed());
        if !ok {
            errors += 1;
        }
    }
    (lat, errors)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn level(
    addrs: &[String],
    load: Load,
    opts: &Options,
    concurrency: usize,
    store_keys: usize,
    pid: Option<u32>,
    raw: &[RawResult],
) -> anyhow::Result<LevelResult> {
    // A short warm-up at the same concurrency, then the measured run.
    let warm_up = (opts.seconds / 5.0).min(0.5);
    // At least one connection per address, and as many to each.
    let n = addrs.len().max(1);
    let connections = opts.connections.max(n).div_ceil(n) * n;
    drive(addrs, connections, &load, concurrency, warm_up).await?;
    let (mut lat, errors, elapsed) =
        drive(addrs, connections, &load, concurrency, opts.seconds).await?;
    lat.sort_unstable();
    let raw_op = match load.op {
        Op::Decrypt => "Decrypt",
        _ => "Encrypt",
    };
    let raw1 = raw
        .iter()
        .find(|r| r.operation == raw_op && r.sessions == 1)
        .map(|r| r.ops_per_sec);
    let ops = (lat.len() - errors) as f64 / elapsed;
    let operation = match load.front {
        Front::Grpc => load.op.name().to_string(),
        Front::Aws => format!("{} (AWS)", load.op.name()),
        Front::Xks => format!("{} (XKS)", load.op.name()),
    };
    let r = LevelResult {
        operation,
        concurrency,
        keys: load.keys.len(),
        store_keys,
        requests: lat.len(),
        ops_per_sec: ops,
        p50_ms: pct(&lat, 0.50),
        p99_ms: pct(&lat, 0.99),
        max_ms: lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
        errors,
        server_rss_mib: rss_mib(pid),
        ratio_to_raw_1_session: raw1.map(|r| ops / r),
    };
    eprintln!(
        "{:16} c={:<4} keys={:<6} {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  errors {}",
        r.operation, r.concurrency, r.keys, r.ops_per_sec, r.p50_ms, r.p99_ms, r.max_ms, r.errors
    );
    Ok(r)
}

/// A connected store (created when `dir` holds a started service's trust anchor), a key in
/// it and a ciphertext under the key.
async fn prepare(
    c: &mut Client,
    dir: Option<&Path>,
    opts: &Options,
) -> anyhow::Result<(String, String, Vec<u8>)> {
    let store = if let Some(dir) = dir {
        let id = c
            .create_custom_key_store(CreateCustomKeyStoreRequest {
                custom_key_store_name: "bench".into(),
                cloud_hsm_cluster_id: Some("cluster-benchbenchbe".into()),
                trust_anchor_certificate: Some(std::fs::read_to_string(dir.join("anchor.pem"))?),
                key_store_password: Some(PASSWORD.into()),
                custom_key_store_type: None,
            })
            .await?
            .into_inner()
            .custom_key_store_id;
        c.connect_custom_key_store(ConnectCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
        })
        .await?;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if setup_store(c).await.is_ok() {
                break;
            }
        }
        id
    } else {
        setup_store(c).await?
    };
    let key = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .key_metadata
        .map(|m| m.key_id)
        .unwrap_or_default();
    let blob = c
        .encrypt(EncryptRequest {
            key_id: key.clone(),
            plaintext: vec![0x42; opts.payload],
            ..Default::default()
        })
        .await?
        .into_inner()
        .ciphertext_blob;
    Ok((store, key, blob))
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `--h2load`: Encrypt driven by h2load, between two raw single-session measurements.
async fn with_h2load(opts: Options) -> anyhow::Result<Report> {
    let cpus = cpus();
    let pool = opts.session_pool_size.unwrap_or(cpus).max(1);
    let workers = opts.server_worker_threads.unwrap_or(1);
    let dir = tempfile::tempdir()?;
    let module = make_token(dir.path())?;
    let raw_encrypt_1 = |opts: &Options| -> anyhow::Result<f64> {
        let one = Options {
            raw_sessions: 1,
            ..opts.clone()
        };
        Ok(raw_ceiling(&module, &one)?
            .into_iter()
            .find(|r| r.operation == "Encrypt")
            .map(|r| r.ops_per_sec)
            .unwrap_or(0.0))
    };
    let before = tokio::task::block_in_place(|| raw_encrypt_1(&opts))?;
    let server = tokio::task::block_in_place(|| {
        start_server(dir.path(), &module, &module, &[], pool, workers, None)
    })?;
    let mut c = connect(&server.addr).await?;
    let (_, key, _) = prepare(&mut c, Some(dir.path()), &opts).await?;
    let channel = Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?
        .into_inner();
    anyhow::ensure!(
        health.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "the health check is not SERVING: {health:?}"
    );
    let encrypt = EncryptRequest {
        key_id: key,
        plaintext: vec![0x42; opts.payload],
        ..Default::default()
    };
    let dry_run = EncryptRequest {
        dry_run: Some(true),
        ..encrypt.clone()
    };
    const ENCRYPT: &str = "/kms.v1.KeyManagementService/Encrypt";
    let drives = [
        H2Drive::new(
            dir.path(),
            ENCRYPT_ROW,
            ENCRYPT,
            &encrypt,
            Counted::Audited(None),
        )?,
        H2Drive::new(
            dir.path(),
            "Encrypt DryRun",
            ENCRYPT,
            &dry_run,
            Counted::Audited(Some("DryRunOperationException")),
        )?,
        H2Drive::new(
            dir.path(),
            FLOOR_ROW,
            "/grpc.health.v1.Health/Check",
            &tonic_health::pb::HealthCheckRequest::default(),
            Counted::ByH2load,
        )?,
    ];
    let mut audit = AuditTail::new(dir.path().join("audit.jsonl"));
    let mut service = Vec::new();
    let mut cpu = Vec::new();
    for &n in &opts.levels {
        let connections = opts.connections.clamp(1, n.max(1));
        let streams = n.div_ceil(connections);
        for drive in &drives {
            audit.skip()?;
            let server_cpu = process_cpu_seconds(server.child.id());
            let load_cpu = children_cpu_seconds();
            let text = tokio::task::block_in_place(|| {
                drive.run(&server.addr, connections, streams, opts.seconds)
            })?;
            let load_cpu = children_cpu_seconds() - load_cpu;
            let server_cpu = process_cpu_seconds(server.child.id())
                .zip(server_cpu)
                .map(|(after, before)| after - before);
            let rate = h2load_rate(&text).context("no req/s in h2load's output")?;
            let done = h2load_succeeded(&text).context("no request count in h2load's output")?;
            // h2load takes every HTTP 200 as a success; the audit trail says what the service
            // answered.
            let (ok, failed) = match drive.counted {
                Counted::Audited(wanted) => {
                    let outcomes = audit.encrypt_outcomes()?;
                    let (ok, other): (Vec<_>, Vec<_>) =
                        outcomes.iter().partition(|o| o.as_deref() == wanted);
                    for o in &other {
                        eprintln!("  unexpected: {}", o.as_deref().unwrap_or("allowed"));
                    }
                    (ok.len() as u64, other.len() as u64)
                }
                Counted::ByH2load => (done, 0),
            };
            let ops = rate * ok as f64 / (ok + failed).max(1) as f64;
            // The CPU counters cover h2load's warm-up second too; its rate does not.
            let sent = rate * (opts.seconds.ceil() + 1.0);
            let per_request = |cpu: f64| cpu * 1e6 / sent.max(1.0);
            eprintln!(
                "{:<24} streams={n:<4} {ops:>9.0} ops/s  errors {failed}  CPU per request: \
                 service {} µs, h2load {:.0} µs",
                drive.name,
                server_cpu.map_or("?".into(), |c| format!("{:.0}", per_request(c))),
                per_request(load_cpu),
            );
            service.push(LevelResult {
                operation: drive.name.into(),
                concurrency: n,
                keys: 1,
                store_keys: 1,
                requests: (ok + failed) as usize,
                ops_per_sec: ops,
                p50_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
                errors: failed as usize,
                server_rss_mib: rss_mib(Some(server.child.id())),
                ratio_to_raw_1_session: None,
            });
            cpu.push(CpuResult {
                operation: drive.name.into(),
                concurrency: n,
                service_us: server_cpu.map(per_request),
                load_generator_us: per_request(load_cpu),
                bound_ops_per_sec: None,
            });
        }
    }
    drop(server);
    let after = tokio::task::block_in_place(|| raw_encrypt_1(&opts))?;
    let raw_mean = (before + after) / 2.0;
    for r in &mut service {
        r.ratio_to_raw_1_session = Some(r.ops_per_sec / raw_mean);
    }
    let token_us = 1e6 / raw_mean.max(1.0);
    for &n in &opts.levels {
        let at = |name: &str| {
            cpu.iter()
                .position(|c| c.concurrency == n && c.operation == name)
        };
        if let (Some(floor), Some(enc)) = (at(FLOOR_ROW), at(ENCRYPT_ROW)) {
            let floor = &cpu[floor];
            cpu[enc].bound_ops_per_sec = floor
                .service_us
                .map(|s| cpus as f64 * 1e6 / (s + floor.load_generator_us + token_us));
        }
    }
    eprintln!("raw Encrypt sessions=1: {before:.0} before, {after:.0} after");
    Ok(Report {
        payload_bytes: opts.payload,
        seconds_per_level: opts.seconds,
        cpus,
        session_pool_size: Some(pool),
        server_worker_threads: Some(workers),
        raw: vec![
            RawResult {
                operation: "Encrypt (before)".into(),
                sessions: 1,
                ops_per_sec: before,
            },
            RawResult {
                operation: "Encrypt (after)".into(),
                sessions: 1,
                ops_per_sec: after,
            },
        ],
        service,
        hsm_latency: Vec::new(),
        cpu,
    })
}

/// The `--h2load` rows of Encrypt and of the floor (the health check) its bound comes from.
const ENCRYPT_ROW: &str = "Encrypt (h2load)";
const FLOOR_ROW: &str = "Health/Check";

/// One request `--h2load` sends over and over, and how its answers are counted.
struct H2Drive {
    name: &'static str,
    path: &'static str,
    /// The gRPC-framed request.
    file: PathBuf,
    counted: Counted,
}

/// How the answers of a drive are counted.
#[derive(Clone, Copy)]
enum Counted {
    /// From the audit trail's Encrypt lines: a success is the outcome named (`None`:
    /// allowed; `Some`: that exception).
    Audited(Option<&'static str>),
    /// As h2load saw them: the health check leaves no audit line (its SERVING answer is
    /// checked once before the drives).
    ByH2load,
}

impl H2Drive {
    fn new(
        dir: &Path,
        name: &'static str,
        path: &'static str,
        request: &impl prost::Message,
        counted: Counted,
    ) -> anyhow::Result<H2Drive> {
        // One gRPC message: a zero compression flag, the length, the protobuf.
        let body = request.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
        framed.extend_from_slice(&body);
        let file = dir.join(format!("{}.grpc", name.replace(['/', ' ', '(', ')'], "_")));
        std::fs::write(&file, framed)?;
        Ok(H2Drive {
            name,
            path,
            file,
            counted,
        })
    }

    /// Runs h2load for `seconds` after a second of warm-up; its standard output.
    fn run(
        &self,
        addr: &str,
        connections: usize,
        streams: usize,
        seconds: f64,
    ) -> anyhow::Result<String> {
        let out = Command::new("h2load")
            .args(["-t", "1", "-c", &connections.to_string()])
            .args(["-m", &streams.to_string()])
            .args(["-D", &format!("{}", seconds.ceil() as u64)])
            .args(["--warm-up-time", "1"])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("-d")
            .arg(&self.file)
            .arg(format!("http://{addr}{}", self.path))
            .output()
            .context("running h2load (apt-get install nghttp2-client)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(out.status.success(), "h2load failed: {text}");
        Ok(text)
    }
}

/// The user and system CPU time of process `pid` so far, in seconds.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th
    // of the whole line, in clock ticks.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// The user and system CPU time of this process's waited-for children so far, in seconds.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The audit trail as the bench reads it: only the lines written since its last look.
struct AuditTail {
    path: PathBuf,
    /// Where the unread lines start.
    offset: u64,
}

impl AuditTail {
    fn new(path: PathBuf) -> AuditTail {
        AuditTail { path, offset: 0 }
    }

    /// Marks every line written so far as read.
    fn skip(&mut self) -> anyhow::Result<()> {
        self.encrypt_outcomes().map(drop)
    }

    /// The outcomes of the Encrypt lines written since the last look: `None` for allowed,
    /// else the exception. A line still being written is left for the next look.
    fn encrypt_outcomes(&mut self) -> anyhow::Result<Vec<Option<String>>> {
        use std::io::{Read, Seek};
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            f.seek(std::io::SeekFrom::Start(self.offset))?;
            f.read_to_string(&mut text)?;
        }
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        let mut out = Vec::new();
        for line in text[..complete].lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["operation"] == "Encrypt" {
                out.push(
                    (v["outcome"] != "allowed")
                        .then(|| v["error"].as_str().unwrap_or("?").to_string()),
                );
            }
        }
        Ok(out)
    }
}

/// The succeeded count of h2load's `requests: 10 total, 10 started, 10 done, 10 succeeded,
/// ...` line.
fn h2load_succeeded(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("requests:"))?;
    line.split(", ")
        .find_map(|part| part.strip_suffix(" succeeded"))
        .and_then(|n| n.trim().parse().ok())
}

/// The request rate of h2load's `finished in 5.00s, 12345.67 req/s, ...` line.
fn h2load_rate(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with("finished in"))?;
    line.split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))
        .and_then(|n| n.trim().parse().ok())
}

/// The faulty PKCS#11 module that models a network HSM.
fn faulty_module(opts: &Options) -> anyhow::Result<PathBuf> {
    let faulty = match &opts.faulty_module {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("libfaulty_pkcs11.so"),
    };
    anyhow::ensure!(
        faulty.exists(),
        "{} is missing: build it with `cargo build --release -p faulty-pkcs11`, or name it \
         with --faulty-module",
        faulty.display()
    );
    Ok(faulty)
}

/// The environment that makes the faulty module wrap `module` with `ms` per HSM call.
fn latency_env(module: &Path, ms: f64) -> [(&'static str, String); 2] {
    [
        ("FAULTY_PKCS11_MODULE", module.display().to_string()),
        (
            "FAULTY_PKCS11_LATENCY_US",
            ((ms * 1000.0).round() as u64).to_string(),
        ),
    ]
}

/// `--replicas`: for each N, N replicas on a fresh PostgreSQL database and a fresh token
/// behind the modelled network HSM, driven with Encrypt spread over all of them.
async fn replica_scaling(opts: Options) -> anyhow::Result<Report> {
    let ms = opts.hsm_latency_ms.first().copied().unwrap_or(5.0);
    let pool = opts.session_pool_size.unwrap_or(4).max(1);
    let workers = opts.server_worker_threads.unwrap_or(1);
    let faulty = faulty_module(&opts)?;
    let pg = testing::postgres::Server::shared()?;
    let mut out = Vec::new();
    for &n in &opts.replicas {
        let dir = tempfile::tempdir()?;
        let module = make_token(dir.path())?;
        let env = latency_env(&module, ms);
        let database = hsm_kms::config::DatabaseSettings {
            url: pg.fresh_database().await?,
            password_file: None,
            password_env: None,
            pool_size: 8,
            tls_ca_file: None,
        };
        let start = |i: usize| {
            let name = format!("r{}", i + 1);
            let replica = ReplicaOf {
                name: &name,
                database: &database,
            };
            tokio::task::block_in_place(|| {
                start_server(
                    dir.path(),
                    &module,
                    &faulty,
                    &env,
                    pool,
                    workers,
                    Some(replica),
                )
            })
        };
        let mut servers = vec![start(0)?];
        let mut c = connect(&servers[0].addr).await?;
        let (_, key, blob) = prepare(&mut c, Some(dir.path()), &opts).await?;
        // The others start one at a time, each logged in (it serves the key) before the
        // next starts: a SoftHSM2 2.6.1 process reading the token's file while another
        // logs in can stop seeing new objects for good (see docs/REPLICAS.md).
        for i in 1..n.max(1) {
            let s = start(i)?;
            let mut c = connect(&s.addr).await?;
            let mut tries = 0;
            while c
                .encrypt(EncryptRequest {
                    key_id: key.clone(),
                    plaintext: vec![1],
                    ..Default::default()
                })
                .await
                .is_err()
            {
                tries += 1;
                anyhow::ensure!(tries < 200, "replica at {} never served the key", s.addr);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            servers.push(s);
        }
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let (keys, blobs) = (Arc::new(vec![key]), Arc::new(vec![blob]));
        for &c in &opts.levels {
            let load = Load {
                front: Front::Grpc,
                op: Op::Encrypt,
                keys: Arc::clone(&keys),
                blobs: Arc::clone(&blobs),
                payload: opts.payload,
            };
            let level = level(&addrs, load, &opts, c, 1, None, &[]).await?;
            let sessions = pool * servers.len();
            let bound = sessions as f64 / (ms / 1000.0 * Op::Encrypt.hsm_calls());
            eprintln!(
                "  {} replicas: {:.0}% of the bound {bound:.0} ops/s",
                servers.len(),
                level.ops_per_sec / bound * 100.0
            );
            out.push(LatencyResult {
                latency_ms: ms,
                sessions,
                bound_ops_per_sec: bound,
                ratio_to_bound: level.ops_per_sec / bound,
                p99_target_ms: 1.5 * ms * Op::Encrypt.hsm_calls() + 1.0,
                level,
                replicas: Some(servers.len()),
            });
        }
    }
    Ok(Report {
        payload_bytes: opts.payload,
        seconds_per_level: opts.seconds,
        cpus: cpus(),
        session_pool_size: Some(pool),
        server_worker_threads: Some(workers),
        raw: Vec::new(),
        service: Vec::new(),
        hsm_latency: out,
        cpu: Vec::new(),
    })
}

/// `--hsm-latency-ms`: for each latency, a fresh service whose token is reached through the
/// faulty module adding that latency to every call that would cross the network.
async fn latency_model(opts: Options) -> anyhow::Result<Report> {
    let cpus = cpus();
    let pool = opts.session_pool_size.unwrap_or(16).max(1);
    let workers = opts.server_worker_threads.unwrap_or(2);
    let faulty = faulty_module(&opts)?;
    let mut out = Vec::new();
    for &ms in &opts.hsm_latency_ms {
        let dir = tempfile::tempdir()?;
        let module = make_token(dir.path())?;
        let env = [
            ("FAULTY_PKCS11_MODULE", module.display().to_string()),
            (
                "FAULTY_PKCS11_LATENCY_US",
                ((ms * 1000.0).round() as u64).to_string(),
            ),
        ];
        let server = tokio::task::block_in_place(|| {
            start_server(dir.path(), &module, &faulty, &env, pool, workers, None)
        })?;
        let mut c = connect(&server.addr).await?;
        let (_, key, blob) = prepare(&mut c, Some(dir.path()), &opts).await?;
        let (keys, blobs) = (Arc::new(vec![key]), Arc::new(vec![blob]));
        for op in [Op::Encrypt, Op::Decrypt, Op::GenerateDataKey] {
            for &n in &opts.levels {
                let load = Load {
                    front: Front::Grpc,
                    op,
                    keys: Arc::clone(&keys),
                    blobs: Arc::clone(&blobs),
                    payload: opts.payload,
                };
                let level = level(
                    std::slice::from_ref(&server.addr),
                    load,
                    &opts,
                    n,
                    1,
                    Some(server.child.id()),
                    &[],
                )
                .await?;
                let bound = pool as f64 / (ms / 1000.0 * op.hsm_calls());
                let r = LatencyResult {
                    latency_ms: ms,
                    sessions: pool,
                    bound_ops_per_sec: bound,
                    ratio_to_bound: level.ops_per_sec / bound,
                    p99_target_ms: 1.5 * ms * op.hsm_calls() + 1.0,
                    level,
                    replicas: None,
                };
                eprintln!(
                    "  latency {ms} ms: {:.0}% of the bound {bound:.0} ops/s",
                    r.ratio_to_bound * 100.0
                );
                out.push(r);
            }
        }
    }
    Ok(Report {
        payload_bytes: opts.payload,
        seconds_per_level: opts.seconds,
        cpus,
        session_pool_size: Some(pool),
        server_worker_threads: Some(workers),
        raw: Vec::new(),
        service: Vec::new(),
        hsm_latency: out,
        cpu: Vec::new(),
    })
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    if !opts.replicas.is_empty() {
        return replica_scaling(opts).await;
    }
    if !opts.hsm_latency_ms.is_empty() {
        return latency_model(opts).await;
    }
    if opts.h2load {
        return with_h2load(opts).await;
    }
    let cpus = cpus();
    let pool = opts.session_pool_size.unwrap_or(cpus).max(1);
    let workers = opts.server_worker_threads.unwrap_or(1);
    let dir = tempfile::tempdir()?;
    let module = make_token(dir.path())?;
    let mut raw = if opts.target.is_none() {
        tokio::task::block_in_place(|| raw_ceiling(&module, &opts))?
    } else {
        Vec::new()
    };
    let server = match &opts.target {
        Some(_) => None,
        None => Some(tokio::task::block_in_place(|| {
            start_server(dir.path(), &module, &module, &[], pool, workers, None)
        })?),
    };
    let addr = opts
        .target
        .clone()
        .or_else(|| server.as_ref().map(|s| s.addr.clone()))
        .context("no address")?;
    let pid = server.as_ref().map(|s| s.child.id());
    // Set-up and key creation share one connection; each load level opens its own.
    let mut c = connect(&addr).await?;
    let (store, key, blob) = prepare(&mut c, server.is_some().then(|| dir.path()), &opts).await?;
    let keys = Arc::new(vec![key.clone()]);
    let blobs = Arc::new(vec![blob]);

    let mut service = Vec::new();
    // Encrypt over the AWS protocol right after Encrypt over gRPC, at the same levels.
    // And over the XKS proxy API, as AWS KMS calls it.
    let aws = match (&server, opts.aws) {
        (Some(s), true) => Some((s.aws.clone(), s.xks.clone())),
        (None, true) => bail!("--aws needs the bench's own service (not --target)"),
        _ => None,
    };
    let mut runs = vec![(Front::Grpc, Op::Encrypt, addr.clone())];
    if let Some((aws, xks)) = aws {
        runs.push((Front::Aws, Op::Encrypt, aws));
        runs.push((Front::Xks, Op::Encrypt, xks));
    }
    runs.push((Front::Grpc, Op::Decrypt, addr.clone()));
    runs.push((Front::Grpc, Op::GenerateDataKey, addr.clone()));
    for (front, op, to) in runs {
        for &n in &opts.levels {
            service.push(
                level(
                    std::slice::from_ref(&to),
                    Load {
                        front,
                        op,
                        keys: Arc::clone(&keys),
                        blobs: Arc::clone(&blobs),
                        payload: opts.payload,
                    },
                    &opts,
                    n,
                    1,
                    pid,
                    &raw,
                )
                .await?,
            );
        }
    }

    if opts.keys > 1 {
        eprintln!("creating {} keys...", opts.keys - 1);
        let started = Instant::now();
        let mut all = vec![key];
        let mut pending = Vec::new();
        let retried = Arc::new(AtomicUsize::new(0));
        for _ in 1..opts.keys {
            pending.push(tokio::spawn(create_key_retrying(
                c.clone(),
                store.clone(),
                Arc::clone(&retried),
            )));
            // The token makes one object at a time; a few calls in flight keep it busy.
            if pending.len() >= 4 {
                for p in pending.drain(..) {
                    all.push(p.await??);
                }
            }
        }
        for p in pending {
            all.push(p.await??);
        }
        let retried = retried.load(Ordering::Relaxed);
        if retried > 0 {
            eprintln!("{retried} CreateKey calls were retried after DependencyTimeoutException");
        }
        eprintln!(
            "created {} keys in {:.1} s",
            all.len() - 1,
            started.elapsed().as_secs_f64()
        );
        let many = Arc::new(all);
        // One pass over every key first, so each key's handle is looked up once.
        for k in many.iter() {
            c.encrypt(EncryptRequest {
                key_id: k.clone(),
                plaintext: vec![1],
                ..Default::default()
            })
            .await?;
        }
        // Spread over every key, then all on one key, with the same store behind both.
        for over in [&many, &keys] {
            service.push(
                level(
                    std::slice::from_ref(&addr),
                    Load {
                        front: Front::Grpc,
                        op: Op::Encrypt,
                        keys: Arc::clone(over),
                        blobs: Arc::clone(&blobs),
                        payload: opts.payload,
                    },
                    &opts,
                    opts.keys_level,
                    many.len(),
                    pid,
                    &raw,
                )
                .await?,
            );
        }
    }
    if opts.keys > 1 && server.is_some() {
        let ops = tokio::task::block_in_place(|| raw_on_service_token(&module, &opts))?;
        eprintln!(
            "raw Encrypt  sessions=1 on the service token ({} keys) {ops:>10.0} ops/s",
            opts.keys
        );
        raw.push(RawResult {
            operation: format!("Encrypt (token holding {} keys)", opts.keys),
            sessions: 1,
            ops_per_sec: ops,
        });
    }
    let started = server.is_some();
    drop(server);
    Ok(Report {
        payload_bytes: opts.payload,
        seconds_per_level: opts.seconds,
        cpus,
        session_pool_size: started.then_some(pool),
        server_worker_threads: started.then_some(workers),
        raw,
        service,
        hsm_latency: Vec::new(),
        cpu: Vec::new(),
    })
}

/// The report as a plain table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "payload {} bytes, {} s per level, {} CPUs\n\nraw PKCS#11 (AES-256-GCM in the token)\n",
        r.payload_bytes, r.seconds_per_level, r.cpus
    ));
    if let (Some(pool), Some(workers)) = (r.session_pool_size, r.server_worker_threads) {
        s.insert_str(
            s.find('\n').unwrap_or(0),
            &format!("; service: hsm.session_pool_size {pool}, server.worker_threads {workers}"),
        );
    }
    s.push_str("operation         sessions      ops/s\n");
    for x in &r.raw {
        s.push_str(&format!(
            "{:16} {:>9} {:>10.0}\n",
            x.operation, x.sessions, x.ops_per_sec
        ));
    }
    s.push_str("\nservice (gRPC)\n");
    s.push_str("operation        conc   keys  in store      ops/s   p50 ms   p99 ms   max ms  errors  RSS MiB  service/raw(1)\n");
    for x in &r.service {
        s.push_str(&format!(
            "{:16} {:>4} {:>6} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>8} {:>14}\n",
            x.operation,
            x.concurrency,
            x.keys,
            x.store_keys,
            x.ops_per_sec,
            x.p50_ms,
            x.p99_ms,
            x.max_ms,
            x.errors,
            x.server_rss_mib
                .map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into()),
            x.ratio_to_raw_1_session
                .map(|m| format!("{m:.2}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    if !r.cpu.is_empty() {
        let encrypt: Vec<f64> = r
            .raw
            .iter()
            .filter(|x| x.operation.starts_with("Encrypt"))
            .map(|x| x.ops_per_sec)
            .collect();
        let raw = encrypt.iter().sum::<f64>() / encrypt.len().max(1) as f64;
        s.push_str("\nCPU per request (h2load; µs of CPU time, all threads of each process)\n");
        s.push_str("operation                conc   service    h2load      bound  bound/raw(1)\n");
        for x in &r.cpu {
            let bound = x.bound_ops_per_sec;
            s.push_str(&format!(
                "{:24} {:>4} {:>9} {:>9.1} {:>10} {:>13}\n",
                x.operation,
                x.concurrency,
                x.service_us.map_or("-".into(), |u| format!("{u:.1}")),
                x.load_generator_us,
                bound.map_or("-".into(), |b| format!("{b:.0}")),
                bound.map_or("-".into(), |b| format!("{:.2}", b / raw.max(1.0))),
            ));
        }
        s.push_str(
            "bound: CPUs / (a Health/Check's CPU, service and h2load, + 1 / the raw session's rate)\n",
        );
    }
    if !r.hsm_latency.is_empty() {
        s.push_str(
            "
modelled network HSM (bound = sessions / (latency x HSM calls per operation); xN: N replicas)
",
        );
        s.push_str("latency ms  operation        conc  sessions      ops/s      bound  of bound   p50 ms   p99 ms  p99 target  errors
");
        for x in &r.hsm_latency {
            s.push_str(&format!(
                "{:>10} {:16} {:>5} {:>9} {:>10.0} {:>10.0} {:>8.0}% {:>8.2} {:>8.2} {:>11.2} {:>7}\n",
                x.latency_ms,
                match x.replicas {
                    Some(n) => format!("{} x{n}", x.level.operation),
                    None => x.level.operation.clone(),
                },
                x.level.concurrency,
                x.sessions,
                x.level.ops_per_sec,
                x.bound_ops_per_sec,
                x.ratio_to_bound * 100.0,
                x.level.p50_ms,
                x.level.p99_ms,
                x.p99_target_ms,
                x.level.errors,
            ));
        }
    }
    s
}

/// A chart of throughput and p99 latency against concurrency, one line per operation.
pub fn svg(r: &Report) -> String {
    let ops = ["Encrypt", "Encrypt (AWS)", "Decrypt", "GenerateDataKey"];
    let colors = ["#1f77b4", "#9467bd", "#d62728", "#2ca02c"];
    let single_key: Vec<&LevelResult> = r.service.iter().filter(|x| x.store_keys == 1).collect();
    let levels: Vec<usize> = {
        let mut l: Vec<usize> = single_key.iter().map(|x| x.concurrency).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let (w, h, m) = (900.0, 360.0, 60.0);
    let panel = (w - 3.0 * m) / 2.0;
    let xpos = |c: usize, left: f64| {
        let i = levels.iter().position(|&l| l == c).unwrap_or(0) as f64;
        left + i * panel / (levels.len().max(2) - 1) as f64
    };
    let max_tp = single_key.iter().map(|x| x.ops_per_sec).fold(1.0, f64::max) * 1.1;
    let max_p99 = single_key.iter().map(|x| x.p99_ms).fold(0.1, f64::max) * 1.1;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (p, (title, max, unit)) in [
        ("throughput", max_tp, "ops/s"),
        ("p99 latency", max_p99, "ms"),
    ]
    .iter()
    .enumerate()
    {
        let left = m + p as f64 * (panel + m);
        let (top, bottom) = (40.0, h - 50.0);
        s.push_str(&format!(
            "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{title} ({unit}) vs concurrency</text>\n\
             <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/>\n",
            left + panel / 2.0,
            left + panel
        ));
        for t in 0..=4 {
            let v = max * t as f64 / 4.0;
            let y = bottom - (bottom - top) * t as f64 / 4.0;
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                left - 4.0,
                y + 4.0,
                if *unit == "ms" {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            ));
        }
        for &c in &levels {
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{c}</text>\n",
                xpos(c, left),
                bottom + 16.0
            ));
        }
        for (op, color) in ops.iter().zip(colors) {
            let pts: Vec<String> = single_key
                .iter()
                .filter(|x| x.operation == *op)
                .map(|x| {
                    let v = if p == 0 { x.ops_per_sec } else { x.p99_ms };
                    format!(
                        "{:.1},{:.1}",
                        xpos(x.concurrency, left),
                        bottom - (bottom - top) * v / max
                    )
                })
                .collect();
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
                pts.join(" ")
            ));
        }
    }
    for (i, (op, color)) in ops.iter().zip(colors).enumerate() {
        let x = m + i as f64 * 160.0;
        s.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{op}</text>\n",
            h - 22.0,
            x + 16.0,
            h - 12.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// CreateKey, retried a few times after DependencyTimeoutException as AWS SDKs retry: on a
/// token holding thousands of objects SoftHSM2's C_GenerateKey slows down, and queued
/// creations can outlast the call deadline.
async fn create_key_retrying(
    mut c: Client,
    store: String,
    retried: Arc<AtomicUsize>,
) -> anyhow::Result<String> {
    let mut tries = 0u64;
    loop {
        let r = c
            .create_key(CreateKeyRequest {
                custom_key_store_id: Some(store.clone()),
                origin: Some("AWS_CLOUDHSM".into()),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                return Ok(r
                    .into_inner()
                    .key_metadata
                    .map(|m| m.key_id)
                    .unwrap_or_default())
            }
            Err(s) if s.code() == tonic::Code::Unavailable && tries < 3 => {
                tries += 1;
                retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}
