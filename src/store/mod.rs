//! Metadata persistence in SQLite: custom key stores, keys and their tags. Never key material.
//!
//! Every method is one transaction, so each is atomic with respect to the others; rules that
//! span a read and a write (a store may be deleted only while it holds no keys, ...) are
//! checked inside the same transaction. SQLite errors are translated here, at the edge:
//! unique-constraint violations become the AWS exception they mean, anything else is
//! KMSInternalException with the detail in the log.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::kms::error::{ErrorKind, KmsError, KmsResult};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS custom_key_stores (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    cluster_id            TEXT NOT NULL UNIQUE,
    trust_anchor          TEXT NOT NULL,
    sealed_password       BLOB NOT NULL,
    connection_state      TEXT NOT NULL,
    connection_error_code TEXT,
    creation_date_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    id                    TEXT PRIMARY KEY,
    custom_key_store_id   TEXT NOT NULL REFERENCES custom_key_stores(id),
    creation_date_ms      INTEGER NOT NULL,
    description           TEXT NOT NULL,
    key_state             TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_store ON keys(custom_key_store_id);
CREATE TABLE IF NOT EXISTS key_tags (
    key_id    TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    tag_key   TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
";

/// A custom key store row.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreRecord {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    pub trust_anchor: String,
    pub sealed_password: Vec<u8>,
    pub connection_state: String,
    pub connection_error_code: Option<String>,
    pub creation_date_ms: i64,
}

impl std::fmt::Debug for StoreRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .field("connection_state", &self.connection_state)
            .finish_non_exhaustive()
    }
}

/// A key row. `key_state` is the stored state (`Creating`, `Enabled`, `Disabled`); the state a
/// caller sees also depends on the store's connection (see `kms::keys`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: Uuid,
    pub custom_key_store_id: String,
    pub creation_date_ms: i64,
    pub description: String,
    pub key_state: String,
}

/// Changes to a custom key store row; `None` leaves a column as it is.
#[derive(Default)]
pub struct StoreUpdate {
    pub name: Option<String>,
    pub cluster_id: Option<String>,
    pub sealed_password: Option<Vec<u8>>,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn run<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> KmsResult<T> {
        self.run(f).map_err(sql_error)
    }

    // ------------------------------------------------------------ custom key stores

