//! A replica's cache of the rows every cryptographic request reads (its key, the key's
//! store, the key's grants), kept true by PostgreSQL's LISTEN/NOTIFY.
//!
//! Triggers on the three tables send `NOTIFY hsm_kms, '<k|s|g>:<id>'` in the transaction
//! that changes a row, so a committed change is announced once and a rolled-back one never.
//! Each replica holds one extra connection that LISTENs and drops the entries named.
//!
//! Fail closed: the cache is used only while the listener is known to be up to date. It
//! pings itself through its own channel every `PING`, and serves (and fills) entries only
//! while it has heard one of its own pings that it sent less than `FENCE` ago. PostgreSQL
//! delivers notifications in commit order, so such a replica has applied every change
//! committed before that ping was sent: a change acknowledged `FENCE` after its commit
//! (`Metadata::revocation_fence`; the request path waits that long before answering a
//! change that takes access away) is in force on every replica that still serves from its
//! cache, and a replica that cannot confirm so reads the database instead. A listener that
//! heard nothing at all for `SILENCE` counts as down (readiness; it empties the cache), and
//! is connected again after `RECONNECT_AFTER`. A change this replica makes itself empties
//! the cache at once, without waiting for its notification. Entries also expire after
//! `TTL`, a backstop for what nothing above catches.
//!
//! A fill races a change: the row is read, then a notification drops an entry that is not
//! there yet, then the stale row is put in. So a fill is kept only if no invalidation came
//! between its start (`generation`) and its end.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::metadata::{GrantRecord, KeyRecord, KeyStoreRecord};

/// The channel the triggers notify.
pub(super) const CHANNEL: &str = "hsm_kms";
/// How often the listener pings itself.
const PING: Duration = Duration::from_millis(50);
/// Entries are served only while the listener has heard a ping of its own sent less than
/// this long ago; a change that takes access away is acknowledged this long after its
/// commit.
pub(super) const FENCE: Duration = Duration::from_millis(200);
/// A listener that heard nothing for this long is not trusted.
const SILENCE: Duration = Duration::from_secs(2);
/// A listener silent for this long is dropped and connected again.
const RECONNECT_AFTER: Duration = Duration::from_secs(10);
/// An entry older than this is read again, whatever the listener says.
const TTL: Duration = Duration::from_secs(5);

type Map<K, V> = RwLock<HashMap<K, (Instant, V)>>;

#[derive(Default)]
pub(super) struct Cache {
    keys: Map<Uuid, KeyRecord>,
    keystores: Map<String, KeyStoreRecord>,
    grants: Map<Uuid, Arc<Vec<GrantRecord>>>,
    /// Bumped by every invalidation.
    generation: AtomicU64,
    /// When the listener last heard its channel; none while it is not listening.
    heard: Mutex<Option<Instant>>,
    /// Its own pings: what tells them from other replicas' (`ping/<nonce>/<n>`), those sent
    /// and not yet heard (number, when sent), and when the last one heard was sent.
    nonce: std::sync::OnceLock<u64>,
    pings: Mutex<Pings>,
}

#[derive(Default)]
struct Pings {
    next: u64,
    sent: std::collections::VecDeque<(u64, Instant)>,
    fresh: Option<Instant>,
}

fn get<K: Eq + Hash, V: Clone>(map: &Map<K, V>, k: &K) -> Option<V> {
    let m = map.read().unwrap_or_else(|p| p.into_inner());
    m.get(k)
        .filter(|(at, _)| at.elapsed() < TTL)
        .map(|(_, v)| v.clone())
}

impl Cache {
    /// Whether entries may be used (and filled): the listener has heard a ping of its own
    /// sent less than `FENCE` ago, so every change committed before then is applied.
    fn fresh(&self) -> bool {
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fresh
            .is_some_and(|sent| sent.elapsed() < FENCE)
    }

    #[cfg(test)]
    pub fn is_fresh(&self) -> bool {
        self.fresh()
    }

    fn nonce(&self) -> u64 {
        *self.nonce.get_or_init(|| {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        })
    }

    /// The payload of the next ping, noted as sent now.
    fn ping(&self) -> String {
        let mut p = self.pings.lock().unwrap_or_else(|p| p.into_inner());
        let n = p.next;
        p.next += 1;
        let now = Instant::now();
        // Pings lost with a connection are not waited for past the reconnect limit.
        while p
            .sent
            .front()
            .is_some_and(|(_, at)| now - *at > RECONNECT_AFTER)
        {
            p.sent.pop_front();
        }
        p.sent.push_back((n, now));
        format!("ping/{:x}/{n}", self.nonce())
    }

