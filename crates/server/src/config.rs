//! Typed configuration: a TOML file, overridden by `HSM_KMS__SECTION__KEY` environment variables.
//!
//! Every setting and its default is documented in `deploy/hsm-kms.example.toml`; keep the two in
//! step. Unknown keys are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use model::ids::is_cluster_id;
use model::states::{ClusterState, HsmState};

pub const ENV_PREFIX: &str = "HSM_KMS";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub account: AccountSettings,
    #[serde(default)]
    pub storage: StorageSettings,
    /// PostgreSQL, shared by several replicas; unset: SQLite at storage.sqlite_path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSettings>,
    #[serde(default)]
    pub security: SecuritySettings,
    #[serde(default)]
    pub hsm: HsmSettings,
    #[serde(default)]
    pub lifecycle: LifecycleSettings,
    #[serde(default)]
    pub throttling: ThrottlingSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub kms: KmsSettings,
    /// Left out of a written file when it is the default, so that a file written by this
    /// version still loads in one without the XKS API (replicas side by side).
    #[serde(default, skip_serializing_if = "XksSettings::is_default")]
    pub xks: XksSettings,
    #[serde(default)]
    pub clusters: Vec<ClusterSettings>,
}

/// The external key store (XKS) proxy API (server.xks_listen): who may call it, and what
/// its health check says.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct XksSettings {
    /// The SigV4 credentials AWS KMS signs with, each for one URI path prefix; several per
    /// prefix so that they rotate without a restart (reloaded on SIGHUP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<XksCredential>,
    /// With mutual TLS: the subject common names a client certificate (signed by
    /// tls.client_ca_file) may have, e.g. "cks.kms.us-east-1.amazonaws.com"; any other
    /// certificate, or none, ends the handshake. Empty: no client certificate asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_subjects: Vec<String>,
    /// How long a health check's HSM call is reused (AWS KMS checks every few minutes, and
    /// waits 250 ms for an answer).
    #[serde(default = "default_xks_health_cache")]
    pub health_cache_seconds: u64,
    /// The ekmVendor the health check reports, e.g. "AWS CloudHSM".
    #[serde(default = "default_ekm_vendor")]
    pub ekm_vendor: String,
}

impl Default for XksSettings {
    fn default() -> XksSettings {
        XksSettings {
            credentials: Vec::new(),
            client_subjects: Vec::new(),
            health_cache_seconds: default_xks_health_cache(),
            ekm_vendor: default_ekm_vendor(),
        }
    }
}

impl XksSettings {
    pub fn is_default(&self) -> bool {
        let d = XksSettings::default();
        self.credentials.is_empty()
            && self.client_subjects.is_empty()
            && self.health_cache_seconds == d.health_cache_seconds
            && self.ekm_vendor == d.ekm_vendor
    }
}

fn default_xks_health_cache() -> u64 {
    10
}

fn default_ekm_vendor() -> String {
    "PKCS#11 HSM".into()
}

/// One XKS proxy credential: AWS KMS's external key store names the URI path prefix and
/// this access key; the access key's principal is who hsm-kms's key policies and grants
/// see calling.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct XksCredential {
    /// The path before `/kms/xks/v1`, without its leading slash ("" for none); letters,
    /// digits, `/`, `-` and `_`.
    #[serde(default)]
    pub uri_prefix: String,
    /// 20 to 30 characters, `A`-`Z` and `2`-`7`, as the XKS specification requires.
    pub access_key_id: String,
    /// A file holding the secret access key (43 to 64 characters of `A`-`Z`, `a`-`z`,
    /// `0`-`9`, `/`, `+`, `=`); keep it 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Or: the environment variable that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The principal ARN the credential stands for in key policies and grants.
    pub principal: String,
}

