//! Custom key store rows.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{bad, internal, one, taken, Postgres, NOW_MS};
use crate::metadata::{
    AuditHead, Failure, KeyStoreRecord, KeyStoreUpdate, KeyStores, MetaResult, Precondition, Unique,
};
use model::states::{ConnectionErrorCode, ConnectionState};

use crate::metadata::sql;

/// The unique constraints of the table, and what each one means.
const UNIQUE: &[(&str, Unique)] = &[
    ("keystore_name_taken", Unique::KeyStoreName),
    ("keystore_cluster_taken", Unique::KeyStoreCluster),
];

fn row(r: &Row) -> MetaResult<KeyStoreRecord> {
    let state: &str = r.get(5);
    let code: Option<&str> = r.get(6);
    Ok(KeyStoreRecord {
        id: r.get(0),
        name: r.get(1),
        cluster_id: r.get(2),
        trust_anchor: r.get(3),
        sealed_password: r.get(4),
        connection_state: ConnectionState::parse(state).ok_or_else(|| bad("a connection state"))?,
        connection_error_code: code
            .map(|c| ConnectionErrorCode::parse(c).ok_or_else(|| bad("an error code")))
            .transpose()?,
        creation_date_ms: r.get(7),
    })
}

impl Postgres {
    /// The store's connection state, for a change that touched no row; `NotFound` if absent.
    async fn connection_refusal(&self, id: &str) -> MetaResult<Failure> {
        let state = self
            .row(sql::KEYSTORE_STATE, &[&id], |r| {
                ConnectionState::parse(r.get(0)).ok_or_else(|| bad("a connection state"))
            })
            .await?;
        Ok(match state {
            Some(s) => Failure::Precondition(Precondition::ConnectionState(s)),
            None => Failure::NotFound,
        })
    }
}

#[async_trait]
impl KeyStores for Postgres {
    async fn insert_keystore(&self, rec: &KeyStoreRecord) -> MetaResult<()> {
        self.timed(async {
            let c = self.writer().await?;
            c.execute(
                sql::INSERT_KEYSTORE,
                &[
                    &rec.id,
                    &rec.name,
                    &rec.cluster_id,
                    &rec.trust_anchor,
                    &rec.sealed_password,
                    &rec.connection_state.as_str(),
                    &rec.connection_error_code.map(|c| c.as_str()),
                    &rec.creation_date_ms,
                ],
            )
            .await
            .map(drop)
            .map_err(|e| taken(e, UNIQUE))
        })
        .await
    }

    async fn keystore(&self, id: &str) -> MetaResult<Option<KeyStoreRecord>> {
        self.timed(async {
            if let Some(hit) = self.cache.keystore(id) {
                return Ok(Some(hit));
            }
            let since = self.cache.generation();
            let found = self.row(sql::KEYSTORE_BY_ID, &[&id], row).await?;
            if let Some(rec) = &found {
                self.cache.put_keystore(since, rec);
            }
            Ok(found)
        })
        .await
    }

    async fn keystore_by_name(&self, name: &str) -> MetaResult<Option<KeyStoreRecord>> {
        self.timed(async { self.row(sql::KEYSTORE_BY_NAME, &[&name], row).await })
            .await
    }

