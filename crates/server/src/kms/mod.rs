//! The domain: custom key stores, keys, key states and the cryptographic operations.
//!
//! No tonic, no SQL and no PKCS#11 type appears here: the transport hands in plain values,
//! the metadata seam (`crate::metadata`) and `crate::hsm` hand back their outcomes already
//! typed. `Kms` is composed of parts with one job each, built by the caller (`Parts`) and
//! handed in, so that the domain runs on an in-memory database in unit tests.

pub mod access;
pub mod aliases;
pub mod ciphertext;
pub mod clusters;
pub mod connections;
pub mod crypto;
pub mod deletion;
pub mod fields;
pub mod gate;
pub mod grants;
pub mod keys;
pub mod keystores;
pub mod operators;
pub mod sealing;
pub mod throttle;
pub mod usage;
pub mod xks;

use std::sync::Arc;

use crate::config::Settings;
use crate::hsm::Modules;
use crate::metadata::{KeyStoreRecord, Metadata};
use access::Access;
use clusters::Clusters;
use connections::Connections;
use model::error::{KmsError, KmsResult};
use model::ids::ArnScope;
use model::now_ms;
use model::states::ConnectionState;
use sealing::Sealer;
use throttle::Quotas;

/// What a `Kms` is made of.
pub struct Parts {
    pub scope: ArnScope,
    /// The configured clusters (settings and trust anchors).
    pub clusters: Clusters,
    /// Everything remembered besides key material.
    pub metadata: Arc<dyn Metadata>,
    /// Seals kmsuser passwords at rest.
    pub sealer: Sealer,
    /// Live HSM connections, logins, lifecycle locks and store health.
    pub connections: Connections,
    /// Identity policies and key policies.
    pub access: Access,
    /// Cryptographic requests per second per store.
    pub quotas: Quotas,
    /// Added to the system clock (tests of scheduled deletion).
    pub clock_offset_ms: i64,
    /// The custom key store (name or id) of keys created without one named.
    pub default_keystore: Option<String>,
    /// This replica's audit trail file (ListKeyAuditEvents reads its newest lines).
    pub audit_file: Option<std::path::PathBuf>,
}

impl Parts {
    /// The parts a configuration describes: reads the trust anchors and the sealing key,
    /// opens the SQLite metadata database. `modules` are the process's PKCS#11 modules.
    pub async fn from_settings(
        settings: &Settings,
        modules: Arc<Modules>,
    ) -> anyhow::Result<Parts> {
        let scope = ArnScope {
            partition: settings.account.partition.clone(),
            region: settings.account.region.clone(),
            account_id: settings.account.account_id.clone(),
        };
        let metadata = crate::metadata::open(settings).await?;
        let identities = crate::iam::Identities::load(&settings.auth.identity_policies)?;
        let access = Access::new(&scope, identities)
            .map_err(|e| anyhow::anyhow!("the default key policy: {}", e.message))?;
        // Replicas share the passwords sealed with the key: never make one up there.
        let sealer = Sealer::load(
            &settings.security.sealing_key_file,
            settings.database.is_none(),
        )?;
        // Replicas must agree on the key: a replica with another key would fail every
        // store's login, so it refuses to start instead. (One node keeps its old way: a
        // lost key is mended with UpdateCustomKeyStore, which needs a running service.)
        if settings.database.is_some() {
            let candidate = sealer
                .check_value()
                .map_err(|e| anyhow::anyhow!("sealing the check value: {}", e.message))?;
            let recorded = metadata
                .sealing_check(&candidate)
                .await
                .map_err(|e| anyhow::anyhow!("reading the sealing check value: {e}"))?;
            if !sealer.matches(&recorded) {
                anyhow::bail!(
                    "the sealing key ({} or {}) is not the key this metadata database's \
                     kmsuser passwords are sealed with; every replica needs a copy of the \
                     same key",
                    settings.security.sealing_key_file.display(),
                    sealing::SEALING_KEY_ENV
                );
            }
        }
        Ok(Parts {
            clusters: Clusters::load(&settings.clusters)?,
            metadata,
            sealer,
            connections: Connections::new(
                modules,
                settings.hsm.clone(),
                settings.security.rotate_kmsuser_password,
            ),
            access,
            quotas: Quotas::per_second(settings.throttling.store_requests_per_second),
            clock_offset_ms: settings.lifecycle.clock_offset_seconds.saturating_mul(1000),
            default_keystore: settings.kms.default_custom_key_store.clone(),
            audit_file: Some(settings.audit.file.clone()),
            scope,
        })
    }
}