impl XksCredential {
    /// The credential as an access key, its secret read and its form checked against the
    /// XKS specification. Errors name the credential, never its secret.
    pub fn access_key(&self) -> anyhow::Result<(AccessKeySettings, zeroize::Zeroizing<String>)> {
        let id = &self.access_key_id;
        if !(20..=30).contains(&id.len())
            || !id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        {
            bail!("xks credential {id}: an access key id is 20 to 30 characters of A-Z and 2-7");
        }
        let prefix = &self.uri_prefix;
        if prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.len() > 116
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(&b))
        {
            bail!(
                "xks credential {id}: uri_prefix {prefix:?} must be letters, digits, /, - and _, \
                 without a leading or trailing slash, at most 116 characters"
            );
        }
        let key = AccessKeySettings {
            access_key_id: id.clone(),
            secret_file: self.secret_file.clone(),
            secret_env: self.secret_env.clone(),
            principal: self.principal.clone(),
        };
        let secret = key.secret()?;
        if !(43..=64).contains(&secret.len())
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/+=".contains(&b))
        {
            bail!(
                "xks credential {id}: a secret access key is 43 to 64 characters of A-Z, a-z, \
                 0-9, /, + and ="
            );
        }
        Ok((key, secret))
    }
}

/// What KMS operations take when a request leaves it out.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSettings {
    /// The custom key store (its name or id) where CreateKey puts a key when the request
    /// names none, as tools that know only AWS KMS do (terraform's aws_kms_key, SDK code).
    /// Unset: such a CreateKey is refused with UnsupportedOperationException.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_custom_key_store: Option<String>,
}

/// The gRPC listener's TLS: a server certificate and key, and the CA that signs client
/// certificates. Every client must present a certificate that CA signed and that is valid now.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM server certificate chain; unset = no TLS (then see auth.allow_plaintext_loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// Who callers are and what they may do outside key policies.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Serve plaintext gRPC without client certificates. Allowed only when server.listen is a
    /// loopback address; every caller is then `plaintext_principal`. For development only.
    #[serde(default)]
    pub allow_plaintext_loopback: bool,
    /// The principal of plaintext callers [default: the account root,
    /// arn:<partition>:iam::<account_id>:root].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext_principal: Option<String>,
    /// Principals of client certificates without an `arn:` URI SAN, by subject common name.
    #[serde(default)]
    pub certificate_principals: Vec<CertificatePrincipal>,
    /// Identity (IAM) policies, per principal, as in AWS: consulted when a key policy allows
    /// the principal's account, and alone for account-level operations.
    #[serde(default)]
    pub identity_policies: Vec<IdentityPolicy>,
    /// The access keys that sign requests to server.aws_listen (SigV4), each standing for a
    /// principal as a client certificate does over gRPC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_keys: Vec<AccessKeySettings>,
}

/// An access key: its id, where its secret is read from (never the config file itself),
/// and the principal whose requests it signs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeySettings {
    pub access_key_id: String,
    /// A file holding the secret access key (surrounding whitespace ignored); keep it 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Or: the environment variable that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    pub principal: String,
}

impl AccessKeySettings {
    /// The secret access key, from its file or environment variable. Errors name where it
    /// was looked for, never what was found.
    pub fn secret(&self) -> anyhow::Result<zeroize::Zeroizing<String>> {
        let id = &self.access_key_id;
        let raw = match (&self.secret_file, &self.secret_env) {
            (Some(file), None) => {
                zeroize::Zeroizing::new(std::fs::read_to_string(file).with_context(|| {
                    format!(
                        "reading the secret of access key {id} from {}",
                        file.display()
                    )
                })?)
            }
            (None, Some(var)) => zeroize::Zeroizing::new(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("access key {id}: the environment variable {var} is not set")
            })?),
            _ => bail!("access key {id}: set exactly one of secret_file and secret_env"),
        };
        let secret = zeroize::Zeroizing::new(raw.trim().to_string());
        if secret.is_empty() {
            bail!("access key {id}: the secret is empty");
        }
        Ok(secret)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePrincipal {
    pub common_name: String,
    pub principal: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityPolicy {
    pub principal: String,
    /// An IAM policy document (JSON): Statement with Effect, Action/NotAction,
    /// Resource/NotResource, Condition; no Principal.
    pub policy: String,
}

/// The audit trail: one hash-chained JSON line per request.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The append-only audit file; `hsm-kms audit verify FILE` checks its chain.
    #[serde(default = "default_audit_file")]
    pub file: PathBuf,
    /// Flush each batch of lines to disk (fdatasync) before answering its requests, so that
    /// an acknowledged request's line survives a power loss, not only a crash.
    #[serde(default)]
    pub fsync: bool,
    /// This replica's name [default: the host name]. Every audit line carries it, and the
    /// service records its chain head in the metadata database under it, so that
    /// `hsm-kms audit verify --config` sees lines cut off the end of the file. Replicas
    /// sharing a database need distinct names; a replica's name stays with its audit file.
    #[serde(default = "default_replica")]
    pub replica: String,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            file: default_audit_file(),
            fsync: false,
            replica: default_replica(),
        }
    }
}

