//! The live PKCS#11 connections of connected custom key stores: logging in within the
//! login deadline, the per-store lifecycle locks, and each store's health as the domain
//! publishes it (the server feeds it to the gRPC health service).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::clusters::Cluster;
use crate::config::HsmSettings;
use crate::hsm::{Connection, LoginFailure, Modules, Options, Pin};
use model::states::ConnectionErrorCode;

/// Whether each custom key store serves (CONNECTED and its HSM answering), by store id.
pub type Health = BTreeMap<String, bool>;

pub struct Connections {
    modules: Arc<Modules>,
    settings: HsmSettings,
    /// Whether ConnectCustomKeyStore replaces the kmsuser password with its own.
    pub rotate_password: bool,
    live: RwLock<HashMap<String, Arc<Connection>>>,
    /// Serialises lifecycle changes (connect, disconnect, update, delete, key creation,
    /// reconnection) of one store: writers change the store, readers need it as it is.
    lifecycle: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    health: watch::Sender<Health>,
    /// Failed logins in a row to a CONNECTED store, and when the last one was, per store.
    attach_failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

impl Connections {
    pub fn new(modules: Arc<Modules>, settings: HsmSettings, rotate_password: bool) -> Self {
        Connections {
            modules,
            settings,
            rotate_password,
            live: RwLock::new(HashMap::new()),
            lifecycle: Mutex::new(HashMap::new()),
            health: watch::Sender::new(Health::new()),
            attach_failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &HsmSettings {
        &self.settings
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.call_timeout_ms)
    }

    pub(super) fn note_attach(&self, store_id: &str, ok: bool) {
        let mut failures = self
            .attach_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if ok {
            failures.remove(store_id);
        } else {
            let n = failures.get(store_id).map_or(0, |(n, _)| *n);
            failures.insert(
                store_id.to_string(),
                (n.saturating_add(1), std::time::Instant::now()),
            );
        }
    }

    /// Whether a login to the store should wait: after `n` failures in a row, the
    /// reconnection back-off (`hsm.reconnect_*_backoff_ms`) doubled `n - 1` times, so that
    /// neither requests nor retries can hammer an HSM that refuses the password (CloudHSM
    /// locks a crypto user out after repeated failures).
    pub(super) fn attach_backing_off(&self, store_id: &str) -> bool {
        self.attach_backing_off_at(store_id, std::time::Instant::now())
    }

    fn attach_backing_off_at(&self, store_id: &str, now: std::time::Instant) -> bool {
        let failures = self
            .attach_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((n, at)) = failures.get(store_id) else {
            return false;
        };
        let initial = Duration::from_millis(self.settings.reconnect_initial_backoff_ms);
        let max = Duration::from_millis(self.settings.reconnect_max_backoff_ms);
        let pause = initial
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(max);
        now.saturating_duration_since(*at) < pause
    }

    /// The live connection of a store.
    pub fn get(&self, store_id: &str) -> Option<Arc<Connection>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(store_id)
            .cloned()
    }

    pub(super) fn insert(&self, store_id: &str, conn: Arc<Connection>) {
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(store_id.to_string(), conn);
    }

    pub(super) fn remove(&self, store_id: &str) -> Option<Arc<Connection>> {
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(store_id)
    }