    /// A ping heard: if it is one of ours, everything committed before it was sent is
    /// applied.
    fn pinged(&self, payload: &str) {
        let mut parts = payload.split('/').skip(1);
        let (Some(nonce), Some(n)) = (parts.next(), parts.next()) else {
            return;
        };
        if u64::from_str_radix(nonce, 16).ok() != Some(self.nonce()) {
            return; // another replica's
        }
        let Ok(n) = n.parse::<u64>() else { return };
        let mut p = self.pings.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(m, at)) = p.sent.front() {
            if m > n {
                break;
            }
            p.sent.pop_front();
            if m == n {
                p.fresh = Some(p.fresh.map_or(at, |f| f.max(at)));
            }
        }
    }

    /// Whether the listener is up: it heard its channel within `SILENCE` (readiness).
    pub fn listening(&self) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < SILENCE)
    }

    fn heard_now(&self) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Take before reading a row to fill with; hand back to `put_*`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn key(&self, id: &Uuid) -> Option<KeyRecord> {
        self.fresh().then(|| get(&self.keys, id)).flatten()
    }

    pub fn keystore(&self, id: &str) -> Option<KeyStoreRecord> {
        self.fresh()
            .then(|| get(&self.keystores, &id.to_string()))
            .flatten()
    }

    pub fn grants(&self, key: &Uuid) -> Option<Arc<Vec<GrantRecord>>> {
        self.fresh().then(|| get(&self.grants, key)).flatten()
    }

    fn put<K: Eq + Hash, V>(&self, map: &Map<K, V>, since: u64, k: K, v: V) {
        let mut m = map.write().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock that invalidations also take.
        if self.fresh() && self.generation() == since {
            m.insert(k, (Instant::now(), v));
        }
    }

    pub fn put_key(&self, since: u64, rec: &KeyRecord) {
        self.put(&self.keys, since, rec.id, rec.clone());
    }

    pub fn put_keystore(&self, since: u64, rec: &KeyStoreRecord) {
        self.put(&self.keystores, since, rec.id.clone(), rec.clone());
    }

    pub fn put_grants(&self, since: u64, key: Uuid, grants: &Arc<Vec<GrantRecord>>) {
        self.put(&self.grants, since, key, Arc::clone(grants));
    }

    /// Drops everything (a change made here; the listener lost).
    pub fn forget_all(&self) {
        let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut s = self.keystores.write().unwrap_or_else(|p| p.into_inner());
        let mut g = self.grants.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        k.clear();
        s.clear();
        g.clear();
    }

    /// Applies one notification's payload.
    fn notified(&self, payload: &str) {
        self.heard_now();
        if payload.starts_with("ping") {
            self.pinged(payload);
            return;
        }
        let Some((table, id)) = payload.split_once(':') else {
            return;
        };
        fn drop_one<K: Eq + Hash, V>(c: &Cache, map: &Map<K, V>, k: Option<K>) {
            let mut m = map.write().unwrap_or_else(|p| p.into_inner());
            c.generation.fetch_add(1, Ordering::AcqRel);
            match k {
                Some(k) => {
                    m.remove(&k);
                }
                None => m.clear(),
            }
        }
        match table {
            "k" => drop_one(self, &self.keys, Uuid::parse_str(id).ok()),
            "s" => drop_one(self, &self.keystores, Some(id.to_string())),
            "g" => drop_one(self, &self.grants, Uuid::parse_str(id).ok()),
            _ => self.forget_all(),
        }
    }

    fn stopped_listening(&self) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.pings.lock().unwrap_or_else(|p| p.into_inner()).fresh = None;
        self.forget_all();
    }
}

/// Keeps one connection LISTENing on `CHANNEL` for as long as `cache` is held elsewhere,
/// connecting again (with back-off) whenever it is lost or falls silent.
pub(super) fn spawn_listener(config: tokio_postgres::Config, tls: super::Tls, cache: &Arc<Cache>) {
    let cache = Arc::downgrade(cache);
    tokio::spawn(async move {
        let first = Duration::from_millis(100);
        let mut backoff = first;
        loop {
            let began = Instant::now();
            let outcome = match &tls {
                super::Tls::Off => listen(&config, tokio_postgres::NoTls, &cache).await,
                super::Tls::Verified(t) => listen(&config, t.clone(), &cache).await,
            };
            let Some(c) = cache.upgrade() else { return };
            c.stopped_listening();
            drop(c);
            match outcome {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    error = %e,
                    "the metadata change listener is down; reading the database on every request until it is back"
                ),
            }
            // A listener that had been up a while starts its back-off afresh.
            if began.elapsed() > RECONNECT_AFTER {
                backoff = first;
            }
            tokio::time::sleep(backoff).await;
            // At most a second: service (and readiness) come back soon after the database.
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    });
}

