//! Key rows and their tags.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{internal, key_refusal, lock_key, one, parse_id, parse_state, Postgres};
use crate::metadata::{Failure, KeyRecord, KeyUsage, Keys, MetaResult, Precondition, Removal};
use model::states::{KeyState, StateSet};

use crate::metadata::sql;

fn row(r: &Row) -> MetaResult<KeyRecord> {
    Ok(KeyRecord {
        id: parse_id(r.get(0))?,
        custom_key_store_id: r.get(1),
        creation_date_ms: r.get(2),
        description: r.get(3),
        key_state: parse_state(r.get(4))?,
        deletion_date_ms: r.get(5),
        pending_window_days: r.get(6),
        policy: r.get(7),
    })
}

impl Postgres {
    /// Makes `change` (one of `sql`'s key changes: `$1` the key id, then `args`) as one
    /// statement conditioned on the key's state; when it changes nothing, a read says why.
    async fn update_key_if(
        &self,
        id: &Uuid,
        accepted: StateSet,
        change: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<()> {
        let key = id.to_string();
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![&key];
        all.extend_from_slice(args);
        let c = self.writer().await?;
        let n = c
            .execute(&sql::if_key_in(change, accepted), &all)
            .await
            .map_err(internal)?;
        if n == 1 {
            Ok(())
        } else {
            Err(key_refusal(&c, id).await?)
        }
    }
}

#[async_trait]
impl Keys for Postgres {
    async fn insert_key(&self, rec: &KeyRecord, tags: &[(String, String)]) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            tx.execute(
                sql::INSERT_KEY,
                &[
                    &rec.id.to_string(),
                    &rec.custom_key_store_id,
                    &rec.creation_date_ms,
                    &rec.description,
                    &rec.key_state.as_str(),
                    &rec.policy,
                ],
            )
            .await
            .map_err(internal)?;
            for (k, v) in tags {
                tx.execute(sql::INSERT_TAG, &[&rec.id.to_string(), k, v])
                    .await
                    .map_err(internal)?;
            }
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn key(&self, id: &Uuid) -> MetaResult<Option<KeyRecord>> {
        self.timed(async {
            if let Some(hit) = self.cache.key(id) {
                return Ok(Some(hit));
            }
            let since = self.cache.generation();
            let found = self.row(sql::KEY_BY_ID, &[&id.to_string()], row).await?;
            if let Some(rec) = &found {
                self.cache.put_key(since, rec);
            }
            Ok(found)
        })
        .await
    }

    async fn list_keys(&self, after: Option<&Uuid>, limit: usize) -> MetaResult<Vec<KeyRecord>> {
        self.timed(async {
            let after = after.map(|u| u.to_string()).unwrap_or_default();
            self.rows(&sql::keys_page(), &[&after, &(limit as i64)], row)
                .await
        })
        .await
    }

    async fn abandoned_creations(
        &self,
        keystore_id: &str,
        before_ms: i64,
    ) -> MetaResult<Vec<Uuid>> {
        self.timed(async {
            self.rows(
                &sql::abandoned_creations(),
                &[&keystore_id, &before_ms],
                |r| parse_id(r.get(0)),
            )
            .await
        })
        .await
    }