fn default_replica() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hsm-kms".into())
}

fn default_audit_file() -> PathBuf {
    "/var/log/hsm-kms/audit.jsonl".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottlingSettings {
    /// Cryptographic requests per second each custom key store accepts (AWS: 1,800); a token
    /// bucket holding one second's worth. Over it: ThrottlingException. 0 turns the quota off.
    #[serde(default = "default_store_rate")]
    pub store_requests_per_second: u32,
}

impl Default for ThrottlingSettings {
    fn default() -> Self {
        ThrottlingSettings {
            store_requests_per_second: default_store_rate(),
        }
    }
}

fn default_store_rate() -> u32 {
    1800
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Whether the plain-HTTP admin listener (Prometheus metrics at /metrics) runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Its address. Keep it on loopback or a management network: it has no authentication.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            enabled: true,
            listen: default_admin_listen(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50052))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSettings {
    /// How often keys whose deletion date has passed are looked for and deleted.
    #[serde(default = "default_deletion_interval")]
    pub deletion_check_interval_seconds: u64,
    /// Shifts the service's clock (creation and deletion dates, the deletion task) by this many
    /// seconds. For tests of scheduled deletion only; leave at 0 in production.
    #[serde(default)]
    pub clock_offset_seconds: i64,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            deletion_check_interval_seconds: default_deletion_interval(),
            clock_offset_seconds: 0,
        }
    }
}

fn default_deletion_interval() -> u64 {
    60
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the gRPC service listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address the AWS KMS protocol (JSON over HTTP, SigV4) listens on; unset = not served.
    /// Callers sign with the keys in auth.access_keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_listen: Option<SocketAddr>,
    /// Address the external key store (XKS) proxy API listens on, for AWS KMS; unset = not
    /// served. HTTPS with the [tls] certificate (plain HTTP only on loopback with
    /// auth.allow_plaintext_loopback); AWS KMS signs with the keys in [xks].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xks_listen: Option<SocketAddr>,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish before the remaining
    /// connections are dropped (idle keep-alive clients would otherwise hold shutdown open).
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// On SIGINT/SIGTERM, how long to keep serving after /readyz turns 503, before the
    /// listeners close: the time a load balancer needs to notice and stop sending here.
    #[serde(default)]
    pub drain_seconds: u64,
    /// Threads of the async runtime (gRPC, request handling); unset: one per CPU. The HSM
    /// calls run on their own session threads, so a host whose cores are shared with a
    /// software token or a load generator can do with fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Open client connections at most; past it, new connections wait in the kernel's
    /// backlog. Clamped at start to what the process's file descriptor limit allows.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (requests) per connection, as advertised to clients.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// Requests being read or served at once, over all connections; more wait, unread.
    #[serde(default = "default_max_inflight")]
    pub max_inflight_requests: usize,
    /// A new connection must send its first bytes (and finish its TLS handshake) within
    /// this time; connections that have not yet are "pending".
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u64,
    /// Pending connections at most; past it, the oldest pending connection is closed to
    /// make room. A request message must also arrive whole within header_timeout_seconds.
    #[serde(default = "default_max_pending")]
    pub max_pending_connections: usize,
    /// A connection on which nothing is read or written for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: default_listen(),
            aws_listen: None,
            xks_listen: None,
            shutdown_grace_seconds: default_grace(),
            drain_seconds: 0,
            worker_threads: None,
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_streams(),
            max_inflight_requests: default_max_inflight(),
            header_timeout_seconds: default_header_timeout(),
            max_pending_connections: default_max_pending(),
            idle_timeout_seconds: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_streams() -> u32 {
    128
}

fn default_max_inflight() -> usize {
    512
}

fn default_header_timeout() -> u64 {
    10
}

fn default_max_pending() -> usize {
    256
}

fn default_idle_timeout() -> u64 {
    300
}

fn default_grace() -> u64 {
    10
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    #[serde(default = "default_partition")]
    pub partition: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_account_id")]
    pub account_id: String,
}

impl Default for AccountSettings {
    fn default() -> Self {
        AccountSettings {
            partition: default_partition(),
            region: default_region(),
            account_id: default_account_id(),
        }
    }
}

fn default_partition() -> String {
    "aws".into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_account_id() -> String {
    "111122223333".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// The SQLite metadata file (key and custom key store records; no key material).
    #[serde(default = "default_sqlite_path")]
    pub sqlite_path: PathBuf,
}

/// The shared metadata database of several replicas.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user@host:port/dbname`, or `host=... user=... dbname=...`.
    pub url: String,
    /// A file holding the database password (surrounding whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Or: the environment variable that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Connections this replica holds at most.
    #[serde(default = "default_database_pool")]
    pub pool_size: usize,
    /// Connect over TLS only, verifying the server's certificate against the CA
    /// certificates in this PEM file and the host name of `url` (a TCP host, not a Unix
    /// socket). Unset: no TLS; keep the database on a private network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

fn default_database_pool() -> usize {
    16
}

/// A URL may carry a password (`postgres://user:secret@host/db`): Debug shows neither the
/// URL nor anything in it, only where the password is read from.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &"<redacted>")
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("pool_size", &self.pool_size)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl DatabaseSettings {
    /// The password, from its file or environment variable, if one is configured.
    pub fn password(&self) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
        let raw = match (&self.password_file, &self.password_env) {
            (None, None) => return Ok(None),
            (Some(f), None) => std::fs::read_to_string(f)
                .with_context(|| format!("reading database.password_file {}", f.display()))?,
            (None, Some(v)) => std::env::var(v).map_err(|_| {
                anyhow::anyhow!("database.password_env: the variable {v} is not set")
            })?,
            _ => bail!("set at most one of database.password_file and database.password_env"),
        };
        let raw = zeroize::Zeroizing::new(raw);
        Ok(Some(zeroize::Zeroizing::new(raw.trim().to_string())))
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            sqlite_path: default_sqlite_path(),
        }
    }
}

