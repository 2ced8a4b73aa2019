//! Grant rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{bad, internal, lock_key, one, parse_id, Postgres};
use crate::metadata::{grant_columns, Failure, GrantRecord, Grants, MetaResult, Precondition};
use model::states::StateSet;

use crate::metadata::sql;

fn row(r: &Row) -> MetaResult<GrantRecord> {
    let ctx = |i: usize| -> MetaResult<Option<BTreeMap<String, String>>> {
        grant_columns::parse_context(r.get(i)).map_err(|_| bad("an encryption context"))
    };
    let ops: &str = r.get(6);
    Ok(GrantRecord {
        grant_id: r.get(0),
        key_id: parse_id(r.get(1))?,
        name: r.get(2),
        grantee_principal: r.get(3),
        retiring_principal: r.get(4),
        issuing_account: r.get(5),
        operations: grant_columns::parse_operations(ops),
        context_subset: ctx(7)?,
        context_equals: ctx(8)?,
        creation_date_ms: r.get(9),
        token: r.get(10),
    })
}

#[async_trait]
impl Grants for Postgres {
    async fn insert_grant(
        &self,
        g: &GrantRecord,
        accepted: StateSet,
        per_key: usize,
        per_grantee: usize,
    ) -> MetaResult<GrantRecord> {
        self.timed(async {
            let mut c = self.writer().await?;
            let tx = c.transaction().await.map_err(internal)?;
            // A key's grants are counted under its row's lock, so concurrent grants take turns.
            lock_key(&tx, &g.key_id, accepted).await??;
            let key = g.key_id.to_string();
            if g.name.is_some() {
                let same = tx
                    .query(sql::GRANT_BY_NAME, &[&key, &g.name])
                    .await
                    .map_err(internal)?;
                for r in &same {
                    let e = row(r)?;
                    if e.same_terms(g) {
                        return Ok(e);
                    }
                }
            }
            let counts = tx
                .query_one(sql::COUNT_GRANTS_OF_KEY, &[&key, &g.grantee_principal])
                .await
                .map_err(internal)?;
            let (all, of_grantee): (i64, i64) = (counts.get(0), counts.get(1));
            let over = |per_grantee, limit| {
                Err(Failure::Precondition(Precondition::GrantLimit {
                    per_grantee,
                    limit,
                }))
            };
            if all as usize >= per_key {
                return over(false, per_key);
            }
            if of_grantee as usize >= per_grantee {
                return over(true, per_grantee);
            }
            tx.execute(
                sql::INSERT_GRANT,
                &[
                    &g.grant_id,
                    &key,
                    &g.name,
                    &g.grantee_principal,
                    &g.retiring_principal,
                    &g.issuing_account,
                    &grant_columns::operations(&g.operations),
                    &grant_columns::context(&g.context_subset),
                    &grant_columns::context(&g.context_equals),
                    &g.creation_date_ms,
                    &g.token,
                ],
            )
            .await
            .map_err(internal)?;
            tx.commit().await.map_err(internal)?;
            Ok(g.clone())
        })
        .await
    }

    async fn key_grants(&self, key: &Uuid) -> MetaResult<Arc<Vec<GrantRecord>>> {
        self.timed(async {
            if let Some(hit) = self.cache.grants(key) {
                return Ok(hit);
            }
            let since = self.cache.generation();
            let grants = Arc::new(
                self.rows(sql::GRANTS_OF_KEY, &[&key.to_string()], row)
                    .await?,
            );
            self.cache.put_grants(since, *key, &grants);
            Ok(grants)
        })
        .await
    }

    async fn grant_by_token(&self, token: &str) -> MetaResult<Option<GrantRecord>> {
        self.timed(async { self.row(sql::GRANT_BY_TOKEN, &[&token], row).await })
            .await
    }

    async fn delete_grant(&self, key: &Uuid, grant_id: &str) -> MetaResult<()> {
        self.timed(async {
            one(self
                .execute(sql::DELETE_GRANT, &[&key.to_string(), &grant_id])
                .await?)
        })
        .await
    }

    async fn retirable_grants(
        &self,
        principal: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<GrantRecord>> {
        self.timed(async {
            self.rows(
                sql::RETIRABLE_GRANTS,
                &[&principal, &after.unwrap_or(""), &(limit as i64)],
                row,
            )
            .await
        })
        .await
    }
}
