//! The domain: custom key stores, keys, key states and the cryptographic operations.
//!
//! No tonic, no SQL and no PKCS#11 return code appears here: the `api` layer hands in plain
//! values, `store` and `hsm` hand back their outcomes already translated.

pub mod access;
pub mod aliases;
pub mod ciphertext;
pub mod crypto;
pub mod deletion;
pub mod error;
pub mod grants;
pub mod ids;
pub mod keys;
pub mod keystores;
pub mod op;
pub mod policy;
pub mod sealing;
pub mod throttle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::config::{ClusterSettings, HsmSettings, Settings};
use crate::hsm::{Connection, Modules};
use crate::store::Store;
use error::{KmsError, KmsResult};
use ids::ArnScope;
use sealing::Sealer;
use throttle::Quota;

/// Connection states of a custom key store, as AWS spells them.
pub mod conn_state {
    pub const CONNECTED: &str = "CONNECTED";
    pub const CONNECTING: &str = "CONNECTING";
    pub const DISCONNECTED: &str = "DISCONNECTED";
    pub const DISCONNECTING: &str = "DISCONNECTING";
    pub const FAILED: &str = "FAILED";
}

/// A configured cluster: its settings and its trust anchor, read once at start.
pub struct Cluster {
    pub settings: ClusterSettings,
    /// The trust anchor certificate in DER, for comparison with what callers present.
    pub trust_anchor_der: Vec<u8>,
    pub trust_anchor_pem: String,
}

impl Cluster {
    pub fn active_hsms(&self) -> usize {
        self.settings
            .hsms
            .iter()
            .filter(|h| h.state == "ACTIVE")
            .count()
    }

    /// AWS asks for at least two active HSMs in different availability zones.
    pub fn has_two_zones(&self) -> bool {
        let zones: std::collections::HashSet<&str> = self
            .settings
            .hsms
            .iter()
            .filter(|h| h.state == "ACTIVE")
            .map(|h| h.availability_zone.as_str())
            .collect();
        zones.len() >= 2
    }

    pub fn is_active(&self) -> bool {
        self.settings.state == "ACTIVE"
    }
}

pub struct Kms {
    pub scope: ArnScope,
    /// The configured clusters; replaced as a whole when the configuration is reloaded.
    clusters: RwLock<Arc<HashMap<String, Arc<Cluster>>>>,
    store: Store,
    sealer: Sealer,
    modules: Arc<Modules>,
    hsm: HsmSettings,
    /// Added to the system clock (tests of scheduled deletion).
    clock_offset_ms: i64,
    /// Live HSM connections of the stores that are CONNECTED.
    connections: RwLock<HashMap<String, Arc<Connection>>>,
    /// Serialises lifecycle changes (connect, disconnect, update, delete, key creation,
    /// reconnection) of one store: writers change the store, readers need it as it is.
    lifecycle: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Cryptographic requests per second per store; 0 = no quota.
    store_rate: u32,
    quotas: RwLock<HashMap<String, Arc<Quota>>>,
    /// The gRPC health service, told each store's state (service name = store id).
    health: OnceLock<tonic_health::server::HealthReporter>,
    /// Identity (IAM) policies by principal; replaced on configuration reload.
    identities: RwLock<Arc<access::Identities>>,
    /// Compiled key policies, and the default one that keys without a stored policy have.
    policies: access::PolicyCache,
    default_policy: Arc<access::Policy>,
    /// Whether ConnectCustomKeyStore replaces the kmsuser password with its own.
    rotate_password: bool,
}

/// Reads the clusters' trust anchors and builds the cluster table.
fn load_clusters(settings: &[ClusterSettings]) -> anyhow::Result<HashMap<String, Arc<Cluster>>> {
    let mut clusters = HashMap::new();
    for c in settings {
        let pem_text = std::fs::read_to_string(&c.trust_anchor_file).with_context(|| {
            format!(
                "reading trust anchor {} of {}",
                c.trust_anchor_file.display(),
                c.id
            )
        })?;
        let der = pem_der(&pem_text).with_context(|| {
            format!(
                "trust anchor {} of {} is not a PEM certificate",
                c.trust_anchor_file.display(),
                c.id
            )
        })?;
        clusters.insert(
            c.id.clone(),
            Arc::new(Cluster {
                settings: c.clone(),
                trust_anchor_der: der,
                trust_anchor_pem: pem_text,
            }),
        );
    }
    Ok(clusters)
}

