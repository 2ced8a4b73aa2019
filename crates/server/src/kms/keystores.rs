//! Custom key stores: create, describe, update, delete, connect, disconnect.
//!
//! Connection state lives in the metadata database (so a CONNECTED store reconnects after a
//! restart); the live PKCS#11 connection lives in `Kms::connections` while CONNECTED.

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::clusters::{pem_der, Cluster};
use super::fields::check_keystore_name;
use super::gate::{Authorized, Gate, Subject};
use super::{decode_marker, page_limit, Kms, Page};
use crate::hsm::{Connection, Pin};
use crate::metadata::{Failure, KeyStoreRecord, KeyStoreUpdate, Precondition, Unique};
use model::error::{ErrorKind, KmsError, KmsResult};
use model::ids::{is_cluster_id, is_store_id, new_store_id};
use model::op::Op;
use model::states::{ConnectionErrorCode, ConnectionState};

use ConnectionState::*;

/// A kmsuser password as the caller gave it. Never printed.
pub struct Password(pub Zeroizing<String>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Password {
    pub fn new(s: String) -> KmsResult<Password> {
        let s = Zeroizing::new(s);
        let n = s.chars().count();
        if !(7..=32).contains(&n) {
            return Err(KmsError::validation(format!(
                "KeyStorePassword must be 7 to 32 characters long, got {n}"
            )));
        }
        Ok(Password(s))
    }
}

pub struct CreateStore {
    pub name: String,
    pub cluster_id: Option<String>,
    pub trust_anchor: Option<String>,
    pub password: Option<Password>,
    pub store_type: Option<String>,
}

pub struct UpdateStore {
    pub id: String,
    pub new_name: Option<String>,
    pub password: Option<Password>,
    pub cluster_id: Option<String>,
}

/// What DescribeCustomKeyStores returns for one store.
#[derive(Clone, Debug)]
pub struct StoreView {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    pub trust_anchor: String,
    pub connection_state: ConnectionState,
    pub connection_error_code: Option<ConnectionErrorCode>,
    pub creation_date_ms: i64,
}

impl<T> Page<T> {
    /// The page of `rows`, fetched as up to `limit + 1` in marker order: the extra row, if
    /// any, only tells that there is more, and the marker is the sort key (`key`) of the
    /// last row shown. The one pagination step of every List operation.
    pub fn of<R>(
        mut rows: Vec<R>,
        limit: usize,
        key: impl Fn(&R) -> String,
        item: impl FnMut(R) -> T,
    ) -> Page<T> {
        let next_marker = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|r| super::encode_marker(&key(r)))
        } else {
            None
        };
        Page {
            items: rows.into_iter().map(item).collect(),
            next_marker,
        }
    }
}

fn view(r: KeyStoreRecord) -> StoreView {
    StoreView {
        id: r.id,
        name: r.name,
        cluster_id: r.cluster_id,
        trust_anchor: r.trust_anchor,
        connection_state: r.connection_state,
        connection_error_code: r.connection_error_code,
        creation_date_ms: r.creation_date_ms,
    }
}

fn invalid_state(id: &str, state: ConnectionState, op: &str, needs: &str) -> KmsError {
    KmsError::new(
        ErrorKind::CustomKeyStoreInvalidState,
        format!("Custom key store {id} is {state}; {op} requires it to be {needs}"),
    )
}

impl Kms {
    /// The cluster named by a request, checked the way CreateCustomKeyStore and
    /// UpdateCustomKeyStore check it.
    fn usable_cluster(&self, cluster_id: &str) -> KmsResult<Arc<Cluster>> {
        if !is_cluster_id(cluster_id) {
            return Err(KmsError::validation(format!(
                "CloudHsmClusterId {cluster_id} does not match cluster-[2-7a-zA-Z]{{11,16}}"
            )));
        }
        let cluster = self.cluster(cluster_id).ok_or_else(|| {
            KmsError::new(
                ErrorKind::CloudHsmClusterNotFound,
                format!("Cluster {cluster_id} does not exist"),
            )
        })?;
        if !cluster.is_active() {
            return Err(KmsError::new(
                ErrorKind::CloudHsmClusterNotActive,
                format!(
                    "Cluster {cluster_id} is {}, not ACTIVE",
                    cluster.settings.state
                ),
            ));
        }
        if !cluster.has_two_zones() {
            return Err(KmsError::new(
                ErrorKind::CloudHsmClusterInvalidConfiguration,
                format!(
                    "Cluster {cluster_id} must contain at least two active HSMs in different \
                     availability zones; it has {} active",
                    cluster.active_hsms()
                ),
            ));
        }
        Ok(cluster)
    }

