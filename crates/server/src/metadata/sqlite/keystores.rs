//! Custom key store rows.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{bad_column, read, taken, write, Forget, Sqlite, NOW_MS};
use crate::metadata::{
    AuditHead, Failure, KeyStoreRecord, KeyStoreUpdate, KeyStores, MetaResult, Precondition, Unique,
};
use model::states::{ConnectionErrorCode, ConnectionState};

use super::q;
use crate::metadata::sql;

/// The unique columns of the table, and what each one means.
const UNIQUE: &[(&str, Unique)] = &[
    ("custom_key_stores.name", Unique::KeyStoreName),
    ("custom_key_stores.cluster_id", Unique::KeyStoreCluster),
];

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyStoreRecord> {
    let state: String = r.get(5)?;
    let code: Option<String> = r.get(6)?;
    Ok(KeyStoreRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        cluster_id: r.get(2)?,
        trust_anchor: r.get(3)?,
        sealed_password: r.get(4)?,
        connection_state: ConnectionState::parse(&state)
            .ok_or_else(|| bad_column(5, "a connection state"))?,
        connection_error_code: code
            .map(|c| ConnectionErrorCode::parse(&c).ok_or_else(|| bad_column(6, "an error code")))
            .transpose()?,
        creation_date_ms: r.get(7)?,
    })
}

fn connection_state(c: &Connection, id: &str) -> rusqlite::Result<Option<ConnectionState>> {
    let s: Option<String> = c
        .query_row(&q(sql::KEYSTORE_STATE), [id], |r| r.get(0))
        .optional()?;
    s.map(|s| ConnectionState::parse(&s).ok_or_else(|| bad_column(0, "a connection state")))
        .transpose()
}