/// One listening connection, until it fails (Err) or the cache is gone (Ok).
async fn listen<T>(
    config: &tokio_postgres::Config,
    tls: T,
    cache: &std::sync::Weak<Cache>,
) -> anyhow::Result<()>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let mut config = config.clone();
    config.application_name("hsm-kms-listener");
    let (client, mut connection) = config.connect(tls).await?;
    // The connection delivers notifications only while it is polled.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the listener's connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let client = Arc::new(client);
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Whatever changed before LISTEN took effect was not heard: start empty.
        match cache.upgrade() {
            Some(c) => {
                c.forget_all();
                c.heard_now();
            }
            None => return Ok(()),
        }
        tracing::info!("metadata change listener up; caching key, store and grant rows");
        let mut ping = tokio::time::interval(PING);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                n = rx.recv() => {
                    let Some(payload) = n else {
                        anyhow::bail!("the listener's connection closed");
                    };
                    let Some(c) = cache.upgrade() else { return Ok(()) };
                    c.notified(&payload);
                    last = Instant::now();
                }
                _ = ping.tick() => {
                    if last.elapsed() > RECONNECT_AFTER {
                        anyhow::bail!("the listener heard nothing for {RECONNECT_AFTER:?}");
                    }
                    let Some(c) = cache.upgrade() else { return Ok(()) };
                    let payload = c.ping();
                    let client = Arc::clone(&client);
                    // Not awaited here: a stalled server must not stall the receiving.
                    tokio::spawn(async move {
                        let _ = client
                            .batch_execute(&format!("NOTIFY {CHANNEL}, '{payload}'"))
                            .await;
                    });
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(state: model::states::KeyState) -> KeyRecord {
        KeyRecord {
            id: Uuid::nil(),
            custom_key_store_id: "cks-1".into(),
            creation_date_ms: 0,
            description: String::new(),
            key_state: state,
            deletion_date_ms: None,
            pending_window_days: None,
            policy: None,
        }
    }

    /// Not listening: nothing is kept or served. A fill that raced a notification is
    /// dropped, and a notification drops its row.
    #[test]
    fn entries_live_only_while_the_listener_hears() {
        use model::states::KeyState::*;
        let c = Cache::default();
        c.put_key(c.generation(), &key(Enabled));
        assert!(c.key(&Uuid::nil()).is_none(), "filled while not listening");
        c.heard_now();
        let ping = c.ping();
        c.notified(&ping);
        let since = c.generation();
        c.notified(&format!("k:{}", Uuid::nil()));
        c.put_key(since, &key(Enabled));
        assert!(
            c.key(&Uuid::nil()).is_none(),
            "a fill that raced a change was kept"
        );
        c.put_key(c.generation(), &key(Enabled));
        assert_eq!(c.key(&Uuid::nil()).map(|k| k.key_state), Some(Enabled));
        c.notified(&format!("k:{}", Uuid::nil()));
        assert!(c.key(&Uuid::nil()).is_none(), "a notified row stayed");
        c.put_key(c.generation(), &key(Disabled));
        c.stopped_listening();
        assert!(c.key(&Uuid::nil()).is_none(), "served while not listening");
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    /// Entries are served only while a ping of this cache's own, sent less than FENCE ago,
    /// has come back: other replicas' pings, and old ones, do not count.
    #[test]
    fn the_cache_serves_only_within_the_fence_of_its_own_pings() {
        let c = Cache::default();
        c.heard_now();
        assert!(!c.fresh(), "fresh before any ping came back");
        let first = c.ping();
        c.notified("ping/0/0"); // another replica's
        c.notified("ping"); // an older replica's
        assert!(!c.fresh(), "fresh on another replica's ping");
        let second = c.ping();
        c.notified(&second);
        assert!(c.fresh(), "not fresh on its own ping");
        // The first ping, heard late, does not move the fence back.
        c.notified(&first);
        std::thread::sleep(FENCE);
        assert!(!c.fresh(), "fresh on a ping sent more than FENCE ago");
        let late = c.ping();
        std::thread::sleep(FENCE);
        c.notified(&late);
        assert!(
            !c.fresh(),
            "fresh on a ping that took longer than FENCE to come back"
        );
        let third = c.ping();
        c.notified(&third);
        assert!(c.fresh());
        c.stopped_listening();
        assert!(!c.fresh());
    }
}