    pub async fn create_custom_key_store(
        &self,
        _: &Authorized<'_>,
        req: CreateStore,
    ) -> KmsResult<String> {
        check_keystore_name(&req.name, "CustomKeyStoreName")?;
        match req.store_type.as_deref() {
            None | Some("AWS_CLOUDHSM") => {}
            Some("EXTERNAL_KEY_STORE") => {
                return Err(KmsError::new(
                    ErrorKind::UnsupportedOperation,
                    "External key stores are not supported; use AWS_CLOUDHSM",
                ))
            }
            Some(other) => {
                return Err(KmsError::validation(format!(
                    "CustomKeyStoreType {other} is not one of AWS_CLOUDHSM, EXTERNAL_KEY_STORE"
                )))
            }
        }
        let cluster_id = req
            .cluster_id
            .ok_or_else(|| KmsError::validation("CloudHsmClusterId is required"))?;
        let anchor = req
            .trust_anchor
            .ok_or_else(|| KmsError::validation("TrustAnchorCertificate is required"))?;
        let password = req
            .password
            .ok_or_else(|| KmsError::validation("KeyStorePassword is required"))?;
        if anchor.is_empty() || anchor.chars().count() > 5000 {
            return Err(KmsError::validation(
                "TrustAnchorCertificate must be 1 to 5000 characters long",
            ));
        }
        let cluster = self.usable_cluster(&cluster_id)?;
        if pem_der(&anchor).as_deref() != Some(cluster.trust_anchor_der.as_slice()) {
            return Err(KmsError::new(
                ErrorKind::IncorrectTrustAnchor,
                format!("The trust anchor certificate is not the one of cluster {cluster_id}"),
            ));
        }
        let id = new_store_id()?;
        let sealed = self.sealer.seal(&id, password.0.as_bytes())?;
        let name = req.name;
        self.meta
            .insert_keystore(&KeyStoreRecord {
                id: id.clone(),
                name: name.clone(),
                cluster_id: cluster_id.clone(),
                trust_anchor: anchor,
                sealed_password: sealed,
                connection_state: Disconnected,
                connection_error_code: None,
                creation_date_ms: self.now(),
            })
            .await
            .map_err(|f| taken(f, &name, &cluster_id))?;
        tracing::info!(custom_key_store_id = %id, "created custom key store");
        Ok(id)
    }

    /// The key store record, or CustomKeyStoreNotFoundException (also for malformed ids).
    pub(super) async fn keystore(&self, id: &str) -> KmsResult<KeyStoreRecord> {
        if !is_store_id(id) {
            return Err(keystore_not_found(id));
        }
        self.meta
            .keystore(id)
            .await?
            .ok_or_else(|| keystore_not_found(id))
    }

