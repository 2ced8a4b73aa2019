//! Key rows and their tags.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, ToSql};
use uuid::Uuid;

use super::{bad_column, parse_id, read, require_state, write, Forget, Sqlite};
use crate::metadata::{Failure, KeyRecord, KeyUsage, Keys, MetaResult, Precondition, Removal};
use model::states::{KeyState, StateSet};

use super::q;
use crate::metadata::sql;

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let state: String = r.get(4)?;
    Ok(KeyRecord {
        id: parse_id(r.get(0)?, 0)?,
        custom_key_store_id: r.get(1)?,
        creation_date_ms: r.get(2)?,
        description: r.get(3)?,
        key_state: KeyState::parse(&state).ok_or_else(|| bad_column(4, "a key state"))?,
        deletion_date_ms: r.get(5)?,
        pending_window_days: r.get(6)?,
        policy: r.get(7)?,
    })
}

impl Sqlite {
    /// Makes `change` (one of `sql`'s key changes: `$1` the key id, then `args`) as one
    /// statement conditioned on the key's state; when it changes nothing, a read in the same
    /// transaction says why. The cached row is dropped afterwards.
    fn update_key_if(
        &self,
        id: &Uuid,
        accepted: StateSet,
        change: &str,
        args: &[&dyn ToSql],
    ) -> MetaResult<()> {
        let _forget = Forget::Key(self, *id);
        let key = id.to_string();
        let mut all: Vec<&dyn ToSql> = vec![&key];
        all.extend_from_slice(args);
        let statement = q(&sql::if_key_in(change, accepted));
        self.with(|c| {
            let tx = c.transaction()?;
            let outcome = if tx.execute(&statement, all.as_slice())? == 1 {
                Ok(())
            } else {
                // Not changed: absent, invisible or in a state the change does not accept.
                Err(require_state(&tx, id, accepted)?
                    .err()
                    .unwrap_or(Failure::NotFound))
            };
            tx.commit()?;
            Ok(outcome)
        })?
    }
}