    async fn set_key_state(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()> {
        self.timed(async {
            self.update_key_if(id, accepted, sql::SET_KEY_STATE, &[&to.as_str()])
                .await
        })
        .await
    }

    async fn delete_key(&self, id: &Uuid) -> MetaResult<()> {
        self.timed(async { one(self.execute(sql::DELETE_KEY, &[&id.to_string()]).await?) })
            .await
    }

    async fn set_description(
        &self,
        id: &Uuid,
        accepted: StateSet,
        description: &str,
    ) -> MetaResult<()> {
        self.timed(async {
            self.update_key_if(id, accepted, sql::SET_DESCRIPTION, &[&description])
                .await
        })
        .await
    }

    async fn set_policy(&self, id: &Uuid, accepted: StateSet, policy: &str) -> MetaResult<()> {
        self.timed(async {
            self.update_key_if(id, accepted, sql::SET_POLICY, &[&policy])
                .await
        })
        .await
    }

    async fn schedule_deletion(
        &self,
        id: &Uuid,
        accepted: StateSet,
        date_ms: i64,
        window_days: i32,
    ) -> MetaResult<()> {
        self.timed(async {
            self.update_key_if(
                id,
                accepted,
                &sql::schedule_deletion(),
                &[&date_ms, &window_days],
            )
            .await
        })
        .await
    }

    async fn cancel_deletion(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()> {
        self.timed(async {
            self.update_key_if(id, accepted, sql::CANCEL_DELETION, &[&to.as_str()])
                .await
        })
        .await
    }

    async fn keys_due(&self, now_ms: i64, limit: usize) -> MetaResult<Vec<KeyRecord>> {
        self.timed(async {
            self.rows(&sql::keys_due(), &[&now_ms, &(limit as i64)], row)
                .await
        })
        .await
    }

    async fn claim_removal(
        &self,
        id: &Uuid,
        removal: Removal,
        now_ms: i64,
        owner: &str,
        lease_ms: i64,
    ) -> MetaResult<()> {
        self.timed(async {
            let (sql, cutoff) = sql::claim(removal);
            let id = id.to_string();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &now_ms, &owner, &lease_ms];
            if let Some(cutoff) = &cutoff {
                params.push(cutoff);
            }
            one(self.execute(&sql, &params).await?)
        })
        .await
    }

    async fn tag_key(
        &self,
        id: &Uuid,
        accepted: StateSet,
        tags: &[(String, String)],
        max: usize,
    ) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            // The key's row locked: concurrent taggers of the key take turns, so the count below
            // is the count the commit leaves.
            lock_key(&tx, id, accepted).await??;
            for (k, v) in tags {
                tx.execute(sql::UPSERT_TAG, &[&id.to_string(), k, v])
                    .await
                    .map_err(internal)?;
            }
            let n: i64 = tx
                .query_one(sql::COUNT_TAGS, &[&id.to_string()])
                .await
                .map_err(internal)?
                .get(0);
            if n as usize > max {
                // Dropping `tx` rolls the tags back.
                return Err(Failure::Precondition(Precondition::Limit(max)));
            }
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn untag_key(&self, id: &Uuid, accepted: StateSet, keys: &[String]) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            lock_key(&tx, id, accepted).await??;
            tx.execute(
                "DELETE FROM key_tags WHERE key_id = $1 AND tag_key = ANY($2)",
                &[&id.to_string(), &keys],
            )
            .await
            .map_err(internal)?;
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn list_tags(
        &self,
        id: &Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, String)>> {
        self.timed(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    sql::TAGS_PAGE,
                    &[&id.to_string(), &after.unwrap_or(""), &(limit as i64)],
                )
                .await
                .map_err(internal)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    async fn record_key_usage(&self, uses: &[KeyUsage]) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            let stmt = tx.prepare(sql::RECORD_KEY_USAGE).await.map_err(internal)?;
            for u in uses {
                tx.execute(
                    &stmt,
                    &[
                        &u.key_id.to_string(),
                        &u.operation,
                        &u.used_ms,
                        &u.request_id,
                    ],
                )
                .await
                .map_err(internal)?;
            }
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn key_usage(&self, id: &Uuid) -> MetaResult<(Option<KeyUsage>, i64)> {
        self.timed(async {
            let c = self.client().await?;
            let used = c
                .query_opt(sql::KEY_USAGE, &[&id.to_string()])
                .await
                .map_err(internal)?
                .map(|r| KeyUsage {
                    key_id: *id,
                    operation: r.get(0),
                    used_ms: r.get(1),
                    request_id: r.get(2),
                });
            let since: i64 = c
                .query_one(sql::USAGE_TRACKING_START, &[])
                .await
                .map_err(internal)?
                .get(0);
            Ok((used, since))
        })
        .await
    }
}
