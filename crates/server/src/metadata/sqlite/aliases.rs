//! Alias rows.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{parse_id, require_state, Sqlite};
use crate::metadata::{AliasRecord, Aliases, Failure, MetaResult, Precondition, Unique};
use model::states::StateSet;

use super::q;
use crate::metadata::sql;
use crate::metadata::sql::ALIAS_COLUMNS as COLUMNS;

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AliasRecord> {
    Ok(AliasRecord {
        name: r.get(0)?,
        key_id: parse_id(r.get(1)?, 1)?,
        creation_date_ms: r.get(2)?,
        last_updated_ms: r.get(3)?,
    })
}

fn aliases_of(c: &Connection, id: &Uuid) -> rusqlite::Result<usize> {
    c.query_row(&q(sql::COUNT_ALIASES_OF_KEY), [id.to_string()], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n as usize)
}

#[async_trait]
impl Aliases for Sqlite {
    async fn create_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, key, accepted)? {
                return Ok(Err(r));
            }
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )?;
            if exists {
                return Ok(Err(Failure::Taken(Unique::AliasName)));
            }
            if aliases_of(&tx, key)? >= max {
                return Ok(Err(Failure::Precondition(Precondition::Limit(max))));
            }
            tx.execute(
                &q(sql::INSERT_ALIAS),
                params![name, key.to_string(), now_ms],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })?
    }

    async fn update_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<String> = tx
                .query_row("SELECT key_id FROM aliases WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(current) = current else {
                return Ok(Err(Failure::NotFound));
            };
            if let Err(r) = require_state(&tx, key, accepted)? {
                return Ok(Err(r));
            }
            if current != key.to_string() && aliases_of(&tx, key)? >= max {
                return Ok(Err(Failure::Precondition(Precondition::Limit(max))));
            }
            tx.execute(
                &q(sql::UPDATE_ALIAS_TARGET),
                params![name, key.to_string(), now_ms],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })?
    }

    async fn delete_alias(&self, name: &str) -> MetaResult<()> {
        self.with(|c| c.execute(&q(sql::DELETE_ALIAS), [name]))
            .and_then(|n| {
                if n == 1 {
                    Ok(())
                } else {
                    Err(Failure::NotFound)
                }
            })
    }

    async fn alias(&self, name: &str) -> MetaResult<Option<AliasRecord>> {
        self.with(|c| c.query_row(&q(sql::ALIAS_BY_NAME), [name], row).optional())
    }

    async fn list_aliases(
        &self,
        key: Option<&Uuid>,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<AliasRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{COLUMNS} WHERE name > ?1 AND (?2 IS NULL OR key_id = ?2)
                 ORDER BY name LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![
                    after.unwrap_or(""),
                    key.map(|k| k.to_string()),
                    limit as i64
                ],
                row,
            )?;
            rows.collect()
        })
    }
}