    pub fn insert_store(&self, rec: &StoreRecord) -> KmsResult<()> {
        self.run(|c| {
            c.execute(
                "INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor, sealed_password,
                     connection_state, connection_error_code, creation_date_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    rec.id,
                    rec.name,
                    rec.cluster_id,
                    rec.trust_anchor,
                    rec.sealed_password,
                    rec.connection_state,
                    rec.connection_error_code,
                    rec.creation_date_ms
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| store_conflict(e, &rec.name, &rec.cluster_id))
    }

    pub fn get_store(&self, id: &str) -> KmsResult<Option<StoreRecord>> {
        self.with(|c| {
            c.query_row(&format!("{STORE_COLUMNS} WHERE id = ?1"), [id], store_row)
                .optional()
        })
    }

    pub fn get_store_by_name(&self, name: &str) -> KmsResult<Option<StoreRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("{STORE_COLUMNS} WHERE name = ?1"),
                [name],
                store_row,
            )
            .optional()
        })
    }

    /// Stores ordered by id, starting after `after`.
    pub fn list_stores(&self, after: Option<&str>, limit: usize) -> KmsResult<Vec<StoreRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{STORE_COLUMNS} WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], store_row)?;
            rows.collect()
        })
    }

    /// Sets the connection state if the current state is one of `from`; returns whether it did.
    pub fn transition_store(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error_code: Option<&str>,
    ) -> KmsResult<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<String> = tx
                .query_row(
                    "SELECT connection_state FROM custom_key_stores WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let ok = matches!(current, Some(s) if from.contains(&s.as_str()));
            if ok {
                tx.execute(
                    "UPDATE custom_key_stores SET connection_state = ?2, connection_error_code = ?3
                     WHERE id = ?1",
                    params![id, to, error_code],
                )?;
            }
            tx.commit()?;
            Ok(ok)
        })
    }

    pub fn update_store(&self, id: &str, update: &StoreUpdate) -> KmsResult<()> {
        let name = update.name.clone().unwrap_or_default();
        let cluster = update.cluster_id.clone().unwrap_or_default();
        self.run(|c| {
            let tx = c.transaction()?;
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
                    "UPDATE custom_key_stores SET sealed_password = ?2 WHERE id = ?1",
                    params![id, p],
                )?;
            }
            tx.commit()
        })
        .map_err(|e| store_conflict(e, &name, &cluster))
    }

    /// Deletes a store that is DISCONNECTED and holds no keys, in one transaction.
    pub fn delete_store(&self, id: &str) -> KmsResult<()> {
        enum Outcome {
            Gone,
            Missing,
            State(String),
            HasKeys(i64),
        }
        let outcome = self.with(|c| {
            let tx = c.transaction()?;
            let state: Option<String> = tx
                .query_row(
                    "SELECT connection_state FROM custom_key_stores WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let outcome = match state {
                None => Outcome::Missing,
                Some(s) if s != "DISCONNECTED" => Outcome::State(s),
                Some(_) => {
                    let keys: i64 = tx.query_row(
                        "SELECT COUNT(*) FROM keys WHERE custom_key_store_id = ?1",
                        [id],
                        |r| r.get(0),
                    )?;
                    if keys > 0 {
                        Outcome::HasKeys(keys)
                    } else {
                        tx.execute("DELETE FROM custom_key_stores WHERE id = ?1", [id])?;
                        Outcome::Gone
                    }
                }
            };
            tx.commit()?;
            Ok(outcome)
        })?;
        match outcome {
            Outcome::Gone => Ok(()),
            Outcome::Missing => Err(store_not_found(id)),
            Outcome::State(s) => Err(KmsError::new(
                ErrorKind::CustomKeyStoreInvalidState,
                format!("Custom key store {id} is {s}; it can be deleted only while DISCONNECTED"),
            )),
            Outcome::HasKeys(n) => Err(KmsError::new(
                ErrorKind::CustomKeyStoreHasCmks,
                format!("Custom key store {id} still holds {n} KMS key(s)"),
            )),
        }
    }

    // ------------------------------------------------------------ keys

    /// Inserts a key row (normally in state `Creating`) and its tags, atomically.
    pub fn insert_key(&self, rec: &KeyRecord, tags: &[(String, String)]) -> KmsResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO keys (id, custom_key_store_id, creation_date_ms, description, key_state)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    rec.id.to_string(),
                    rec.custom_key_store_id,
                    rec.creation_date_ms,
                    rec.description,
                    rec.key_state
                ],
            )?;
            for (k, v) in tags {
                tx.execute(
                    "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)",
                    params![rec.id.to_string(), k, v],
                )?;
            }
            tx.commit()
        })
    }

    pub fn set_key_state(&self, id: &Uuid, state: &str) -> KmsResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE keys SET key_state = ?2 WHERE id = ?1",
                params![id.to_string(), state],
            )
            .map(|_| ())
        })
    }

    /// Sets the stored state if it is one of `from`; returns the state found.
    pub fn transition_key(&self, id: &Uuid, from: &[&str], to: &str) -> KmsResult<Option<String>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<String> = tx
                .query_row(
                    "SELECT key_state FROM keys WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if matches!(&current, Some(s) if from.contains(&s.as_str())) {
                tx.execute(
                    "UPDATE keys SET key_state = ?2 WHERE id = ?1",
                    params![id.to_string(), to],
                )?;
            }
            tx.commit()?;
            Ok(current)
        })
    }

    pub fn delete_key(&self, id: &Uuid) -> KmsResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM keys WHERE id = ?1", [id.to_string()])
                .map(|_| ())
        })
    }

    pub fn get_key(&self, id: &Uuid) -> KmsResult<Option<KeyRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("{KEY_COLUMNS} WHERE id = ?1"),
                [id.to_string()],
                key_row,
            )
            .optional()
        })
    }

    /// Usable keys (not `Creating`) ordered by id, starting after `after`.
    pub fn list_keys(&self, after: Option<&Uuid>, limit: usize) -> KmsResult<Vec<KeyRecord>> {
        let after = after.map(|u| u.to_string()).unwrap_or_default();
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{KEY_COLUMNS} WHERE id > ?1 AND key_state != 'Creating' ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64], key_row)?;
            rows.collect()
        })
    }

    /// Keys of a store still in `Creating`: left by a crash mid-creation.
    pub fn creating_keys(&self, store_id: &str) -> KmsResult<Vec<Uuid>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id FROM keys WHERE custom_key_store_id = ?1 AND key_state = 'Creating'",
            )?;
            let rows = stmt.query_map([store_id], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .map(|ids: Vec<String>| ids.iter().filter_map(|s| Uuid::try_parse(s).ok()).collect())
    }

    /// Tags of a key ordered by tag key, starting after `after`.
    pub fn list_tags(
        &self,
        key_id: &Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> KmsResult<Vec<(String, String)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT tag_key, tag_value FROM key_tags WHERE key_id = ?1 AND tag_key > ?2
                 ORDER BY tag_key LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![key_id.to_string(), after.unwrap_or(""), limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect()
        })
    }
}

const STORE_COLUMNS: &str = "SELECT id, name, cluster_id, trust_anchor, sealed_password,
    connection_state, connection_error_code, creation_date_ms FROM custom_key_stores";

fn store_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoreRecord> {
    Ok(StoreRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        cluster_id: r.get(2)?,
        trust_anchor: r.get(3)?,
        sealed_password: r.get(4)?,
        connection_state: r.get(5)?,
        connection_error_code: r.get(6)?,
        creation_date_ms: r.get(7)?,
    })
}

const KEY_COLUMNS: &str =
    "SELECT id, custom_key_store_id, creation_date_ms, description, key_state FROM keys";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let id: String = r.get(0)?;
    Ok(KeyRecord {
        id: Uuid::try_parse(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        custom_key_store_id: r.get(1)?,
        creation_date_ms: r.get(2)?,
        description: r.get(3)?,
        key_state: r.get(4)?,
    })
}

pub fn store_not_found(id: &str) -> KmsError {
    KmsError::new(
        ErrorKind::CustomKeyStoreNotFound,
        format!("Custom key store {id} does not exist"),
    )
}

/// Unique-constraint violations on the store table name the rule they enforce.
fn store_conflict(e: rusqlite::Error, name: &str, cluster: &str) -> KmsError {
    if let rusqlite::Error::SqliteFailure(f, Some(msg)) = &e {
        if f.code == rusqlite::ErrorCode::ConstraintViolation {
            if msg.contains("custom_key_stores.name") {
                return KmsError::new(
                    ErrorKind::CustomKeyStoreNameInUse,
                    format!("The custom key store name {name} is already in use"),
                );
            }
            if msg.contains("custom_key_stores.cluster_id") {
                return KmsError::new(
                    ErrorKind::CloudHsmClusterInUse,
                    format!(
                        "Cluster {cluster} is already associated with another custom key store"
                    ),
                );
            }
        }
    }
    sql_error(e)
}

fn sql_error(e: rusqlite::Error) -> KmsError {
    KmsError::internal(format!("metadata store: {e}"))
}