fn default_sqlite_path() -> PathBuf {
    "/var/lib/hsm-kms/metadata.sqlite3".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// 32-byte key that seals kmsuser passwords at rest; created (mode 0600) if missing.
    /// `HSM_KMS_SEALING_KEY` (64 hex digits) takes precedence when set.
    #[serde(default = "default_sealing_key_file")]
    pub sealing_key_file: PathBuf,
    /// As AWS does: on each successful connect, replace the kmsuser password with a random
    /// one that only this service knows (stored sealed before the old one is given up).
    /// `hsm-kms dev` turns it off so that its token stays usable with the printed PIN.
    #[serde(default = "default_true")]
    pub rotate_kmsuser_password: bool,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            sealing_key_file: default_sealing_key_file(),
            rotate_kmsuser_password: true,
        }
    }
}

fn default_sealing_key_file() -> PathBuf {
    "/var/lib/hsm-kms/sealing.key".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSettings {
    /// When set, exported as SOFTHSM2_CONF before any PKCS#11 module is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softhsm2_conf: Option<PathBuf>,
    /// Most PKCS#11 sessions open per connected custom key store (the anchor session aside).
    #[serde(default = "default_pool_size")]
    pub session_pool_size: usize,
    /// Deadline of one HSM operation, queueing included. Past it the caller gets
    /// DependencyTimeoutException; a call still running in the HSM keeps its session.
    #[serde(default = "default_call_timeout")]
    pub call_timeout_ms: u64,
    /// Deadline of finding the token and logging in (ConnectCustomKeyStore, reconnects).
    #[serde(default = "default_login_timeout")]
    pub login_timeout_ms: u64,
    /// After a device error the store reconnects by itself, waiting this long before the first
    /// attempt and doubling the wait after each failure, up to `reconnect_max_backoff_ms`.
    #[serde(default = "default_backoff")]
    pub reconnect_initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub reconnect_max_backoff_ms: u64,
}

impl Default for HsmSettings {
    fn default() -> Self {
        HsmSettings {
            softhsm2_conf: None,
            session_pool_size: default_pool_size(),
            call_timeout_ms: default_call_timeout(),
            login_timeout_ms: default_login_timeout(),
            reconnect_initial_backoff_ms: default_backoff(),
            reconnect_max_backoff_ms: default_max_backoff(),
        }
    }
}

fn default_pool_size() -> usize {
    16
}
fn default_call_timeout() -> u64 {
    5_000
}
fn default_login_timeout() -> u64 {
    30_000
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    30_000
}

/// Who picks the AES-GCM IV.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum GcmIvMode {
    /// hsm-kms draws a fresh random IV and passes it in (SoftHSM2 and most HSMs).
    #[default]
    #[serde(rename = "service")]
    Service,
    /// hsm-kms passes zeros and the HSM writes its IV back (AWS CloudHSM refuses caller IVs).
    #[serde(rename = "hsm")]
    Hsm,
}