    pub async fn describe_custom_key_stores(
        &self,
        _: &Authorized<'_>,
        id: Option<&str>,
        name: Option<&str>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<StoreView>> {
        let limit = page_limit(limit, 1000, 1000)?;
        match (id, name) {
            (Some(_), Some(_)) => Err(KmsError::validation(
                "Specify CustomKeyStoreId or CustomKeyStoreName, not both",
            )),
            (Some(id), None) => Ok(Page {
                items: vec![view(self.keystore(id).await?)],
                next_marker: None,
            }),
            (None, Some(name)) => {
                check_keystore_name(name, "CustomKeyStoreName")?;
                let rec = self.meta.keystore_by_name(name).await?.ok_or_else(|| {
                    KmsError::new(
                        ErrorKind::CustomKeyStoreNotFound,
                        format!("No custom key store is named {name}"),
                    )
                })?;
                Ok(Page {
                    items: vec![view(rec)],
                    next_marker: None,
                })
            }
            (None, None) => {
                let after = marker.map(decode_marker).transpose()?;
                let rows = self
                    .meta
                    .list_keystores(after.as_deref(), limit + 1)
                    .await?;
                Ok(Page::of(rows, limit, |r| r.id.clone(), view))
            }
        }
    }

    pub async fn update_custom_key_store(
        &self,
        _: &Authorized<'_>,
        req: UpdateStore,
    ) -> KmsResult<()> {
        if req.new_name.is_none() && req.password.is_none() && req.cluster_id.is_none() {
            return Err(KmsError::validation(
                "Specify at least one of NewCustomKeyStoreName, KeyStorePassword, CloudHsmClusterId",
            ));
        }
        if let Some(n) = &req.new_name {
            check_keystore_name(n, "NewCustomKeyStoreName")?;
        }
        let lock = self.lifecycle_lock(&req.id);
        let _guard = lock.write().await;
        let rec = self.keystore(&req.id).await?;
        if (req.password.is_some() || req.cluster_id.is_some())
            && rec.connection_state != Disconnected
        {
            return Err(invalid_state(
                &rec.id,
                rec.connection_state,
                "changing the password or the cluster",
                Disconnected.as_str(),
            ));
        }
        if let Some(new_cluster) = &req.cluster_id {
            if *new_cluster != rec.cluster_id {
                let cluster = self.usable_cluster(new_cluster)?;
                let old_lineage = self
                    .cluster(&rec.cluster_id)
                    .map(|c| c.settings.lineage().to_string())
                    .unwrap_or_else(|| rec.cluster_id.clone());
                if cluster.settings.lineage() != old_lineage {
                    return Err(KmsError::new(
                        ErrorKind::CloudHsmClusterNotRelated,
                        format!(
                            "Cluster {new_cluster} does not share backup history with cluster {}",
                            rec.cluster_id
                        ),
                    ));
                }
            } else {
                self.usable_cluster(new_cluster)?;
            }
        }
        let sealed = match &req.password {
            Some(p) => Some(self.sealer.seal(&rec.id, p.0.as_bytes())?),
            None => None,
        };
        let update = KeyStoreUpdate {
            name: req.new_name,
            cluster_id: req.cluster_id.filter(|c| *c != rec.cluster_id),
            sealed_password: sealed,
        };
        self.meta
            .update_keystore(&rec.id, &update)
            .await
            .map_err(|f| match f {
                Failure::NotFound => keystore_not_found(&rec.id),
                f => taken(
                    f,
                    update.name.as_deref().unwrap_or_default(),
                    update.cluster_id.as_deref().unwrap_or_default(),
                ),
            })?;
        tracing::info!(custom_key_store_id = %rec.id, "updated custom key store");
        Ok(())
    }

    pub async fn delete_custom_key_store(&self, _: &Authorized<'_>, id: &str) -> KmsResult<()> {
        if !is_store_id(id) {
            return Err(keystore_not_found(id));
        }
        let lock = self.lifecycle_lock(id);
        let _guard = lock.write().await;
        self.meta
            .delete_keystore(id, Disconnected)
            .await
            .map_err(|f| match f {
                Failure::NotFound => keystore_not_found(id),
                Failure::Precondition(Precondition::ConnectionState(s)) => KmsError::new(
                    ErrorKind::CustomKeyStoreInvalidState,
                    format!(
                        "Custom key store {id} is {s}; it can be deleted only while DISCONNECTED"
                    ),
                ),
                Failure::Precondition(Precondition::KeyStoreHasKeys(n)) => KmsError::new(
                    ErrorKind::CustomKeyStoreHasCmks,
                    format!("Custom key store {id} still holds {n} KMS key(s)"),
                ),
                f => f.into(),
            })?;
        self.connections.forget(id);
        tracing::info!(custom_key_store_id = %id, "deleted custom key store");
        Ok(())
    }

    /// Starts connecting: the store is CONNECTING when this returns; a background task makes
    /// it CONNECTED or FAILED with a connection error code.
    pub async fn connect_custom_key_store(
        self: &Arc<Self>,
        _: &Authorized<'_>,
        id: &str,
    ) -> KmsResult<()> {
        let lock = self.lifecycle_lock(id);
        let guard = lock.clone().write_owned().await;
        let rec = self.keystore(id).await?;
        match rec.connection_state {
            Connected | Connecting => return Ok(()),
            Disconnected => {}
            other => {
                return Err(invalid_state(
                    id,
                    other,
                    "ConnectCustomKeyStore",
                    "DISCONNECTED (disconnect a FAILED store first)",
                ))
            }
        }
        if let Some(cluster) = self.cluster(&rec.cluster_id) {
            if !cluster.is_active() {
                return Err(KmsError::new(
                    ErrorKind::CloudHsmClusterNotActive,
                    format!(
                        "Cluster {} is {}, not ACTIVE",
                        rec.cluster_id, cluster.settings.state
                    ),
                ));
            }
        }
        match self
            .meta
            .transition_keystore(id, &[Disconnected], Connecting, None)
            .await
        {
            Ok(()) => {}
            // Another replica's connect won the same transition: the store is connecting,
            // as this caller asked (a connect of a CONNECTING store succeeds).
            Err(Failure::Precondition(Precondition::ConnectionState(Connecting | Connected))) => {
                return Ok(())
            }
            Err(Failure::Precondition(_) | Failure::NotFound) => {
                return Err(KmsError::new(
                    ErrorKind::CustomKeyStoreInvalidState,
                    format!("Custom key store {id} changed state; try again"),
                ))
            }
            Err(f) => return Err(f.into()),
        }
        let kms = Arc::clone(self);
        tokio::spawn(async move {
            kms.finish_connect(rec).await;
            drop(guard);
        });
        Ok(())
    }

    /// The background half of connecting. The caller holds the store's lifecycle lock.
    async fn finish_connect(self: &Arc<Self>, rec: KeyStoreRecord) {
        let outcome = self.open_connection(&rec).await;
        let (state, code) = match outcome {
            Ok(conn) => {
                if self.connections.rotate_password {
                    self.rotate_password(&rec, &conn).await;
                }
                let cutoff = self.creation_cutoff();
                self.reconcile_creating_keys(&rec.id, &conn, cutoff).await;
                self.connections.insert(&rec.id, conn);
                (Connected, None)
            }
            Err(code) => (Failed, Some(code)),
        };
        match self
            .meta
            .transition_keystore(&rec.id, &[Connecting], state, code)
            .await
        {
            Ok(()) => {
                tracing::info!(custom_key_store_id = %rec.id, state = %state, error_code = code.map(|c| c.as_str()), "connection finished")
            }
            Err(Failure::Precondition(_) | Failure::NotFound) => {
                tracing::warn!(custom_key_store_id = %rec.id, "store left CONNECTING meanwhile")
            }
            Err(e) => {
                tracing::error!(custom_key_store_id = %rec.id, error = %e, "recording the connection state failed")
            }
        }
        self.report(&rec.id, state == Connected);
    }

    /// Logs in to the store's cluster within the login deadline; on failure, the AWS
    /// ConnectionErrorCode. A device-tier failure of the new connection starts `recover`.
    async fn open_connection(
        self: &Arc<Self>,
        rec: &KeyStoreRecord,
    ) -> Result<Arc<Connection>, ConnectionErrorCode> {
        use ConnectionErrorCode as Code;
        let Some(cluster) = self.cluster(&rec.cluster_id) else {
            tracing::warn!(custom_key_store_id = %rec.id, cluster = %rec.cluster_id, "cluster is not configured");
            return Err(Code::ClusterNotFound);
        };
        if cluster.active_hsms() == 0 {
            return Err(Code::InsufficientCloudHsmHsms);
        }
        let stored = self
            .sealer
            .unseal(&rec.id, &rec.sealed_password)
            .map_err(|_| Code::InternalError)?;
        match self.login(rec, &cluster, &stored).await {
            Err(Code::InvalidCredentials) => {}
            other => return other,
        }
        // A rotation may have changed the token's password and stopped (a crash) before
        // recording it: the password it was setting is kept sealed until then.
        let Some(pending) = self.meta.pending_password(&rec.id).await.ok().flatten() else {
            return Err(Code::InvalidCredentials);
        };
        let pending = self
            .sealer
            .unseal(&rec.id, &pending)
            .map_err(|_| Code::InternalError)?;
        let conn = self.login(rec, &cluster, &pending).await?;
        if let Err(e) = self.meta.promote_pending_password(&rec.id).await {
            tracing::error!(custom_key_store_id = %rec.id, error = %e, "recording the rotated kmsuser password failed");
        }
        tracing::warn!(custom_key_store_id = %rec.id, "logged in with the password of an unfinished rotation; it is now the stored one");
        Ok(conn)
    }

    /// Logs in with `password` within the login deadline.
    async fn login(
        self: &Arc<Self>,
        rec: &KeyStoreRecord,
        cluster: &Cluster,
        password: &[u8],
    ) -> Result<Arc<Connection>, ConnectionErrorCode> {
        self.connections
            .login(&rec.id, cluster, password, self.recovery_trigger(&rec.id))
            .await
    }

    /// Replaces the kmsuser password with a random one only this service knows, as AWS does
    /// on connect. The new password is stored sealed (as pending) before the token changes,
    /// and becomes the stored one after: a crash in between leaves both recoverable. A token
    /// that refuses C_SetPIN keeps its password; the connection is unaffected.
    async fn rotate_password(&self, rec: &KeyStoreRecord, conn: &Arc<Connection>) {
        let Some(cluster) = self.cluster(&rec.cluster_id) else {
            return;
        };
        let outcome: KmsResult<()> = async {
            let current = self.keystore(&rec.id).await?;
            let old = self.sealer.unseal(&rec.id, &current.sealed_password)?;
            let mut raw = Zeroizing::new([0u8; 16]);
            getrandom::fill(raw.as_mut()).map_err(KmsError::internal)?;
            let new = Zeroizing::new(hex::encode(raw.as_ref()).into_bytes());
            self.meta
                .set_pending_password(&rec.id, Some(&self.sealer.seal(&rec.id, &new)?))
                .await?;
            let pin = |password: &[u8]| {
                Pin::new(cluster.pin_user(), password)
                    .ok_or_else(|| KmsError::internal("a kmsuser password is not UTF-8"))
            };
            let (old_pin, new_pin) = (pin(&old)?, pin(&new)?);
            let conn = Arc::clone(conn);
            tokio::task::spawn_blocking(move || conn.set_pin(&old_pin, &new_pin))
                .await
                .map_err(KmsError::internal)?
                .map_err(|e| KmsError::internal(format!("C_SetPIN: {e:?}")))?;
            self.meta.promote_pending_password(&rec.id).await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                tracing::info!(custom_key_store_id = %rec.id, "rotated the kmsuser password")
            }
            Err(e) => {
                tracing::warn!(custom_key_store_id = %rec.id, error = %e.message, "rotating the kmsuser password failed; the current one stays in use")
            }
        }
    }