    async fn list_keystores(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<KeyStoreRecord>> {
        self.timed(async {
            self.rows(
                sql::KEYSTORES_PAGE,
                &[&after.unwrap_or(""), &(limit as i64)],
                row,
            )
            .await
        })
        .await
    }

    async fn transition_keystore(
        &self,
        id: &str,
        from: &[ConnectionState],
        to: ConnectionState,
        error_code: Option<ConnectionErrorCode>,
    ) -> MetaResult<()> {
        self.timed(async {
            let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
            let n = self
                .execute(
                    "UPDATE custom_key_stores SET connection_state = $3, connection_error_code = $4
                 WHERE id = $1 AND connection_state = ANY($2)",
                    &[&id, &from, &to.as_str(), &error_code.map(|c| c.as_str())],
                )
                .await?;
            if n == 1 {
                Ok(())
            } else {
                Err(self.connection_refusal(id).await?)
            }
        })
        .await
    }

    async fn abandon_transition(
        &self,
        id: &str,
        from: ConnectionState,
        older_than_ms: i64,
    ) -> MetaResult<()> {
        self.timed(async {
            let n = self
                .execute(
                    &format!(
                        "UPDATE custom_key_stores SET connection_state = {disconnected},
                         connection_error_code = NULL
                     WHERE id = $1 AND connection_state = $2 AND state_since_ms < {NOW_MS} - $3",
                        disconnected = sql::lit(ConnectionState::Disconnected.as_str()),
                    ),
                    &[&id, &from.as_str(), &older_than_ms],
                )
                .await?;
            if n == 1 {
                Ok(())
            } else {
                Err(Failure::Precondition(Precondition::ConnectionState(from)))
            }
        })
        .await
    }

    async fn update_keystore(&self, id: &str, update: &KeyStoreUpdate) -> MetaResult<()> {
        self.timed(async {
            let c = self.writer().await?;
            // The password the caller gives is the token's now: a pending one from an unfinished
            // rotation is stale.
            let n = c
                .execute(
                    "UPDATE custom_key_stores SET name = COALESCE($2, name),
                     cluster_id = COALESCE($3, cluster_id),
                     sealed_password = COALESCE($4, sealed_password),
                     pending_password = CASE WHEN $4::BYTEA IS NULL THEN pending_password END
                 WHERE id = $1",
                    &[
                        &id,
                        &update.name,
                        &update.cluster_id,
                        &update.sealed_password,
                    ],
                )
                .await
                .map_err(|e| taken(e, UNIQUE))?;
            one(n)
        })
        .await
    }

    async fn delete_keystore(&self, id: &str, only_in: ConnectionState) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            // The store's row locked: a key being inserted into it waits (its foreign key
            // check takes a share lock on this row), and so cannot slip past the count.
            let state = tx
                .query_opt(
                    "SELECT connection_state FROM custom_key_stores WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(internal)?;
            let Some(state) = state else {
                return Err(Failure::NotFound);
            };
            let state =
                ConnectionState::parse(state.get(0)).ok_or_else(|| bad("a connection state"))?;
            if state != only_in {
                return Err(Failure::Precondition(Precondition::ConnectionState(state)));
            }
            let keys: i64 = tx
                .query_one(sql::COUNT_KEYS_OF_KEYSTORE, &[&id])
                .await
                .map_err(internal)?
                .get(0);
            if keys > 0 {
                return Err(Failure::Precondition(Precondition::KeyStoreHasKeys(
                    keys as u64,
                )));
            }
            tx.execute(sql::DELETE_KEYSTORE, &[&id])
                .await
                .map_err(internal)?;
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn set_pending_password(&self, id: &str, sealed: Option<&[u8]>) -> MetaResult<()> {
        self.timed(async {
            one(self
                .execute(sql::SET_PENDING_PASSWORD, &[&id, &sealed])
                .await?)
        })
        .await
    }

    async fn pending_password(&self, id: &str) -> MetaResult<Option<Vec<u8>>> {
        self.timed(async {
            let c = self.client().await?;
            let r = c
                .query_opt(sql::PENDING_PASSWORD, &[&id])
                .await
                .map_err(internal)?;
            Ok(r.and_then(|r| r.get(0)))
        })
        .await
    }

    async fn promote_pending_password(&self, id: &str) -> MetaResult<()> {
        self.timed(async {
            self.execute(sql::PROMOTE_PENDING_PASSWORD, &[&id])
                .await
                .map(drop)
        })
        .await
    }

    async fn sealing_check(&self, candidate: &[u8]) -> MetaResult<Vec<u8>> {
        self.timed(async {
            self.execute(sql::INSERT_SEALING_CHECK, &[&candidate])
                .await?;
            self.row(sql::SEALING_CHECK, &[], |r| Ok(r.get(0)))
                .await?
                .ok_or_else(|| Failure::Internal("the sealing check value vanished".into()))
        })
        .await
    }

    async fn heartbeat(&self, replica: &str, now_ms: i64, live_ms: i64) -> MetaResult<u32> {
        self.timed(async {
            self.execute(sql::UPSERT_REPLICA, &[&replica, &now_ms])
                .await?;
            self.execute(sql::DELETE_STALE_REPLICAS, &[&(now_ms - 10 * live_ms)])
                .await?;
            let n = self
                .row(sql::COUNT_LIVE_REPLICAS, &[&(now_ms - live_ms)], |r| {
                    Ok(r.get::<_, i64>(0))
                })
                .await?
                .unwrap_or(1);
            Ok(n.clamp(1, i64::from(u32::MAX)) as u32)
        })
        .await
    }

    async fn leave(&self, replica: &str) -> MetaResult<()> {
        self.timed(async {
            self.execute(sql::DELETE_REPLICA, &[&replica])
                .await
                .map(drop)
        })
        .await
    }

    async fn clock_ms(&self) -> MetaResult<i64> {
        self.timed(async {
            self.row(
                "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
                &[],
                |r| Ok(r.get::<_, i64>(0)),
            )
            .await?
            .ok_or_else(|| Failure::Internal("the database did not tell the time".into()))
        })
        .await
    }

    async fn record_audit_head(&self, h: &AuditHead) -> MetaResult<()> {
        self.timed(async {
            self.execute(
                sql::UPSERT_AUDIT_HEAD,
                &[&h.replica, &(h.seq as i64), &h.head, &h.recorded_ms],
            )
            .await
            .map(drop)
        })
        .await
    }

    fn shared(&self) -> bool {
        true
    }

    fn revocation_fence(&self) -> std::time::Duration {
        super::cache::FENCE
    }

    fn cache_bypassed(&self) -> Option<&'static str> {
        (!self.listening()).then_some(
            "the metadata change listener (LISTEN hsm_kms) is down; every request reads the database",
        )
    }

    async fn audit_heads(&self) -> MetaResult<Vec<AuditHead>> {
        self.timed(async {
            self.rows(sql::AUDIT_HEADS, &[], |r| {
                Ok(AuditHead {
                    replica: r.get(0),
                    seq: r.get::<_, i64>(1).max(0) as u64,
                    head: r.get(2),
                    recorded_ms: r.get(3),
                })
            })
            .await
        })
        .await
    }
}