#[async_trait]
impl Keys for Sqlite {
    async fn insert_key(&self, rec: &KeyRecord, tags: &[(String, String)]) -> MetaResult<()> {
        let _forget = Forget::Key(self, rec.id);
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                &q(sql::INSERT_KEY),
                params![
                    rec.id.to_string(),
                    rec.custom_key_store_id,
                    rec.creation_date_ms,
                    rec.description,
                    rec.key_state.as_str(),
                    rec.policy
                ],
            )?;
            for (k, v) in tags {
                tx.execute(&q(sql::INSERT_TAG), params![rec.id.to_string(), k, v])?;
            }
            tx.commit()
        })
    }

    async fn key(&self, id: &Uuid) -> MetaResult<Option<KeyRecord>> {
        if let Some(k) = read(&self.keys).get(id) {
            return Ok(Some(k.clone()));
        }
        self.with(|c| {
            let k = c
                .prepare_cached(&q(sql::KEY_BY_ID))?
                .query_row([id.to_string()], row)
                .optional()?;
            if let Some(k) = &k {
                write(&self.keys).insert(*id, k.clone());
            }
            Ok(k)
        })
    }

    async fn list_keys(&self, after: Option<&Uuid>, limit: usize) -> MetaResult<Vec<KeyRecord>> {
        let after = after.map(|u| u.to_string()).unwrap_or_default();
        self.with(|c| {
            let mut stmt = c.prepare(&q(&sql::keys_page()))?;
            let rows = stmt.query_map(params![after, limit as i64], row)?;
            rows.collect()
        })
    }

    async fn abandoned_creations(
        &self,
        keystore_id: &str,
        before_ms: i64,
    ) -> MetaResult<Vec<Uuid>> {
        self.with(|c| {
            let mut stmt = c.prepare(&q(&sql::abandoned_creations()))?;
            let rows =
                stmt.query_map(params![keystore_id, before_ms], |r| parse_id(r.get(0)?, 0))?;
            rows.collect()
        })
    }

    async fn set_key_state(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()> {
        self.update_key_if(id, accepted, sql::SET_KEY_STATE, &[&to.as_str()])
    }

    async fn delete_key(&self, id: &Uuid) -> MetaResult<()> {
        let _forget = Forget::Key(self, *id);
        self.forget_grants(id);
        self.with(|c| c.execute(&q(sql::DELETE_KEY), [id.to_string()]))
            .and_then(|n| {
                if n == 1 {
                    Ok(())
                } else {
                    Err(Failure::NotFound)
                }
            })
    }

    async fn set_description(
        &self,
        id: &Uuid,
        accepted: StateSet,
        description: &str,
    ) -> MetaResult<()> {
        self.update_key_if(id, accepted, sql::SET_DESCRIPTION, &[&description])
    }

    async fn set_policy(&self, id: &Uuid, accepted: StateSet, policy: &str) -> MetaResult<()> {
        self.update_key_if(id, accepted, sql::SET_POLICY, &[&policy])
    }

    async fn schedule_deletion(
        &self,
        id: &Uuid,
        accepted: StateSet,
        date_ms: i64,
        window_days: i32,
    ) -> MetaResult<()> {
        self.update_key_if(
            id,
            accepted,
            &sql::schedule_deletion(),
            &[&date_ms, &window_days],
        )
    }

    async fn cancel_deletion(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()> {
        self.update_key_if(id, accepted, sql::CANCEL_DELETION, &[&to.as_str()])
    }

    async fn keys_due(&self, now_ms: i64, limit: usize) -> MetaResult<Vec<KeyRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&q(&sql::keys_due()))?;
            let rows = stmt.query_map(params![now_ms, limit as i64], row)?;
            rows.collect()
        })
    }

    async fn claim_removal(
        &self,
        id: &Uuid,
        removal: Removal,
        now_ms: i64,
        owner: &str,
        lease_ms: i64,
    ) -> MetaResult<()> {
        let _forget = Forget::Key(self, *id);
        let (sql, cutoff) = sql::claim(removal);
        let sql = super::q(&sql);
        let id = id.to_string();
        self.with(|c| match cutoff {
            None => c.execute(&sql, params![id, now_ms, owner, lease_ms]),
            Some(cutoff) => c.execute(&sql, params![id, now_ms, owner, lease_ms, cutoff]),
        })
        .and_then(|n| {
            if n == 1 {
                Ok(())
            } else {
                Err(Failure::NotFound)
            }
        })
    }

    async fn tag_key(
        &self,
        id: &Uuid,
        accepted: StateSet,
        tags: &[(String, String)],
        max: usize,
    ) -> MetaResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, id, accepted)? {
                return Ok(Err(r));
            }
            for (k, v) in tags {
                tx.execute(&q(sql::UPSERT_TAG), params![id.to_string(), k, v])?;
            }
            let n: i64 = tx.query_row(&q(sql::COUNT_TAGS), [id.to_string()], |r| r.get(0))?;
            if n as usize > max {
                // Dropping `tx` rolls the tags back.
                return Ok(Err(Failure::Precondition(Precondition::Limit(max))));
            }
            tx.commit()?;
            Ok(Ok(()))
        })?
    }

    async fn untag_key(&self, id: &Uuid, accepted: StateSet, keys: &[String]) -> MetaResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, id, accepted)? {
                return Ok(Err(r));
            }
            for k in keys {
                tx.execute(
                    "DELETE FROM key_tags WHERE key_id = ?1 AND tag_key = ?2",
                    params![id.to_string(), k],
                )?;
            }
            tx.commit()?;
            Ok(Ok(()))
        })?
    }

    async fn list_tags(
        &self,
        id: &Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, String)>> {
        self.with(|c| {
            let mut stmt = c.prepare(&q(sql::TAGS_PAGE))?;
            let rows = stmt.query_map(
                params![id.to_string(), after.unwrap_or(""), limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect()
        })
    }

    async fn record_key_usage(&self, uses: &[KeyUsage]) -> MetaResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare(&q(sql::RECORD_KEY_USAGE))?;
                for u in uses {
                    stmt.execute(params![
                        u.key_id.to_string(),
                        u.operation,
                        u.used_ms,
                        u.request_id
                    ])?;
                }
            }
            tx.commit()
        })
    }

    async fn key_usage(&self, id: &Uuid) -> MetaResult<(Option<KeyUsage>, i64)> {
        self.with(|c| {
            let used = c
                .query_row(&q(sql::KEY_USAGE), [id.to_string()], |r| {
                    Ok(KeyUsage {
                        key_id: *id,
                        operation: r.get(0)?,
                        used_ms: r.get(1)?,
                        request_id: r.get(2)?,
                    })
                })
                .optional()?;
            let since: i64 = c.query_row(&q(sql::USAGE_TRACKING_START), [], |r| r.get(0))?;
            Ok((used, since))
        })
    }
}