    /// What a connection calls (once, from a worker thread) on its first device failure.
    fn recovery_trigger(self: &Arc<Self>, store_id: &str) -> Box<dyn Fn(&str) + Send + Sync> {
        let kms = Arc::downgrade(self);
        let id = store_id.to_string();
        let runtime = tokio::runtime::Handle::current();
        Box::new(move |_detail| {
            if let Some(kms) = kms.upgrade() {
                runtime.spawn(kms.recover(id.clone()));
            }
        })
    }

    /// Replaces a degraded connection: closes it, then logs in again with bounded exponential
    /// back-off until the token answers, the store is disconnected, or the process stops.
    /// The store stays CONNECTED throughout (it reconnects after a restart too); meanwhile
    /// its keys fail fast with KMSInvalidStateException and its health is NOT_SERVING.
    async fn recover(self: Arc<Self>, store_id: String) {
        self.report(&store_id, false);
        let hsm = self.connections.settings();
        let max = Duration::from_millis(hsm.reconnect_max_backoff_ms);
        let mut wait = Duration::from_millis(hsm.reconnect_initial_backoff_ms);
        let mut closed = false;
        loop {
            tokio::time::sleep(wait).await;
            let lock = self.lifecycle_lock(&store_id);
            let guard = lock.write().await;
            let Some(old) = self.connection(&store_id) else {
                return; // disconnected meanwhile
            };
            if !old.is_degraded() {
                return; // already replaced
            }
            let rec = match self.keystore(&store_id).await {
                Ok(rec) if rec.connection_state == Connected => rec,
                _ => return,
            };
            if !closed {
                old.close(self.connections.call_timeout()).await;
                old.supersede();
                closed = true;
            }
            match self.open_connection(&rec).await {
                Ok(conn) => {
                    // This replica's creations in the store are over (they failed with
                    // the old connection), but other replicas' may not be.
                    let cutoff = self.creation_cutoff();
                    self.reconcile_creating_keys(&store_id, &conn, cutoff).await;
                    self.connections.insert(&store_id, conn);
                    crate::metrics::get().reconnect(&store_id, "ok");
                    tracing::info!(custom_key_store_id = %store_id, "reconnected to the HSM");
                    drop(guard);
                    self.report(&store_id, true);
                    return;
                }
                Err(code) => {
                    crate::metrics::get().reconnect(&store_id, "failed");
                    wait = (wait * 2).min(max);
                    tracing::warn!(custom_key_store_id = %store_id, error_code = code.as_str(), retry_in = ?wait, "reconnecting failed");
                }
            }
        }
    }

