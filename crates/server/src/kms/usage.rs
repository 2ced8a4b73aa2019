//! GetKeyLastUsage: each key's last successful cryptographic use.
//!
//! The request path notes a use in memory (`Tracker::note`: one lock, one map insert, no
//! I/O), and a background task writes what was noted since its last turn every
//! `FLUSH_INTERVAL`, in one transaction (`spawn_usage_flusher`); shutdown writes the rest.
//! A key used ten thousand times between two turns costs one row write. The database keeps
//! each key's newest use whichever replica wrote it, so replicas share it; a reader adds
//! what this replica has noted and not yet written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::gate::Authorized;
use super::Kms;
use crate::metadata::KeyUsage;
use model::error::KmsResult;
use model::op::Op;

/// How often noted uses are written to the metadata database.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A use as noted on the request path: nothing formatted until it is written.
#[derive(Clone, Copy)]
struct Use {
    op: Op,
    used_ms: i64,
    request_id: Uuid,
}

impl Use {
    fn record(self, key: Uuid) -> KeyUsage {
        KeyUsage {
            key_id: key,
            operation: self.op.name().to_string(),
            used_ms: self.used_ms,
            request_id: self.request_id.to_string(),
        }
    }
}

/// Uses noted and not yet written, newest per key.
#[derive(Default)]
pub struct Tracker {
    pending: Mutex<HashMap<Uuid, Use>>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Use>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a successful use of `key` by `op` at `now_ms`, answered as request `request_id`.
    pub fn note(&self, key: Uuid, op: Op, request_id: Uuid, now_ms: i64) {
        self.keep_newest(
            key,
            Use {
                op,
                used_ms: now_ms,
                request_id,
            },
        );
    }

    fn keep_newest(&self, key: Uuid, u: Use) {
        let mut pending = self.lock();
        match pending.get(&key) {
            Some(have) if have.used_ms > u.used_ms => {}
            _ => {
                pending.insert(key, u);
            }
        }
    }

    fn take(&self) -> Vec<KeyUsage> {
        std::mem::take(&mut *self.lock())
            .into_iter()
            .map(|(key, u)| u.record(key))
            .collect()
    }

    /// Puts back uses a failed write did not record (a newer one noted meanwhile wins).
    fn put_back(&self, uses: Vec<KeyUsage>) {
        for u in uses {
            let Some(op) = Op::parse(&u.operation) else {
                continue;
            };
            let request_id = u.request_id.parse().unwrap_or_default();
            self.keep_newest(
                u.key_id,
                Use {
                    op,
                    used_ms: u.used_ms,
                    request_id,
                },
            );
        }
    }

    fn pending(&self, key: &Uuid) -> Option<KeyUsage> {
        self.lock().get(key).map(|u| u.record(*key))
    }
}

/// What GetKeyLastUsage answers.
pub struct LastUsage {
    pub key_id: Uuid,
    pub last: Option<KeyUsage>,
    pub tracking_start_ms: i64,
    pub key_creation_ms: i64,
}

impl Kms {
    /// Notes a successful cryptographic use of each of `keys` (the request path calls it
    /// once the request's audit line is written).
    pub fn note_key_use(&self, keys: &[Uuid], op: Op, request_id: Uuid) {
        let now = model::now_ms();
        for key in keys {
            self.usage.note(*key, op, request_id, now);
        }
    }

    /// Writes the uses noted since the last write. On a database error they are kept for
    /// the next turn (a newer use noted meanwhile wins).
    pub async fn flush_key_usage(&self) {
        let uses = self.usage.take();
        if uses.is_empty() {
            return;
        }
        if let Err(e) = self.meta.record_key_usage(&uses).await {
            tracing::warn!(error = %e, keys = uses.len(), "recording key usage failed; will retry");
            self.usage.put_back(uses);
        }
    }

    /// Runs `flush_key_usage` every `FLUSH_INTERVAL` until the process ends.
    pub fn spawn_usage_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.spawn_every(
            FLUSH_INTERVAL,
            |kms| async move { kms.flush_key_usage().await },
        )
    }

    /// GetKeyLastUsage of the key its authorization found.
    pub async fn key_last_usage(&self, auth: &Authorized<'_>) -> KmsResult<LastUsage> {
        let key = auth.key()?;
        let (stored, started_ms) = self.meta.key_usage(&key.id).await?;
        let last = match (stored, self.usage.pending(&key.id)) {
            (Some(s), Some(p)) => Some(if p.used_ms >= s.used_ms { p } else { s }),
            (s, p) => s.or(p),
        };
        Ok(LastUsage {
            key_id: key.id,
            last,
            tracking_start_ms: started_ms.max(key.creation_date_ms),
            key_creation_ms: key.creation_date_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_use_of_each_key_is_kept() {
        let t = Tracker::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let r = Uuid::new_v4();
        t.note(a, Op::Encrypt, r, 10);
        t.note(a, Op::Decrypt, r, 20);
        t.note(a, Op::GenerateDataKey, r, 15);
        t.note(b, Op::ReEncrypt, r, 5);
        assert_eq!(t.pending(&a).unwrap().operation, "Decrypt");
        let mut all = t.take();
        all.sort_by_key(|u| u.used_ms);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].key_id, all[0].used_ms), (b, 5));
        assert!(t.take().is_empty());
        // A failed write puts its uses back, without undoing a newer one noted meanwhile.
        t.note(a, Op::Encrypt, r, 30);
        t.put_back(vec![all[1].clone(), all[0].clone()]);
        assert_eq!(t.pending(&a).unwrap().used_ms, 30);
        assert_eq!(t.pending(&b).unwrap().operation, "ReEncrypt");
        assert_eq!(t.pending(&b).unwrap().request_id, r.to_string());
    }
}