/// How the kmsuser password becomes the PKCS#11 PIN.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum PinFormat {
    /// The password alone (SoftHSM2 and most HSMs).
    #[default]
    #[serde(rename = "password")]
    Password,
    /// `<crypto user>:<password>` (AWS CloudHSM's PKCS#11 library).
    #[serde(rename = "user:password")]
    UserPassword,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// AWS-style cluster id, `cluster-[2-7a-zA-Z]{11,16}`.
    pub id: String,
    /// Path of the PKCS#11 module that reaches the cluster.
    pub module: PathBuf,
    /// Label of the token that presents the cluster.
    pub token_label: String,
    /// PEM file of the cluster's trust anchor certificate.
    pub trust_anchor_file: PathBuf,
    /// AWS cluster state; only ACTIVE clusters can back a new or updated key store.
    #[serde(default)]
    pub state: ClusterState,
    /// Clusters with the same lineage share backup history (AWS: "related" clusters) and
    /// may replace each other in UpdateCustomKeyStore. Defaults to the cluster id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    #[serde(default)]
    pub pin_format: PinFormat,
    #[serde(default)]
    pub gcm_iv: GcmIvMode,
    /// The crypto user hsm-kms logs in as.
    #[serde(default = "default_crypto_user")]
    pub crypto_user: String,
    #[serde(default)]
    pub hsms: Vec<HsmEntry>,
}

