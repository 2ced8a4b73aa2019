//! Custom key stores: create, describe, update, delete, connect, disconnect.
//!
//! Connection state lives in the metadata store (so a CONNECTED store reconnects after a
//! restart); the live PKCS#11 connection lives in `Kms::connections` while CONNECTED.

use std::sync::Arc;
use std::time::Duration;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::access::Caller;
use super::conn_state::*;
use super::error::{ErrorKind, KmsError, KmsResult};
use super::ids::{is_cluster_id, is_store_id, new_store_id};
use super::op::Op;
use super::{decode_marker, page_limit, pem_der, Cluster, Kms};
use crate::config::PinFormat;
use crate::hsm::{Connection, LoginFailure, Options};
use crate::store::{store_not_found, StoreRecord, StoreUpdate};

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
    pub connection_state: String,
    pub connection_error_code: Option<String>,
    pub creation_date_ms: i64,
}

pub struct Page<T> {
    pub items: Vec<T>,
    pub next_marker: Option<String>,
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

fn view(r: StoreRecord) -> StoreView {
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

fn check_name(name: &str, field: &str) -> KmsResult<()> {
    let n = name.chars().count();
    if !(1..=256).contains(&n) {
        return Err(KmsError::validation(format!(
            "{field} must be 1 to 256 characters long"
        )));
    }
    Ok(())
}

fn invalid_state(id: &str, state: &str, op: &str, needs: &str) -> KmsError {
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

    pub fn create_custom_key_store(&self, caller: &Caller, req: CreateStore) -> KmsResult<String> {
        self.authorize_account(
            caller,
            Op::CreateCustomKeyStore.action(),
            None,
            &super::access::Facts::of(&caller.principal),
        )?;
        check_name(&req.name, "CustomKeyStoreName")?;
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
        self.store.insert_store(&StoreRecord {
            id: id.clone(),
            name: req.name,
            cluster_id,
            trust_anchor: anchor,
            sealed_password: sealed,
            connection_state: DISCONNECTED.into(),
            connection_error_code: None,
            creation_date_ms: self.now(),
        })?;
        tracing::info!(custom_key_store_id = %id, "created custom key store");
        Ok(id)
    }

    /// The store record, or CustomKeyStoreNotFoundException (also for malformed ids).
    pub(super) fn get_store(&self, id: &str) -> KmsResult<StoreRecord> {
        if !is_store_id(id) {
            return Err(store_not_found(id));
        }
        self.store.get_store(id)?.ok_or_else(|| store_not_found(id))
    }

    pub fn describe_custom_key_stores(
        &self,
        caller: &Caller,
        id: Option<&str>,
        name: Option<&str>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<StoreView>> {
        self.authorize_account(
            caller,
            Op::DescribeCustomKeyStores.action(),
            id,
            &super::access::Facts::of(&caller.principal),
        )?;
        let limit = page_limit(limit, 1000, 1000)?;
        match (id, name) {
            (Some(_), Some(_)) => Err(KmsError::validation(
                "Specify CustomKeyStoreId or CustomKeyStoreName, not both",
            )),
            (Some(id), None) => Ok(Page {
                items: vec![view(self.get_store(id)?)],
                next_marker: None,
            }),
            (None, Some(name)) => {
                check_name(name, "CustomKeyStoreName")?;
                let rec = self.store.get_store_by_name(name)?.ok_or_else(|| {
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
                let rows = self.store.list_stores(after.as_deref(), limit + 1)?;
                Ok(Page::of(rows, limit, |r| r.id.clone(), view))
            }
        }
    }

    pub async fn update_custom_key_store(
        &self,
        caller: &Caller,
        req: UpdateStore,
    ) -> KmsResult<()> {
        self.authorize_account(
            caller,
            Op::UpdateCustomKeyStore.action(),
            Some(&req.id),
            &super::access::Facts::of(&caller.principal),
        )?;
        if req.new_name.is_none() && req.password.is_none() && req.cluster_id.is_none() {
            return Err(KmsError::validation(
                "Specify at least one of NewCustomKeyStoreName, KeyStorePassword, CloudHsmClusterId",
            ));
        }
        if let Some(n) = &req.new_name {
            check_name(n, "NewCustomKeyStoreName")?;
        }
        let lock = self.lifecycle_lock(&req.id);
        let _guard = lock.write().await;
        let rec = self.get_store(&req.id)?;
        if (req.password.is_some() || req.cluster_id.is_some())
            && rec.connection_state != DISCONNECTED
        {
            return Err(invalid_state(
                &rec.id,
                &rec.connection_state,
                "changing the password or the cluster",
                DISCONNECTED,
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
        self.store.update_store(
            &rec.id,
            &StoreUpdate {
                name: req.new_name,
                cluster_id: req.cluster_id.filter(|c| *c != rec.cluster_id),
                sealed_password: sealed,
            },
        )?;
        tracing::info!(custom_key_store_id = %rec.id, "updated custom key store");
        Ok(())
    }

    pub async fn delete_custom_key_store(&self, caller: &Caller, id: &str) -> KmsResult<()> {
        self.authorize_account(
            caller,
            Op::DeleteCustomKeyStore.action(),
            Some(id),
            &super::access::Facts::of(&caller.principal),
        )?;
        if !is_store_id(id) {
            return Err(store_not_found(id));
        }
        let lock = self.lifecycle_lock(id);
        let _guard = lock.write().await;
        self.store.delete_store(id)?;
        if let Some(h) = self.health.get() {
            h.clone().clear_service_status(id).await;
        }
        tracing::info!(custom_key_store_id = %id, "deleted custom key store");
        Ok(())
    }

    /// Starts connecting: the store is CONNECTING when this returns; a background task makes
    /// it CONNECTED or FAILED with a connection error code.
    pub async fn connect_custom_key_store(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> KmsResult<()> {
        self.authorize_account(
            caller,
            Op::ConnectCustomKeyStore.action(),
            Some(id),
            &super::access::Facts::of(&caller.principal),
        )?;
        let lock = self.lifecycle_lock(id);
        let guard = lock.clone().write_owned().await;
        let rec = self.get_store(id)?;
        match rec.connection_state.as_str() {
            CONNECTED | CONNECTING => return Ok(()),
            DISCONNECTED => {}
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
        if !self
            .store
            .transition_store(id, &[DISCONNECTED], CONNECTING, None)?
        {
            return Err(KmsError::new(
                ErrorKind::CustomKeyStoreInvalidState,
                format!("Custom key store {id} changed state; try again"),
            ));
        }
        let kms = Arc::clone(self);
        tokio::spawn(async move {
            kms.finish_connect(rec).await;
            drop(guard);
        });
        Ok(())
    }

    /// The background half of connecting. The caller holds the store's lifecycle lock.
    async fn finish_connect(self: &Arc<Self>, rec: StoreRecord) {
        let outcome = self.open_connection(&rec).await;
        let (state, code) = match outcome {
            Ok(conn) => {
                if self.rotate_password {
                    self.rotate_password(&rec, &conn).await;
                }
                self.reconcile_creating_keys(&rec.id, &conn, i64::MAX).await;
                self.connections
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rec.id.clone(), conn);
                (CONNECTED, None)
            }
            Err(code) => (FAILED, Some(code)),
        };
        match self
            .store
            .transition_store(&rec.id, &[CONNECTING], state, code)
        {
            Ok(true) => {
                tracing::info!(custom_key_store_id = %rec.id, state, error_code = code, "connection finished")
            }
            Ok(false) => {
                tracing::warn!(custom_key_store_id = %rec.id, "store left CONNECTING meanwhile")
            }
            Err(e) => {
                tracing::error!(custom_key_store_id = %rec.id, error = %e, "recording the connection state failed")
            }
        }
        self.report(&rec.id, state == CONNECTED).await;
    }

    /// Logs in to the store's cluster within the login deadline; on failure, the AWS
    /// ConnectionErrorCode. A device-tier failure of the new connection starts `recover`.
    async fn open_connection(
        self: &Arc<Self>,
        rec: &StoreRecord,
    ) -> Result<Arc<Connection>, &'static str> {
        let Some(cluster) = self.cluster(&rec.cluster_id) else {
            tracing::warn!(custom_key_store_id = %rec.id, cluster = %rec.cluster_id, "cluster is not configured");
            return Err("CLUSTER_NOT_FOUND");
        };
        if cluster.active_hsms() == 0 {
            return Err("INSUFFICIENT_CLOUDHSM_HSMS");
        }
        let stored = self
            .sealer
            .unseal(&rec.id, &rec.sealed_password)
            .map_err(|_| "INTERNAL_ERROR")?;
        match self.login(rec, &cluster, &stored).await {
            Err("INVALID_CREDENTIALS") => {}
            other => return other,
        }
        // A rotation may have changed the token's password and stopped (a crash) before
        // recording it: the password it was setting is kept sealed until then.
        let Some(pending) = self.store.pending_password(&rec.id).ok().flatten() else {
            return Err("INVALID_CREDENTIALS");
        };
        let pending = self
            .sealer
            .unseal(&rec.id, &pending)
            .map_err(|_| "INTERNAL_ERROR")?;
        let conn = self.login(rec, &cluster, &pending).await?;
        if let Err(e) = self.store.promote_pending_password(&rec.id) {
            tracing::error!(custom_key_store_id = %rec.id, error = %e, "recording the rotated kmsuser password failed");
        }
        tracing::warn!(custom_key_store_id = %rec.id, "logged in with the password of an unfinished rotation; it is now the stored one");
        Ok(conn)
    }

    /// Logs in with `password` within the login deadline.
    async fn login(
        self: &Arc<Self>,
        rec: &StoreRecord,
        cluster: &Cluster,
        password: &[u8],
    ) -> Result<Arc<Connection>, &'static str> {
        let pin = login_pin(cluster, password)?;
        let module = cluster.settings.module.clone();
        let label = cluster.settings.token_label.clone();
        let options = Options {
            pool_size: self.hsm.session_pool_size,
            call_timeout: self.call_timeout(),
            on_device_failure: self.recovery_trigger(&rec.id),
        };
        let modules = Arc::clone(&self.modules);
        // Loading the module (C_Initialize) and logging in are PKCS#11 calls: blocking thread.
        let opening = tokio::task::spawn_blocking(move || {
            let ctx = modules.get(&module).map_err(|e| {
                tracing::error!(error = %e, "PKCS#11 module unusable");
                LoginFailure::Internal
            })?;
            Connection::open(ctx, &label, &pin, options)
        });
        let limit = Duration::from_millis(self.hsm.login_timeout_ms);
        let opened = match tokio::time::timeout(limit, opening).await {
            Ok(joined) => joined.map_err(|_| "INTERNAL_ERROR")?,
            Err(_) => {
                // A login that returns later is dropped, closing its sessions.
                tracing::warn!(custom_key_store_id = %rec.id, ?limit, "logging in timed out");
                return Err("NETWORK_ERRORS");
            }
        };
        match opened {
            Ok(conn) => Ok(conn),
            Err(failure) => {
                tracing::warn!(custom_key_store_id = %rec.id, ?failure, "connecting failed");
                Err(LoginFailure::connection_error_code(failure))
            }
        }
    }

    /// Replaces the kmsuser password with a random one only this service knows, as AWS does
    /// on connect. The new password is stored sealed (as pending) before the token changes,
    /// and becomes the stored one after: a crash in between leaves both recoverable. A token
    /// that refuses C_SetPIN keeps its password; the connection is unaffected.
    async fn rotate_password(&self, rec: &StoreRecord, conn: &Arc<Connection>) {
        let Some(cluster) = self.cluster(&rec.cluster_id) else {
            return;
        };
        let outcome: KmsResult<()> = async {
            let current = self.get_store(&rec.id)?;
            let old = self.sealer.unseal(&rec.id, &current.sealed_password)?;
            let mut raw = Zeroizing::new([0u8; 16]);
            getrandom::fill(raw.as_mut()).map_err(KmsError::internal)?;
            let new = Zeroizing::new(hex::encode(raw.as_ref()).into_bytes());
            self.store
                .set_pending_password(&rec.id, Some(&self.sealer.seal(&rec.id, &new)?))?;
            let (old_pin, new_pin) = (
                login_pin(&cluster, &old).map_err(KmsError::internal)?,
                login_pin(&cluster, &new).map_err(KmsError::internal)?,
            );
            let conn = Arc::clone(conn);
            tokio::task::spawn_blocking(move || conn.set_pin(&old_pin, &new_pin))
                .await
                .map_err(KmsError::internal)?
                .map_err(|e| KmsError::internal(format!("C_SetPIN: {e:?}")))?;
            self.store.promote_pending_password(&rec.id)?;
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
        self.report(&store_id, false).await;
        let max = Duration::from_millis(self.hsm.reconnect_max_backoff_ms);
        let mut wait = Duration::from_millis(self.hsm.reconnect_initial_backoff_ms);
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
            let rec = match self.get_store(&store_id) {
                Ok(rec) if rec.connection_state == CONNECTED => rec,
                _ => return,
            };
            if !closed {
                old.close(self.call_timeout()).await;
                old.supersede();
                closed = true;
            }
            match self.open_connection(&rec).await {
                Ok(conn) => {
                    self.reconcile_creating_keys(&store_id, &conn, i64::MAX)
                        .await;
                    self.connections
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(store_id.clone(), conn);
                    crate::metrics::get().reconnect(&store_id, "ok");
                    tracing::info!(custom_key_store_id = %store_id, "reconnected to the HSM");
                    drop(guard);
                    self.report(&store_id, true).await;
                    return;
                }
                Err(code) => {
                    crate::metrics::get().reconnect(&store_id, "failed");
                    wait = (wait * 2).min(max);
                    tracing::warn!(custom_key_store_id = %store_id, error_code = code, retry_in = ?wait, "reconnecting failed");
                }
            }
        }
    }

    pub async fn disconnect_custom_key_store(&self, caller: &Caller, id: &str) -> KmsResult<()> {
        self.authorize_account(
            caller,
            Op::DisconnectCustomKeyStore.action(),
            Some(id),
            &super::access::Facts::of(&caller.principal),
        )?;
        let lock = self.lifecycle_lock(id);
        let _guard = lock.write().await;
        let rec = self.get_store(id)?;
        if matches!(rec.connection_state.as_str(), DISCONNECTED | DISCONNECTING) {
            return Err(invalid_state(
                id,
                &rec.connection_state,
                "DisconnectCustomKeyStore",
                "CONNECTED, CONNECTING or FAILED",
            ));
        }
        self.store
            .transition_store(id, &[CONNECTED, CONNECTING, FAILED], DISCONNECTING, None)?;
        let conn = self
            .connections
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(conn) = conn {
            conn.close(self.call_timeout()).await;
        }
        self.store
            .transition_store(id, &[DISCONNECTING], DISCONNECTED, None)?;
        self.report(id, false).await;
        tracing::info!(custom_key_store_id = %id, "disconnected custom key store");
        Ok(())
    }

    /// On start: stores that were connected reconnect; an interrupted disconnect completes.
    pub async fn resume(self: &Arc<Self>) -> KmsResult<()> {
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_stores(after.as_deref(), 100)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for rec in page {
                match rec.connection_state.as_str() {
                    CONNECTED | CONNECTING => {
                        self.store.transition_store(
                            &rec.id,
                            &[CONNECTED, CONNECTING],
                            DISCONNECTED,
                            None,
                        )?;
                        self.connect_custom_key_store(&self.service_caller(), &rec.id)
                            .await?;
                    }
                    DISCONNECTING => {
                        self.store.transition_store(
                            &rec.id,
                            &[DISCONNECTING],
                            DISCONNECTED,
                            None,
                        )?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Waits until the store's pending lifecycle change (a connect, say) is over.
    pub async fn settle(&self, id: &str) {
        let lock = self.lifecycle_lock(id);
        let _g = lock.read().await;
    }
}

/// The PIN of the cluster's crypto user for `password`, built in one allocation that moves
/// into the zeroizing AuthPin, so that no stray copy is left in freed memory.
fn login_pin(cluster: &Cluster, password: &[u8]) -> Result<AuthPin, &'static str> {
    let password = std::str::from_utf8(password).map_err(|_| "INTERNAL_ERROR")?;
    let user = &cluster.settings.crypto_user;
    let mut pin = String::with_capacity(user.len() + 1 + password.len());
    if cluster.settings.pin_format == PinFormat::UserPassword {
        pin.push_str(user);
        pin.push(':');
    }
    pin.push_str(password);
    Ok(AuthPin::from(pin))
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
