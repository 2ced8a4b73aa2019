//! Grant rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

use super::{parse_id, read, require_state, write, Sqlite};
use crate::metadata::{grant_columns, Failure, GrantRecord, Grants, MetaResult, Precondition};
use model::states::StateSet;

use super::q;
use crate::metadata::sql;

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    let ctx = |i: usize| -> rusqlite::Result<Option<BTreeMap<String, String>>> {
        let s: Option<String> = r.get(i)?;
        grant_columns::parse_context(s.as_deref()).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    };
    let ops: String = r.get(6)?;
    Ok(GrantRecord {
        grant_id: r.get(0)?,
        key_id: parse_id(r.get(1)?, 1)?,
        name: r.get(2)?,
        grantee_principal: r.get(3)?,
        retiring_principal: r.get(4)?,
        issuing_account: r.get(5)?,
        operations: grant_columns::parse_operations(&ops),
        context_subset: ctx(7)?,
        context_equals: ctx(8)?,
        creation_date_ms: r.get(9)?,
        token: r.get(10)?,
    })
}

#[async_trait]
impl Grants for Sqlite {
    async fn insert_grant(
        &self,
        g: &GrantRecord,
        accepted: StateSet,
        per_key: usize,
        per_grantee: usize,
    ) -> MetaResult<GrantRecord> {
        let out = self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, &g.key_id, accepted)? {
                return Ok(Err(r));
            }
            if g.name.is_some() {
                let same = tx
                    .prepare_cached(&q(sql::GRANT_BY_NAME))?
                    .query_map(params![g.key_id.to_string(), g.name], row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
                    .into_iter()
                    .find(|e| e.same_terms(g));
                if let Some(existing) = same {
                    return Ok(Ok(existing));
                }
            }
            let (all, of_grantee): (i64, i64) = tx
                .prepare_cached(&q(sql::COUNT_GRANTS_OF_KEY))?
                .query_row(params![g.key_id.to_string(), g.grantee_principal], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let over = |per_grantee, limit| {
                Ok(Err(Failure::Precondition(Precondition::GrantLimit {
                    per_grantee,
                    limit,
                })))
            };
            if all as usize >= per_key {
                return over(false, per_key);
            }
            if of_grantee as usize >= per_grantee {
                return over(true, per_grantee);
            }
            tx.execute(
                &q(sql::INSERT_GRANT),
                params![
                    g.grant_id,
                    g.key_id.to_string(),
                    g.name,
                    g.grantee_principal,
                    g.retiring_principal,
                    g.issuing_account,
                    grant_columns::operations(&g.operations),
                    grant_columns::context(&g.context_subset),
                    grant_columns::context(&g.context_equals),
                    g.creation_date_ms,
                    g.token
                ],
            )?;
            tx.commit()?;
            Ok(Ok(g.clone()))
        });
        self.forget_grants(&g.key_id);
        out?
    }

    async fn key_grants(&self, key: &Uuid) -> MetaResult<Arc<Vec<GrantRecord>>> {
        if let Some(g) = read(&self.grants).get(key) {
            return Ok(Arc::clone(g));
        }
        self.with(|c| {
            let rows = c
                .prepare_cached(&q(sql::GRANTS_OF_KEY))?
                .query_map([key.to_string()], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let rows = Arc::new(rows);
            write(&self.grants).insert(*key, Arc::clone(&rows));
            Ok(rows)
        })
    }

    async fn grant_by_token(&self, token: &str) -> MetaResult<Option<GrantRecord>> {
        self.with(|c| {
            c.query_row(&q(sql::GRANT_BY_TOKEN), [token], row)
                .optional()
        })
    }

    async fn delete_grant(&self, key: &Uuid, grant_id: &str) -> MetaResult<()> {
        let out =
            self.with(|c| c.execute(&q(sql::DELETE_GRANT), params![key.to_string(), grant_id]));
        self.forget_grants(key);
        out.and_then(|n| {
            if n == 1 {
                Ok(())
            } else {
                Err(Failure::NotFound)
            }
        })
    }

    async fn retirable_grants(
        &self,
        principal: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<GrantRecord>> {
        self.with(|c| {
            c.prepare_cached(&q(sql::RETIRABLE_GRANTS))?
                .query_map(params![principal, after.unwrap_or(""), limit as i64], row)?
                .collect()
        })
    }
}