impl ClusterSettings {
    pub fn lineage(&self) -> &str {
        self.lineage.as_deref().unwrap_or(&self.id)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HsmEntry {
    pub id: String,
    pub availability_zone: String,
    /// AWS HSM state; only ACTIVE HSMs count.
    #[serde(default)]
    pub state: HsmState,
}

fn default_crypto_user() -> String {
    "kmsuser".into()
}

impl Settings {
    /// Reads the file, applies environment overrides and checks the result.
    pub fn load(path: &Path) -> anyhow::Result<Settings> {
        let settings = Settings::read(path)?;
        settings.check()?;
        Ok(settings)
    }

    /// Reads the file and applies environment overrides, without `check` (for callers that
    /// adjust the settings first, as dev mode does).
    pub fn read(path: &Path) -> anyhow::Result<Settings> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .with_context(|| format!("reading config {}", path.display()))?
            .try_deserialize()
            .with_context(|| format!("parsing config {}", path.display()))?;
        Ok(settings)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.lifecycle.deletion_check_interval_seconds == 0 {
            bail!("lifecycle.deletion_check_interval_seconds must be at least 1");
        }
        if self.server.worker_threads == Some(0) {
            bail!("server.worker_threads must be at least 1 (or unset: one per CPU)");
        }
        if self.hsm.session_pool_size == 0 {
            bail!("hsm.session_pool_size must be at least 1");
        }
        if self.hsm.call_timeout_ms == 0 || self.hsm.login_timeout_ms == 0 {
            bail!("hsm.call_timeout_ms and hsm.login_timeout_ms must be at least 1");
        }
        if self.hsm.reconnect_initial_backoff_ms == 0
            || self.hsm.reconnect_max_backoff_ms < self.hsm.reconnect_initial_backoff_ms
        {
            bail!("hsm.reconnect_initial_backoff_ms must be at least 1 and at most hsm.reconnect_max_backoff_ms");
        }
        if self.account.account_id.len() != 12
            || !self.account.account_id.bytes().all(|b| b.is_ascii_digit())
        {
            bail!("account.account_id must be 12 digits");
        }
        let replica = &self.audit.replica;
        if replica.is_empty()
            || replica.len() > 128
            || !replica.bytes().all(|b| b.is_ascii_graphic())
        {
            bail!("audit.replica must be 1 to 128 printable ASCII characters, without spaces");
        }
        let tls = &self.tls;
        match (&tls.cert_file, &tls.key_file, &tls.client_ca_file) {
            (Some(_), Some(_), Some(_)) | (None, None, None) => {}
            _ => bail!("tls.cert_file, tls.key_file and tls.client_ca_file go together"),
        }
        if !tls.enabled() {
            if !self.auth.allow_plaintext_loopback {
                bail!(
                    "no TLS configured: set tls.cert_file, tls.key_file and tls.client_ca_file \
                     (or, for development on a loopback address, auth.allow_plaintext_loopback)"
                );
            }
            if !self.server.listen.ip().is_loopback() {
                bail!(
                    "plaintext gRPC is allowed only on a loopback address, not {}",
                    self.server.listen
                );
            }
            if let Some(aws) = self.server.aws_listen.filter(|a| !a.ip().is_loopback()) {
                bail!("plaintext HTTP is allowed only on a loopback address, not {aws}");
            }
            if let Some(xks) = self.server.xks_listen.filter(|a| !a.ip().is_loopback()) {
                bail!("plaintext HTTP is allowed only on a loopback address, not {xks}");
            }
            if !self.xks.client_subjects.is_empty() {
                bail!("xks.client_subjects (mutual TLS) needs [tls]");
            }
        }
        if self.server.xks_listen.is_some() {
            for c in &self.xks.credentials {
                c.access_key()?;
            }
        }
        let mut ids = std::collections::HashSet::new();
        for k in &self.auth.access_keys {
            if k.access_key_id.len() < 16
                || k.access_key_id.len() > 128
                || !k.access_key_id.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                bail!(
                    "auth.access_keys: {} is not an access key id (16 to 128 letters and digits)",
                    k.access_key_id
                );
            }
            if !ids.insert(k.access_key_id.as_str()) {
                bail!("auth.access_keys: {} is configured twice", k.access_key_id);
            }
        }
        if self.server.aws_listen.is_some() && self.auth.access_keys.is_empty() {
            bail!("server.aws_listen is set but auth.access_keys is empty: nobody could sign a request");
        }
        let principals = self
            .auth
            .plaintext_principal
            .iter()
            .chain(
                self.auth
                    .certificate_principals
                    .iter()
                    .map(|c| &c.principal),
            )
            .chain(self.auth.access_keys.iter().map(|k| &k.principal));
        for p in principals {
            if model::principal::Principal::parse(p).is_none() {
                bail!(
                    "{p} is not an IAM principal ARN such as arn:aws:iam::111122223333:user/alice"
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.clusters {
            if !is_cluster_id(&c.id) {
                bail!(
                    "cluster id {} is not of the form cluster-[2-7a-zA-Z]{{11,16}}",
                    c.id
                );
            }
            if !seen.insert(c.id.as_str()) {
                bail!("cluster {} is configured twice", c.id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `toml::to_string` writes (dev mode's and the bench's generated configs) must load
    /// back as the same settings: an omitted key must never turn into another default.
    #[test]
    fn settings_survive_a_round_trip_through_toml() {
        let mut s: Settings = toml::from_str("").unwrap();
        s.admin.enabled = false;
        s.throttling.store_requests_per_second = 0;
        s.hsm.softhsm2_conf = None;
        s.server.worker_threads = Some(3);
        s.clusters.push(ClusterSettings {
            id: "cluster-roundtripabc".into(),
            module: "/m.so".into(),
            token_label: "t".into(),
            trust_anchor_file: "/a.pem".into(),
            state: Default::default(),
            lineage: None,
            pin_format: PinFormat::UserPassword,
            gcm_iv: GcmIvMode::Hsm,
            crypto_user: "kmsuser".into(),
            hsms: vec![],
        });
        let back: Settings = toml::from_str(&toml::to_string_pretty(&s).unwrap()).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
    }

    #[test]
    fn a_database_url_stays_out_of_debug_output() {
        let s: Settings =
            toml::from_str("[database]\nurl = \"postgres://kms:hunter2-secret@db.internal/kms\"\n")
                .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("DatabaseSettings"), "{shown}");
    }

    #[test]
    fn zero_worker_threads_is_refused() {
        let s: Settings = toml::from_str("[server]\nworker_threads = 0\n").unwrap();
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("server.worker_threads"), "{e}");
        let s: Settings = toml::from_str("[server]\nworker_threads = 1\n").unwrap();
        assert_eq!(s.server.worker_threads, Some(1));
    }
}
