//! hsm-kms's own operations for operators (the console's views; not in the AWS KMS API):
//! who the caller is, each store's health as this replica sees it, and the newest lines
//! of this replica's audit trail that name a key. Each is authorized by the gate like any
//! other operation (`Op::scope`): GetCallerIdentity needs no permission,
//! DescribeCustomKeyStoreHealth needs `kms:DescribeCustomKeyStoreHealth` (identity
//! policies), ListKeyAuditEvents needs `kms:ListKeyAuditEvents` on the key (its key policy).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::gate::Authorized;
use super::Kms;
use crate::metadata::KeyStoreRecord;
use model::error::{KmsError, KmsResult};

/// One store's health on this replica.
pub struct StoreHealth {
    pub store: KeyStoreRecord,
    /// HEALTHY, DEGRADED (CONNECTED, its HSM failed and this replica reconnects), or the
    /// connection state of a store that is not connected.
    pub health: &'static str,
    pub requests: u64,
    pub throttled: u64,
    pub hsm_errors: u64,
    /// (sessions, busy sessions) of this replica's connection.
    pub sessions: (usize, usize),
}

/// One audit line, as the trail wrote it.
pub struct AuditEvent {
    pub time: String,
    pub request_id: String,
    pub principal: Option<String>,
    pub source: Option<String>,
    pub operation: String,
    pub outcome: String,
    pub error: Option<String>,
}

/// How much of the trail's end ListKeyAuditEvents reads at most.
const AUDIT_TAIL: u64 = 8 * 1024 * 1024;

impl Kms {
    /// The caller's principal ARN and account, and the service's region.
    pub fn caller_identity(&self, auth: &Authorized<'_>) -> (String, String, String) {
        let p = &auth.caller().principal;
        (p.arn.clone(), p.account.clone(), self.scope.region.clone())
    }

    /// This replica's id (as its audit lines and heartbeats name it).
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// When this replica started counting.
    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// The health of one store (CustomKeyStoreNotFoundException if it does not exist) or of
    /// every store.
    pub async fn keystore_health(
        &self,
        _auth: &Authorized<'_>,
        id: Option<&str>,
    ) -> KmsResult<Vec<StoreHealth>> {
        let stores = match id {
            Some(id) => vec![self.keystore(id).await?],
            None => self.all_keystores().await,
        };
        Ok(stores
            .into_iter()
            .map(|store| {
                let (state, conn) = self.store_state(&store);
                let health = match state {
                    "CONNECTED" => "HEALTHY",
                    other => other,
                };
                let (requests, throttled, hsm_errors) =
                    crate::metrics::get().store_counts(&store.id);
                StoreHealth {
                    health,
                    requests,
                    throttled,
                    hsm_errors,
                    sessions: conn.map(|c| c.pool()).unwrap_or((0, 0)),
                    store,
                }
            })
            .collect())
    }

    /// The newest `limit` lines of this replica's audit trail that name the authorized key,
    /// newest first, and whether older lines were left unread.
    pub async fn key_audit_events(
        &self,
        auth: &Authorized<'_>,
        limit: usize,
    ) -> KmsResult<(Vec<AuditEvent>, bool)> {
        let arn = self.scope.key_arn(&auth.key()?.id);
        let Some(file) = self.audit_file.clone() else {
            return Ok((Vec::new(), false));
        };
        tokio::task::spawn_blocking(move || audit_lines_naming(&file, &arn, limit))
            .await
            .map_err(KmsError::internal)?
    }
}

/// Reads the end of the trail (at most `AUDIT_TAIL` bytes, from a line's start) and keeps the
/// newest `limit` lines whose resources include `arn`.
fn audit_lines_naming(file: &Path, arn: &str, limit: usize) -> KmsResult<(Vec<AuditEvent>, bool)> {
    let read = || -> std::io::Result<(Vec<u8>, bool)> {
        let mut f = std::fs::File::open(file)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(AUDIT_TAIL);
        f.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::with_capacity((len - start) as usize);
        f.take(AUDIT_TAIL).read_to_end(&mut tail)?;
        if start > 0 {
            // The first line read may be cut: start after it.
            let cut = tail
                .iter()
                .position(|b| *b == b'\n')
                .map_or(tail.len(), |i| i + 1);
            tail.drain(..cut);
        }
        Ok((tail, start > 0))
    };
    let (tail, truncated) = match read() {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(KmsError::internal(format!("reading the audit trail: {e}"))),
    };
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(String::from);
    let events = tail
        .split(|b| *b == b'\n')
        .rev()
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter(|v| {
            v.get("resources")
                .and_then(|r| r.as_array())
                .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(arn)))
        })
        .take(limit)
        .map(|v| AuditEvent {
            time: text(&v, "time").unwrap_or_default(),
            request_id: text(&v, "request_id").unwrap_or_default(),
            principal: text(&v, "principal"),
            source: text(&v, "source"),
            operation: text(&v, "operation").unwrap_or_default(),
            outcome: text(&v, "outcome").unwrap_or_default(),
            error: text(&v, "error"),
        })
        .collect();
    Ok((events, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_lines_naming_the_key_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let arn = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let line = |seq: u32, op: &str, res: &str| {
            format!(
                "{{\"seq\":{seq},\"time\":\"t{seq}\",\"request_id\":\"r{seq}\",\"principal\":\"p\",\
                 \"operation\":\"{op}\",\"resources\":[\"{res}\"],\"outcome\":\"allowed\",\"error\":null}}\n"
            )
        };
        let mut text = String::new();
        for seq in 0..10 {
            let res = if seq % 2 == 0 {
                arn
            } else {
                "arn:aws:kms:us-east-1:111122223333:key/k2"
            };
            text.push_str(&line(seq, "Encrypt", res));
        }
        // A key ARN that merely starts with the asked one is another key.
        text.push_str(&line(10, "Decrypt", &format!("{arn}0")));
        std::fs::write(&file, text).unwrap();
        let (events, truncated) = audit_lines_naming(&file, arn, 3).unwrap();
        assert!(!truncated);
        let ids: Vec<_> = events.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(ids, ["r8", "r6", "r4"]);
        assert_eq!(events[0].error, None);
        let (none, _) = audit_lines_naming(&dir.path().join("absent"), arn, 3).unwrap();
        assert!(none.is_empty());
    }
}