#[async_trait]
impl KeyStores for Sqlite {
    async fn insert_keystore(&self, rec: &KeyStoreRecord) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, &rec.id);
        self.raw(|c| {
            c.execute(
                &q(sql::INSERT_KEYSTORE),
                params![
                    rec.id,
                    rec.name,
                    rec.cluster_id,
                    rec.trust_anchor,
                    rec.sealed_password,
                    rec.connection_state.as_str(),
                    rec.connection_error_code.map(|c| c.as_str()),
                    rec.creation_date_ms
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| taken(e, UNIQUE))
    }

    async fn keystore(&self, id: &str) -> MetaResult<Option<KeyStoreRecord>> {
        if let Some(r) = read(&self.keystores).get(id) {
            return Ok(Some(r.clone()));
        }
        self.with(|c| {
            let r = c
                .prepare_cached(&q(sql::KEYSTORE_BY_ID))?
                .query_row([id], row)
                .optional()?;
            if let Some(r) = &r {
                write(&self.keystores).insert(id.to_string(), r.clone());
            }
            Ok(r)
        })
    }

    async fn keystore_by_name(&self, name: &str) -> MetaResult<Option<KeyStoreRecord>> {
        self.with(|c| {
            c.query_row(&q(sql::KEYSTORE_BY_NAME), [name], row)
                .optional()
        })
    }

    async fn list_keystores(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<KeyStoreRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&q(sql::KEYSTORES_PAGE))?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], row)?;
            rows.collect()
        })
    }

    async fn transition_keystore(
        &self,
        id: &str,
        from: &[ConnectionState],
        to: ConnectionState,
        error_code: Option<ConnectionErrorCode>,
    ) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, id);
        self.with(|c| {
            let tx = c.transaction()?;
            let outcome = match connection_state(&tx, id)? {
                None => Err(Failure::NotFound),
                Some(s) if !from.contains(&s) => {
                    Err(Failure::Precondition(Precondition::ConnectionState(s)))
                }
                Some(_) => {
                    tx.execute(
                        &format!(
                            "UPDATE custom_key_stores SET connection_state = ?2,
                                 connection_error_code = ?3, state_since_ms = {NOW_MS}
                             WHERE id = ?1"
                        ),
                        params![id, to.as_str(), error_code.map(|c| c.as_str())],
                    )?;
                    Ok(())
                }
            };
            tx.commit()?;
            Ok(outcome)
        })?
    }

    async fn abandon_transition(
        &self,
        id: &str,
        from: ConnectionState,
        older_than_ms: i64,
    ) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, id);
        let n = self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE custom_key_stores SET connection_state = {disconnected},
                         connection_error_code = NULL, state_since_ms = {NOW_MS}
                     WHERE id = ?1 AND connection_state = ?2 AND state_since_ms < {NOW_MS} - ?3",
                    disconnected = sql::lit(ConnectionState::Disconnected.as_str()),
                ),
                params![id, from.as_str(), older_than_ms],
            )
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(Failure::Precondition(Precondition::ConnectionState(from)))
        }
    }

    async fn update_keystore(&self, id: &str, update: &KeyStoreUpdate) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, id);
        self.raw(|c| {
            let tx = c.transaction()?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM custom_key_stores WHERE id = ?1",
                    [id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !exists {
                return Ok(Err(Failure::NotFound));
            }
            if let Some(n) = &update.name {
                tx.execute(
                    "UPDATE custom_key_stores SET name = ?2 WHERE id = ?1",
                    params![id, n],
                )?;
            }
            if let Some(cl) = &update.cluster_id {
                tx.execute(
                    "UPDATE custom_key_stores SET cluster_id = ?2 WHERE id = ?1",
                    params![id, cl],
                )?;
            }
            if let Some(p) = &update.sealed_password {
                tx.execute(
                    // The password the caller gives is the token's now: a pending one from an
                    // unfinished rotation is stale.
                    "UPDATE custom_key_stores SET sealed_password = ?2, pending_password = NULL
                     WHERE id = ?1",
                    params![id, p],
                )?;
            }
            tx.commit()?;
            Ok(Ok(()))
        })
        .map_err(|e| taken(e, UNIQUE))?
    }

    async fn delete_keystore(&self, id: &str, only_in: ConnectionState) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, id);
        self.with(|c| {
            let tx = c.transaction()?;
            let outcome = match connection_state(&tx, id)? {
                None => Err(Failure::NotFound),
                Some(s) if s != only_in => {
                    Err(Failure::Precondition(Precondition::ConnectionState(s)))
                }
                Some(_) => {
                    let keys: i64 =
                        tx.query_row(&q(sql::COUNT_KEYS_OF_KEYSTORE), [id], |r| r.get(0))?;
                    if keys > 0 {
                        Err(Failure::Precondition(Precondition::KeyStoreHasKeys(
                            keys as u64,
                        )))
                    } else {
                        tx.execute(&q(sql::DELETE_KEYSTORE), [id])?;
                        Ok(())
                    }
                }
            };
            tx.commit()?;
            Ok(outcome)
        })?
    }

    async fn set_pending_password(&self, id: &str, sealed: Option<&[u8]>) -> MetaResult<()> {
        self.with(|c| c.execute(&q(sql::SET_PENDING_PASSWORD), params![id, sealed]))
            .and_then(|n| {
                if n == 1 {
                    Ok(())
                } else {
                    Err(Failure::NotFound)
                }
            })
    }

    async fn pending_password(&self, id: &str) -> MetaResult<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(&q(sql::PENDING_PASSWORD), [id], |r| r.get(0))
                .optional()
                .map(Option::flatten)
        })
    }

    async fn promote_pending_password(&self, id: &str) -> MetaResult<()> {
        let _forget = Forget::KeyStore(self, id);
        self.with(|c| {
            c.execute(&q(sql::PROMOTE_PENDING_PASSWORD), [id])
                .map(|_| ())
        })
    }

    async fn sealing_check(&self, candidate: &[u8]) -> MetaResult<Vec<u8>> {
        self.with(|c| {
            c.execute(&q(sql::INSERT_SEALING_CHECK), [candidate])?;
            c.query_row(&q(sql::SEALING_CHECK), [], |r| r.get(0))
        })
    }

    async fn heartbeat(&self, replica: &str, now_ms: i64, live_ms: i64) -> MetaResult<u32> {
        self.with(|c| {
            c.execute(&q(sql::UPSERT_REPLICA), params![replica, now_ms])?;
            c.execute(&q(sql::DELETE_STALE_REPLICAS), [now_ms - 10 * live_ms])?;
            c.query_row(&q(sql::COUNT_LIVE_REPLICAS), [now_ms - live_ms], |r| {
                r.get::<_, u32>(0)
            })
        })
    }

    async fn leave(&self, replica: &str) -> MetaResult<()> {
        self.with(|c| c.execute(&q(sql::DELETE_REPLICA), [replica]))
            .map(drop)
    }

    async fn clock_ms(&self) -> MetaResult<i64> {
        // One node: its own clock is the database's.
        Ok(model::now_ms())
    }

    async fn record_audit_head(&self, h: &AuditHead) -> MetaResult<()> {
        self.with(|c| {
            c.execute(
                &q(sql::UPSERT_AUDIT_HEAD),
                params![h.replica, h.seq as i64, h.head, h.recorded_ms],
            )
            .map(drop)
        })
    }

    async fn audit_heads(&self) -> MetaResult<Vec<AuditHead>> {
        self.with(|c| {
            let mut q = c.prepare(&q(sql::AUDIT_HEADS))?;
            let rows = q.query_map([], |r| {
                Ok(AuditHead {
                    replica: r.get(0)?,
                    seq: r.get::<_, i64>(1)?.max(0) as u64,
                    head: r.get(2)?,
                    recorded_ms: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }
}