pub struct Kms {
    pub scope: ArnScope,
    clusters: Clusters,
    meta: Arc<dyn Metadata>,
    sealer: Sealer,
    connections: Connections,
    access: Access,
    quotas: Quotas,
    clock_offset_ms: i64,
    default_keystore: Option<String>,
    /// This value itself, for work that outlives a request (a login's recovery).
    me: std::sync::Weak<Kms>,
    /// This process among the replicas: the owner of the deletion claims it takes.
    replica: String,
    /// The database's clock minus this host's, in milliseconds (`measure_database_clock`).
    database_offset_ms: std::sync::atomic::AtomicI64,
    /// Key uses noted and not yet written (GetKeyLastUsage).
    usage: usage::Tracker,
    audit_file: Option<std::path::PathBuf>,
    /// When this replica started (its store health counts start then).
    started_ms: i64,
    /// The XKS health check's last answer, reused for a while (`xks::Kms::xks_health`).
    xks_health: tokio::sync::Mutex<Option<(std::time::Instant, xks::Health)>>,
}

impl Kms {
    pub fn new(parts: Parts) -> Arc<Kms> {
        let Parts {
            scope,
            clusters,
            metadata,
            sealer,
            connections,
            access,
            quotas,
            clock_offset_ms,
            default_keystore,
            audit_file,
        } = parts;
        Arc::new_cyclic(|me| Kms {
            scope,
            clusters,
            meta: metadata,
            sealer,
            connections,
            access,
            quotas,
            clock_offset_ms,
            default_keystore,
            me: me.clone(),
            replica: uuid::Uuid::new_v4().to_string(),
            database_offset_ms: std::sync::atomic::AtomicI64::new(0),
            usage: usage::Tracker::default(),
            audit_file,
            started_ms: now_ms(),
            xks_health: Default::default(),
        })
    }

    /// Applies a reloaded configuration: clusters and identity policies, both or neither.
    /// Live connections stay; module, token and PIN changes apply at the next connection.
    pub fn reload(&self, settings: &Settings) -> anyhow::Result<()> {
        let identities = crate::iam::Identities::load(&settings.auth.identity_policies)?;
        self.clusters
            .replace_with(Clusters::load(&settings.clusters)?);
        self.access.set_identities(identities);
        for c in &settings.clusters {
            let active = c
                .hsms
                .iter()
                .filter(|h| h.state == model::states::HsmState::Active)
                .count();
            tracing::info!(cluster = %c.id, state = ?c.state, active_hsms = active, hsms = c.hsms.len(), "cluster inventory loaded");
        }
        Ok(())
    }

    /// Each store's health as it changes: SERVING while CONNECTED and its HSM answers.
    /// Every store has an entry once `publish_health` ran.
    pub fn health(&self) -> tokio::sync::watch::Receiver<connections::Health> {
        self.connections.health()
    }

    /// Publishes every store's current health.
    pub async fn publish_health(&self) {
        for rec in self.all_keystores().await {
            let serving = rec.connection_state == ConnectionState::Connected
                && self.connection(&rec.id).is_some_and(|c| !c.is_degraded());
            self.connections.report(&rec.id, serving);
        }
    }

    /// Whether this replica can serve: the metadata database answers, its change listener
    /// works (with PostgreSQL), and every store that is CONNECTED for the service has a
    /// working HSM login here. The reason when not.
    /// How long a change that takes access away waits before it is answered, so that every
    /// live replica has it in force (`Metadata::revocation_fence`).
    pub fn revocation_fence(&self) -> std::time::Duration {
        self.meta.revocation_fence()
    }