    pub async fn disconnect_custom_key_store(&self, _: &Authorized<'_>, id: &str) -> KmsResult<()> {
        let lock = self.lifecycle_lock(id);
        let _guard = lock.write().await;
        let rec = self.keystore(id).await?;
        if matches!(rec.connection_state, Disconnected | Disconnecting) {
            return Err(invalid_state(
                id,
                rec.connection_state,
                "DisconnectCustomKeyStore",
                "CONNECTED, CONNECTING or FAILED",
            ));
        }
        self.meta
            .transition_keystore(id, &[Connected, Connecting, Failed], Disconnecting, None)
            .await?;
        if let Some(conn) = self.connections.remove(id) {
            conn.close(self.connections.call_timeout()).await;
        }
        self.meta
            .transition_keystore(id, &[Disconnecting], Disconnected, None)
            .await?;
        self.report(id, false);
        tracing::info!(custom_key_store_id = %id, "disconnected custom key store");
        Ok(())
    }

    /// On start: stores that were connected reconnect; an interrupted disconnect completes.
    pub async fn resume(self: &Arc<Self>) -> KmsResult<()> {
        self.measure_database_clock().await;
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.list_keystores(after.as_deref(), 100).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for rec in page {
                match rec.connection_state {
                    // Connected for the service: this replica logs in by itself, and the
                    // shared state stays as it is (another replica may be serving it).
                    Connected => {
                        let kms = Arc::clone(self);
                        tokio::spawn(async move { kms.attach_until_done(&rec.id).await });
                    }
                    // Perhaps another replica's transition in progress; if it is abandoned,
                    // finished here (else the state follower looks again later).
                    Connecting | Disconnecting => {
                        // Alone with the database, nothing else can be driving it.
                        let after = if self.meta.shared() { None } else { Some(0) };
                        self.finish_abandoned_transition(&rec.id, rec.connection_state, after)
                            .await
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// This replica's own login to a store that is CONNECTED for the service (connected
    /// through another replica, or before this process started). The shared state is not
    /// touched, and a failure is this replica's alone: its health says NOT_SERVING, its
    /// requests answer that the key is unavailable, and it tries again later. One login at
    /// a time per store; after failed ones, none before the back-off has passed.
    pub(super) async fn attach(self: &Arc<Self>, id: &str) -> Option<Arc<Connection>> {
        if let Some(c) = self.connection(id) {
            return Some(c);
        }
        if self.connections.attach_backing_off(id) {
            return None;
        }
        let lock = self.lifecycle_lock(id);
        let _guard = lock.write().await;
        if let Some(c) = self.connection(id) {
            return Some(c);
        }
        let rec = self.meta.keystore(id).await.ok().flatten()?;
        if rec.connection_state != Connected {
            return None;
        }
        match self.open_connection(&rec).await {
            Ok(conn) => {
                // Only creations no CreateKey can still be working on.
                let cutoff = self.creation_cutoff();
                self.reconcile_creating_keys(id, &conn, cutoff).await;
                self.connections.insert(id, Arc::clone(&conn));
                self.connections.note_attach(id, true);
                self.report(id, true);
                tracing::info!(custom_key_store_id = %id, "logged in to a CONNECTED custom key store");
                Some(conn)
            }
            Err(code) => {
                self.connections.note_attach(id, false);
                self.report(id, false);
                tracing::warn!(custom_key_store_id = %id, error_code = code.as_str(), "cannot log in to a CONNECTED custom key store; trying again later");
                None
            }
        }
    }

    /// `attach` (which keeps its own back-off), until this replica is logged in or the store
    /// is no longer CONNECTED.
    async fn attach_until_done(self: &Arc<Self>, id: &str) {
        loop {
            if self.attach(id).await.is_some() {
                return;
            }
            match self.meta.keystore(id).await {
                Ok(Some(rec)) if rec.connection_state == Connected => {}
                _ => return,
            }
            tokio::time::sleep(ATTACH_RETRY).await;
        }
    }

    /// Follows the shared store states, for the changes other replicas make: logs out of
    /// stores that are no longer CONNECTED (disconnected or deleted through another replica)
    /// and logs in to CONNECTED ones it has no connection to yet.
    pub async fn follow_shared_states(self: &Arc<Self>) {
        self.measure_database_clock().await;
        // This replica's heartbeat, and the quota share it implies.
        match self
            .meta
            .heartbeat(&self.replica, self.now(), REPLICA_LIVE_MS)
            .await
        {
            Ok(n) => self.quotas.set_replicas(n),
            Err(e) => tracing::warn!(error = %e, "recording this replica's heartbeat failed"),
        }
        let stores = self.all_keystores().await;
        let live = self.connections.live_ids();
        for id in live {
            let connected = stores
                .iter()
                .any(|r| r.id == id && r.connection_state == Connected);
            if connected {
                continue;
            }
            // Under the store's lock, and read again: this replica's own connect inserts its
            // connection a moment before the store turns CONNECTED.
            let lock = self.lifecycle_lock(&id);
            let _guard = lock.write().await;
            let state = self
                .meta
                .keystore(&id)
                .await
                .map(|r| r.map(|r| r.connection_state));
            if matches!(state, Ok(Some(Connected))) {
                continue;
            }
            if state.is_err() {
                continue; // the database is unreachable: keep serving what we know
            }
            if let Some(conn) = self.connections.remove(&id) {
                conn.close(self.connections.call_timeout()).await;
                self.report(&id, false);
                tracing::info!(custom_key_store_id = %id, "logged out: the store is no longer CONNECTED");
            }
        }
        for rec in stores {
            match rec.connection_state {
                Connected if self.connection(&rec.id).is_none() => {
                    let kms = Arc::clone(self);
                    tokio::spawn(async move { kms.attach(&rec.id).await });
                }
                Connecting | Disconnecting if self.meta.shared() => {
                    self.finish_abandoned_transition(&rec.id, rec.connection_state, None)
                        .await
                }
                _ => {}
            }
        }
    }

    /// A CONNECTING or DISCONNECTING state older than any live connect or disconnect can
    /// last (or than `after` ms) was left by a replica that died: the store turns
    /// DISCONNECTED (one replica wins that change), and an interrupted connect is made
    /// again, by the winner.
    async fn finish_abandoned_transition(
        self: &Arc<Self>,
        id: &str,
        state: ConnectionState,
        after: Option<i64>,
    ) {
        let hsm = self.connections.settings();
        let abandoned_after =
            after.unwrap_or(2 * (hsm.login_timeout_ms + hsm.call_timeout_ms) as i64);
        if self
            .meta
            .abandon_transition(id, state, abandoned_after)
            .await
            .is_err()
        {
            return; // live, or finished meanwhile
        }
        tracing::warn!(custom_key_store_id = %id, state = %state.as_str(), "finishing a transition a replica left unfinished");
        if state == Connecting {
            let me = self.service_caller();
            let connected = async {
                let auth = Gate::new(&me, Op::ConnectCustomKeyStore)
                    .authorize(self, Subject::KeyStore(Some(id)))
                    .await?;
                self.connect_custom_key_store(&auth, id).await
            };
            if let Err(e) = connected.await {
                tracing::error!(custom_key_store_id = %id, error = %e, "connecting a store again after an interrupted connect failed");
            }
        }
    }

    /// Runs `follow_shared_states` every `interval` until the process ends.
    pub fn spawn_state_follower(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(
            interval,
            |kms| async move { kms.follow_shared_states().await },
        )
    }

    /// `Creating` rows made before this are abandoned: no CreateKey, on any replica, can
    /// still be working on them (twice the HSM call deadline, and a second).
    pub(super) fn creation_cutoff(&self) -> i64 {
        self.now() - 2 * self.connections.settings().call_timeout_ms as i64 - 1_000
    }

    /// Waits until the store's pending lifecycle change (a connect, say) is over.
    pub async fn settle(&self, id: &str) {
        let lock = self.lifecycle_lock(id);
        let _g = lock.read().await;
    }
}

/// A replica whose last heartbeat is older than this is not counted as live (the beat
/// comes every 2 s: see server.rs).
const REPLICA_LIVE_MS: i64 = 10_000;

/// How often a replica that cannot log in to a CONNECTED store looks again (each login
/// itself waits for the back-off).
const ATTACH_RETRY: Duration = Duration::from_millis(500);

pub(super) fn keystore_not_found(id: &str) -> KmsError {
    KmsError::new(
        ErrorKind::CustomKeyStoreNotFound,
        format!("Custom key store {id} does not exist"),
    )
}

/// The exception for a key store name or cluster already in use.
fn taken(f: Failure, name: &str, cluster: &str) -> KmsError {
    match f {
        Failure::Taken(Unique::KeyStoreName) => KmsError::new(
            ErrorKind::CustomKeyStoreNameInUse,
            format!("The custom key store name {name} is already in use"),
        ),
        Failure::Taken(Unique::KeyStoreCluster) => KmsError::new(
            ErrorKind::CloudHsmClusterInUse,
            format!("Cluster {cluster} is already associated with another custom key store"),
        ),
        f => f.into(),
    }
}

#[cfg(test)]
mod page_tests {
    use super::Page;

    #[test]
    fn a_page_shows_limit_rows_and_marks_the_last_one_only_when_there_are_more() {
        let full = Page::of(
            vec!["a", "b", "c"],
            2,
            |r| r.to_string(),
            |r| r.to_uppercase(),
        );
        assert_eq!(full.items, ["A", "B"]);
        assert_eq!(full.next_marker, Some(super::super::encode_marker("b")));
        let last = Page::of(vec!["c"], 2, |r| r.to_string(), |r| r.to_uppercase());
        assert_eq!(
            (last.items, last.next_marker),
            (vec!["C".to_string()], None)
        );
    }
}
