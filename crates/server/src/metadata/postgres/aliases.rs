//! Alias rows.

use async_trait::async_trait;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{internal, lock_key, one, parse_id, taken, Postgres};
use crate::metadata::{AliasRecord, Aliases, Failure, MetaResult, Precondition, Unique};
use model::states::StateSet;

use crate::metadata::sql;
use crate::metadata::sql::ALIAS_COLUMNS as COLUMNS;

fn row(r: &Row) -> MetaResult<AliasRecord> {
    Ok(AliasRecord {
        name: r.get(0),
        key_id: parse_id(r.get(1))?,
        creation_date_ms: r.get(2),
        last_updated_ms: r.get(3),
    })
}

/// How many aliases the key has, inside a transaction that holds the key's row.
async fn aliases_of(tx: &deadpool_postgres::Transaction<'_>, key: &Uuid) -> MetaResult<usize> {
    let n: i64 = tx
        .query_one(sql::COUNT_ALIASES_OF_KEY, &[&key.to_string()])
        .await
        .map_err(internal)?
        .get(0);
    Ok(n as usize)
}

#[async_trait]
impl Aliases for Postgres {
    async fn create_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            // Aliases are counted per key: every change to a key's aliases locks the key first.
            lock_key(&tx, key, accepted).await??;
            if aliases_of(&tx, key).await? >= max {
                return Err(Failure::Precondition(Precondition::Limit(max)));
            }
            tx.execute(sql::INSERT_ALIAS, &[&name, &key.to_string(), &now_ms])
                .await
                .map_err(|e| taken(e, &[("alias_name_taken", Unique::AliasName)]))?;
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn update_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            let current = tx
                .query_opt(
                    "SELECT key_id FROM aliases WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .await
                .map_err(internal)?;
            let Some(current) = current else {
                return Err(Failure::NotFound);
            };
            let current: String = current.get(0);
            lock_key(&tx, key, accepted).await??;
            if current != key.to_string() && aliases_of(&tx, key).await? >= max {
                return Err(Failure::Precondition(Precondition::Limit(max)));
            }
            tx.execute(
                sql::UPDATE_ALIAS_TARGET,
                &[&name, &key.to_string(), &now_ms],
            )
            .await
            .map_err(internal)?;
            tx.commit().await.map_err(internal)
        })
        .await
    }

    async fn delete_alias(&self, name: &str) -> MetaResult<()> {
        self.timed(async { one(self.execute(sql::DELETE_ALIAS, &[&name]).await?) })
            .await
    }

    async fn alias(&self, name: &str) -> MetaResult<Option<AliasRecord>> {
        self.timed(async { self.row(sql::ALIAS_BY_NAME, &[&name], row).await })
            .await
    }

    async fn list_aliases(
        &self,
        key: Option<&Uuid>,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<AliasRecord>> {
        self.timed(async {
            self.rows(
                &format!(
                    "{COLUMNS} WHERE name > $1 AND ($2::TEXT IS NULL OR key_id = $2)
                     ORDER BY name LIMIT $3"
                ),
                &[
                    &after.unwrap_or(""),
                    &key.map(|k| k.to_string()),
                    &(limit as i64),
                ],
                row,
            )
            .await
        })
        .await
    }
}