    pub async fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.meta.cache_bypassed() {
            return Err(why.to_string());
        }
        let mut after: Option<String> = None;
        loop {
            let page = self
                .meta
                .list_keystores(after.as_deref(), 100)
                .await
                .map_err(|e| format!("the metadata database does not answer: {e}"))?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some(last.id.clone());
            for rec in page {
                let conn = self.connection(&rec.id);
                if let Some(why) = conn.as_ref().and_then(|c| c.lookup_trouble()) {
                    return Err(format!("custom key store {}: {why}", rec.id));
                }
                let working = conn.is_some_and(|c| !c.is_degraded());
                if rec.connection_state == ConnectionState::Connected && !working {
                    return Err(format!(
                        "custom key store {} is CONNECTED, and this replica has no working HSM \
                         login to it yet",
                        rec.id
                    ));
                }
            }
        }
    }

    /// Every key store record, page by page (a read error ends the list early, logged).
    async fn all_keystores(&self) -> Vec<KeyStoreRecord> {
        let mut out = Vec::new();
        loop {
            let after = out.last().map(|r: &KeyStoreRecord| r.id.clone());
            match self.meta.list_keystores(after.as_deref(), 100).await {
                Ok(page) if page.is_empty() => return out,
                Ok(page) => out.extend(page),
                Err(e) => {
                    tracing::error!(error = %e, "listing custom key stores failed");
                    return out;
                }
            }
        }
    }

    /// Tells whoever watches the health whether a store serves.
    fn report(&self, store_id: &str, serving: bool) {
        self.connections.report(store_id, serving);
    }

    /// The service's clock, in Unix milliseconds.
    /// The service's time: the metadata database's clock (as last measured against this
    /// host's), shifted by `lifecycle.clock_offset_seconds`. Replicas agree on it, so due
    /// dates and leases do not depend on which replica reads them.
    pub fn now(&self) -> i64 {
        now_ms()
            .saturating_add(
                self.database_offset_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .saturating_add(self.clock_offset_ms)
    }

    /// Measures the database's clock against this host's (half a round trip of error).
    pub async fn measure_database_clock(&self) {
        let before = now_ms();
        match self.meta.clock_ms().await {
            Ok(db) => {
                let after = now_ms();
                let offset = db - (before + after) / 2;
                self.database_offset_ms
                    .store(offset, std::sync::atomic::Ordering::Relaxed);
                if offset.abs() > 1_000 {
                    tracing::warn!(
                        offset_ms = offset,
                        "this host's clock is off the database's; the service keeps the database's"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the database's clock failed"),
        }
    }

    fn cluster(&self, id: &str) -> Option<Arc<clusters::Cluster>> {
        self.clusters.get(id)
    }

    fn connection(&self, store_id: &str) -> Option<Arc<crate::hsm::Connection>> {
        self.connections.get(store_id)
    }

    /// This replica's connection to a store, logging in first if the store is CONNECTED
    /// for the service but this replica has no connection yet (see `attach`).
    async fn connection_or_attach(&self, store_id: &str) -> Option<Arc<crate::hsm::Connection>> {
        if let Some(c) = self.connection(store_id) {
            return Some(c);
        }
        self.me.upgrade()?.attach(store_id).await
    }

    fn lifecycle_lock(&self, store_id: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.connections.lifecycle_lock(store_id)
    }

    /// Closes every HSM connection (sessions closed, tokens logged out) without changing the
    /// stores' recorded states, so they reconnect on the next start.
    pub async fn shutdown(&self) {
        // What was used since the last write is recorded before this replica leaves.
        self.flush_key_usage().await;
        // The other replicas take this one's quota share at their next heartbeat.
        if let Err(e) = self.meta.leave(&self.replica).await {
            tracing::warn!(error = %e, "removing this replica's heartbeat failed");
        }
        self.connections.close_all().await;
    }

    /// The recorded connection state of a key store.
    pub async fn keystore_state(&self, id: &str) -> KmsResult<ConnectionState> {
        Ok(self.keystore(id).await?.connection_state)
    }

    /// A store's state as this replica sees it (its recorded connection state, or DEGRADED
    /// when it is CONNECTED and this replica's connection to its HSM failed), and that
    /// connection.
    fn store_state(
        &self,
        rec: &KeyStoreRecord,
    ) -> (&'static str, Option<Arc<crate::hsm::Connection>>) {
        let conn = self.connection(&rec.id);
        let state = match rec.connection_state {
            ConnectionState::Connected if conn.as_ref().is_some_and(|c| c.is_degraded()) => {
                "DEGRADED"
            }
            s => s.as_str(),
        };
        (state, conn)
    }

    /// Every key store's state and session pool, for the metrics.
    pub async fn keystore_snapshots(&self) -> Vec<crate::metrics::StoreSnapshot> {
        self.all_keystores()
            .await
            .into_iter()
            .map(|rec| {
                let (state, conn) = self.store_state(&rec);
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
        self.quotas.admit(store_id)
    }

    /// Every replica's recorded audit chain head.
    pub async fn audit_heads(&self) -> KmsResult<Vec<crate::metadata::AuditHead>> {
        Ok(self.meta.audit_heads().await?)
    }

    /// Records where `replica`'s audit chain stands (line `seq`, hash `head`), by the
    /// service's clock; a record never moves back.
    pub async fn record_audit_head(&self, replica: &str, seq: u64, head: String) -> KmsResult<()> {
        let head = crate::metadata::AuditHead {
            replica: replica.to_string(),
            seq,
            head,
            recorded_ms: self.now(),
        };
        Ok(self.meta.record_audit_head(&head).await?)
    }
}

/// One page of a list operation, and the marker of the next.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_marker: Option<String>,
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
                model::error::ErrorKind::InvalidMarker,
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

#[cfg(test)]
mod tests;