impl Kms {
    pub fn new(settings: &Settings) -> anyhow::Result<Arc<Kms>> {
        let clusters = load_clusters(&settings.clusters)?;
        let store = Store::open(&settings.storage.sqlite_path).with_context(|| {
            format!(
                "opening metadata store {}",
                settings.storage.sqlite_path.display()
            )
        })?;
        let sealer = Sealer::load(&settings.security.sealing_key_file)?;
        let identities = access::Identities::load(&settings.auth.identity_policies)?;
        let default_policy = access::Policy::compile(&policy::default_policy(
            &settings.account.partition,
            &settings.account.account_id,
        ))
        .map_err(|e| anyhow::anyhow!("the default key policy: {}", e.message))?;
        Ok(Arc::new(Kms {
            scope: ArnScope {
                partition: settings.account.partition.clone(),
                region: settings.account.region.clone(),
                account_id: settings.account.account_id.clone(),
            },
            clusters: RwLock::new(Arc::new(clusters)),
            store,
            sealer,
            modules: Arc::new(Modules::default()),
            hsm: settings.hsm.clone(),
            clock_offset_ms: settings.lifecycle.clock_offset_seconds.saturating_mul(1000),
            connections: RwLock::new(HashMap::new()),
            lifecycle: Mutex::new(HashMap::new()),
            store_rate: settings.throttling.store_requests_per_second,
            quotas: RwLock::new(HashMap::new()),
            health: OnceLock::new(),
            identities: RwLock::new(Arc::new(identities)),
            policies: access::PolicyCache::default(),
            default_policy: Arc::new(default_policy),
            rotate_password: settings.security.rotate_kmsuser_password,
        }))
    }

    /// Applies a reloaded configuration's clusters (HSM inventory, cluster states, trust
    /// anchors, IV mode...). Live connections stay; module, token and PIN changes apply at the
    /// next connection. On error nothing changes.
    pub fn reload_clusters(&self, settings: &[ClusterSettings]) -> anyhow::Result<()> {
        let clusters = load_clusters(settings)?;
        *self.clusters.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(clusters);
        for c in settings {
            let active = c.hsms.iter().filter(|h| h.state == "ACTIVE").count();
            tracing::info!(cluster = %c.id, state = %c.state, active_hsms = active, hsms = c.hsms.len(), "cluster inventory loaded");
        }
        Ok(())
    }

    /// Applies a reloaded configuration: clusters and identity policies, both or neither.
    pub fn reload(&self, settings: &Settings) -> anyhow::Result<()> {
        let identities = access::Identities::load(&settings.auth.identity_policies)?;
        self.reload_clusters(&settings.clusters)?;
        self.set_identities(identities);
        Ok(())
    }

    /// Hands the health service's reporter over; store states are reported from then on.
    pub async fn attach_health(&self, reporter: tonic_health::server::HealthReporter) {
        let _ = self.health.set(reporter);
        for rec in self.all_stores() {
            let serving = rec.connection_state == conn_state::CONNECTED
                && self.connection(&rec.id).is_some_and(|c| !c.is_degraded());
            self.report(&rec.id, serving).await;
        }
    }

    /// Every store record, page by page (a read error ends the list early, logged).
    fn all_stores(&self) -> Vec<crate::store::StoreRecord> {
        let mut out = Vec::new();
        loop {
            let after = out.last().map(|r: &crate::store::StoreRecord| r.id.clone());
            match self.store.list_stores(after.as_deref(), 100) {
                Ok(page) if page.is_empty() => return out,
                Ok(page) => out.extend(page),
                Err(e) => {
                    tracing::error!(error = %e, "listing custom key stores failed");
                    return out;
                }
            }
        }
    }