    /// The stores this process has a connection to.
    pub(super) fn live_ids(&self) -> Vec<String> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The connections whose HSM answers.
    pub(super) fn healthy(&self) -> Vec<(String, Arc<Connection>)> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, c)| !c.is_degraded())
            .map(|(id, c)| (id.clone(), Arc::clone(c)))
            .collect()
    }

    pub(super) fn lifecycle_lock(&self, store_id: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(store_id.to_string())
            .or_default()
            .clone()
    }

    /// Each store's health, as it changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Publishes whether a store serves.
    pub(super) fn report(&self, store_id: &str, serving: bool) {
        self.health
            .send_if_modified(|h| h.insert(store_id.to_string(), serving) != Some(serving));
    }

    /// A deleted store has no health any more.
    pub(super) fn forget(&self, store_id: &str) {
        self.health
            .send_if_modified(|h| h.remove(store_id).is_some());
    }

    /// Logs in to the cluster's token with `password` within the login deadline; on
    /// failure, the AWS ConnectionErrorCode.
    pub(super) async fn login(
        &self,
        store_id: &str,
        cluster: &Cluster,
        password: &[u8],
        on_device_failure: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Arc<Connection>, ConnectionErrorCode> {
        let pin =
            Pin::new(cluster.pin_user(), password).ok_or(ConnectionErrorCode::InternalError)?;
        let module = cluster.settings.module.clone();
        let label = cluster.settings.token_label.clone();
        let options = Options {
            pool_size: self.settings.session_pool_size,
            call_timeout: self.call_timeout(),
            on_device_failure,
            store_id: store_id.to_string(),
        };
        let modules = Arc::clone(&self.modules);
        // Loading the module (C_Initialize) and logging in are PKCS#11 calls: blocking thread.
        let opening =
            tokio::task::spawn_blocking(move || modules.open(&module, &label, &pin, options));
        let limit = Duration::from_millis(self.settings.login_timeout_ms);
        let opened = match tokio::time::timeout(limit, opening).await {
            Ok(joined) => joined.map_err(|_| ConnectionErrorCode::InternalError)?,
            Err(_) => {
                // A login that returns later is dropped, closing its sessions.
                tracing::warn!(custom_key_store_id = %store_id, ?limit, "logging in timed out");
                return Err(ConnectionErrorCode::NetworkErrors);
            }
        };
        opened.map_err(|failure| {
            tracing::warn!(custom_key_store_id = %store_id, ?failure, "connecting failed");
            error_code(failure)
        })
    }

    /// Closes every connection (sessions closed, tokens logged out).
    pub async fn close_all(&self) {
        let conns: Vec<(String, Arc<Connection>)> = self
            .live
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

/// The AWS ConnectionErrorCode of a failed login.
fn error_code(f: LoginFailure) -> ConnectionErrorCode {
    use ConnectionErrorCode as Code;
    match f {
        LoginFailure::InvalidCredentials => Code::InvalidCredentials,
        LoginFailure::UserLockedOut => Code::UserLockedOut,
        LoginFailure::UserNotFound => Code::UserNotFound,
        LoginFailure::TokenNotFound => Code::ClusterNotFound,
        LoginFailure::Device => Code::NetworkErrors,
        LoginFailure::Internal => Code::InternalError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_published_on_change_only() {
        let c = Connections::new(Arc::default(), HsmSettings::default(), false);
        let mut rx = c.health();
        c.report("cks-1", true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().get("cks-1"), Some(&true));
        c.report("cks-1", true);
        assert!(!rx.has_changed().unwrap(), "no change, no news");
        c.forget("cks-1");
        assert!(rx.borrow_and_update().is_empty());
    }

    /// A store that refuses this replica's login is not asked again before the back-off
    /// (doubling per failure, up to the maximum): a CloudHSM crypto user is locked out
    /// after repeated failed logins.
    #[test]
    fn failed_logins_back_off_doubling_up_to_the_maximum() {
        let settings = HsmSettings {
            reconnect_initial_backoff_ms: 100,
            reconnect_max_backoff_ms: 350,
            ..HsmSettings::default()
        };
        let c = Connections::new(Arc::default(), settings, false);
        let ms = |n| Duration::from_millis(n);
        assert!(!c.attach_backing_off("cks-1"), "no failure yet");
        c.note_attach("cks-1", false);
        let t = std::time::Instant::now();
        assert!(c.attach_backing_off_at("cks-1", t + ms(90)));
        assert!(!c.attach_backing_off_at("cks-1", t + ms(110)));
        c.note_attach("cks-1", false);
        let t = std::time::Instant::now();
        assert!(c.attach_backing_off_at("cks-1", t + ms(190)), "doubled");
        assert!(!c.attach_backing_off_at("cks-1", t + ms(210)));
        for _ in 0..5 {
            c.note_attach("cks-1", false);
        }
        let t = std::time::Instant::now();
        assert!(c.attach_backing_off_at("cks-1", t + ms(340)));
        assert!(!c.attach_backing_off_at("cks-1", t + ms(360)), "capped");
        assert!(!c.attach_backing_off("cks-2"), "per store");
        c.note_attach("cks-1", true);
        assert!(!c.attach_backing_off("cks-1"), "a success clears it");
    }
}