    /// Tells the health service whether a store serves.
    async fn report(&self, store_id: &str, serving: bool) {
        if let Some(h) = self.health.get() {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            h.set_service_status(store_id, status).await;
        }
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.hsm.call_timeout_ms)
    }

    /// The service's clock, in Unix milliseconds.
    pub fn now(&self) -> i64 {
        now_ms().saturating_add(self.clock_offset_ms)
    }

    fn cluster(&self, id: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn connection(&self, store_id: &str) -> Option<Arc<Connection>> {
        self.connections
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(store_id)
            .cloned()
    }

    fn lifecycle_lock(&self, store_id: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(store_id.to_string())
            .or_default()
            .clone()
    }

    /// Closes every HSM connection (sessions closed, tokens logged out) without changing the
    /// stores' recorded states, so they reconnect on the next start.
    pub async fn shutdown(&self) {
        let conns: Vec<(String, Arc<Connection>)> = self
            .connections
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (id, conn) in conns {
            conn.close(self.call_timeout()).await;
            tracing::info!(custom_key_store_id = %id, "closed HSM connection");
        }
    }
}

/// The DER of the first certificate in a PEM text.
pub fn pem_der(text: &str) -> Option<Vec<u8>> {
    pem::parse_many(text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Pagination markers are opaque to callers: the hex of the last item's sort key.
pub fn encode_marker(last: &str) -> String {
    hex::encode(last)
}

pub fn decode_marker(marker: &str) -> KmsResult<String> {
    hex::decode(marker)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            KmsError::new(
                error::ErrorKind::InvalidMarker,
                "The marker is not one this service issued",
            )
        })
}

/// Page size: AWS's `Limit` bounds with a default.
pub fn page_limit(limit: Option<i32>, max: i32, default: i32) -> KmsResult<usize> {
    match limit {
        None => Ok(default as usize),
        Some(l) if (1..=max).contains(&l) => Ok(l as usize),
        Some(l) => Err(KmsError::validation(format!(
            "Limit must be between 1 and {max}, got {l}"
        ))),
    }
}

impl Kms {
    /// The process's PKCS#11 context for a module (for `dev` set-up and tools).
    pub fn module(&self, path: &std::path::Path) -> Result<cryptoki::context::Pkcs11, String> {
        self.modules.get(path)
    }

    /// The recorded connection state of a store.
    pub fn store_state(&self, id: &str) -> KmsResult<String> {
        Ok(self.get_store(id)?.connection_state)
    }

    /// Every store's state and session pool, for the metrics.
    pub fn store_snapshots(&self) -> Vec<crate::metrics::StoreSnapshot> {
        use conn_state::*;
        self.all_stores()
            .into_iter()
            .map(|rec| {
                let conn = self.connection(&rec.id);
                let state = match rec.connection_state.as_str() {
                    CONNECTED if conn.as_ref().is_some_and(|c| c.is_degraded()) => "DEGRADED",
                    CONNECTED => CONNECTED,
                    CONNECTING => CONNECTING,
                    DISCONNECTING => DISCONNECTING,
                    FAILED => FAILED,
                    _ => DISCONNECTED,
                };
                crate::metrics::StoreSnapshot {
                    id: rec.id,
                    state,
                    pool: conn.map(|c| c.pool()),
                }
            })
            .collect()
    }

    /// Takes one request from the store's quota, or answers ThrottlingException.
    pub(super) fn admit(&self, store_id: &str) -> KmsResult<()> {
        if self.store_rate == 0 {
            return Ok(());
        }
        let quota = self
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(store_id)
            .cloned();
        let quota = match quota {
            Some(q) => q,
            None => self
                .quotas
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(store_id.to_string())
                .or_insert_with(|| Arc::new(Quota::per_second(self.store_rate)))
                .clone(),
        };
        if quota.try_take() {
            Ok(())
        } else {
            crate::metrics::get().throttled(store_id);
            Err(KmsError::new(
                error::ErrorKind::Throttling,
                format!(
                    "Custom key store {store_id} is over its quota of {} cryptographic requests \
                     per second; retry with back-off",
                    self.store_rate
                ),
            ))
        }
    }
}
