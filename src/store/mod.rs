//! Metadata persistence in SQLite: custom key stores, keys and their tags. Never key material.
//!
//! Every method is one transaction, so each is atomic with respect to the others; rules that
//! span a read and a write (a store may be deleted only while it holds no keys, ...) are
//! checked inside the same transaction. SQLite errors are translated here, at the edge:
//! unique-constraint violations become the AWS exception they mean, anything else is
//! KMSInternalException with the detail in the log.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, RwLock};

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::kms::error::{ErrorKind, KmsError, KmsResult};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

const SCHEMA_V1: &str = "
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

/// Scheduled deletion, key policies and aliases.
const SCHEMA_V2: &str = "
ALTER TABLE keys ADD COLUMN deletion_date_ms INTEGER;
ALTER TABLE keys ADD COLUMN pending_window_days INTEGER;
ALTER TABLE keys ADD COLUMN policy TEXT;
CREATE INDEX IF NOT EXISTS keys_by_deletion ON keys(deletion_date_ms) WHERE deletion_date_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS aliases (
    name             TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    creation_date_ms INTEGER NOT NULL,
    last_updated_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_by_key ON aliases(key_id);
";

/// Grants, and the kmsuser password that replaces the stored one while it is being rotated.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS grants (
    grant_id           TEXT PRIMARY KEY,
    key_id             TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    name               TEXT,
    grantee_principal  TEXT NOT NULL,
    retiring_principal TEXT,
    issuing_account    TEXT NOT NULL,
    operations         TEXT NOT NULL,
    context_subset     TEXT,
    context_equals     TEXT,
    creation_date_ms   INTEGER NOT NULL,
    token              TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS grants_by_key ON grants(key_id, grant_id);
CREATE INDEX IF NOT EXISTS grants_by_retiring ON grants(retiring_principal, grant_id);
ALTER TABLE custom_key_stores ADD COLUMN pending_password BLOB;
";

/// A grant row. The encryption context constraints are JSON objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    pub grant_id: String,
    pub key_id: Uuid,
    pub name: Option<String>,
    pub grantee_principal: String,
    pub retiring_principal: Option<String>,
    pub issuing_account: String,
    pub operations: Vec<String>,
    pub context_subset: Option<std::collections::BTreeMap<String, String>>,
    pub context_equals: Option<std::collections::BTreeMap<String, String>>,
    pub creation_date_ms: i64,
    pub token: String,
}

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

/// A key row. `key_state` is the stored state (`Creating`, `Enabled`, `Disabled`,
/// `PendingDeletion`); the state a caller sees also depends on the store's connection (see
/// `kms::keys`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: Uuid,
    pub custom_key_store_id: String,
    pub creation_date_ms: i64,
    pub description: String,
    pub key_state: String,
    pub deletion_date_ms: Option<i64>,
    pub pending_window_days: Option<i32>,
    /// The key policy; `None` for the default key policy (written out by GetKeyPolicy).
    pub policy: Option<String>,
}

/// An alias row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasRecord {
    pub name: String,
    pub key_id: Uuid,
    pub creation_date_ms: i64,
    pub last_updated_ms: i64,
}

/// Why a conditional change was not made. The domain turns these into AWS exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No such key (or it is still being created).
    KeyMissing,
    /// The key is in `state`, not one of the states the change needs (`allowed`).
    KeyState {
        state: String,
        allowed: Vec<String>,
    },
    AliasExists,
    AliasMissing,
    /// A per-key limit would be exceeded (aliases or tags); the limit is given.
    TooMany(usize),
    /// The key has `limit` grants already, in all (`per_grantee` false) or for the new
    /// grant's grantee principal.
    TooManyGrants {
        per_grantee: bool,
        limit: usize,
    },
}

pub type Conditional<T> = Result<T, Refused>;

/// Changes to a custom key store row; `None` leaves a column as it is.
#[derive(Default)]
pub struct StoreUpdate {
    pub name: Option<String>,
    pub cluster_id: Option<String>,
    pub sealed_password: Option<Vec<u8>>,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// Rows read on the hot path (every cryptographic request reads its key and store),
    /// cached. Filled only while holding `conn`, and invalidated after every write to the
    /// row, so a fill can never put back a value older than the last write.
    keys: RwLock<HashMap<Uuid, KeyRecord>>,
    stores: RwLock<HashMap<String, StoreRecord>>,
    /// Each key's grants, read when a policy does not allow a request; dropped on any
    /// change to the key's grants.
    grants: RwLock<HashMap<Uuid, std::sync::Arc<Vec<GrantRecord>>>>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Created owner-only, as every other data file; SQLite gives its -wal and -shm files
        // the database file's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
            keys: RwLock::new(HashMap::new()),
            stores: RwLock::new(HashMap::new()),
            grants: RwLock::new(HashMap::new()),
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
        let _forget = Forget::Store(self, &rec.id);
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
        if let Some(r) = read(&self.stores).get(id) {
            return Ok(Some(r.clone()));
        }
        self.with(|c| {
            let r = c
                .prepare_cached(&format!("{STORE_COLUMNS} WHERE id = ?1"))?
                .query_row([id], store_row)
                .optional()?;
            if let Some(r) = &r {
                write(&self.stores).insert(id.to_string(), r.clone());
            }
            Ok(r)
        })
    }

    fn forget_store(&self, id: &str) {
        write(&self.stores).remove(id);
    }

    fn forget_key(&self, id: &Uuid) {
        write(&self.keys).remove(id);
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
        let _forget = Forget::Store(self, id);
        self.with(|c| {
            let tx = c.transaction()?;
            let current = connection_state(&tx, id)?;
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
        let _forget = Forget::Store(self, id);
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
                    // The password the caller gives is the token's now: a pending one from an
                    // unfinished rotation is stale.
                    "UPDATE custom_key_stores SET sealed_password = ?2, pending_password = NULL
                     WHERE id = ?1",
                    params![id, p],
                )?;
            }
            tx.commit()
        })
        .map_err(|e| store_conflict(e, &name, &cluster))
    }

    /// Deletes a store that is DISCONNECTED and holds no keys, in one transaction.
    pub fn delete_store(&self, id: &str) -> KmsResult<()> {
        let _forget = Forget::Store(self, id);
        enum Outcome {
            Gone,
            Missing,
            State(String),
            HasKeys(i64),
        }
        let outcome = self.with(|c| {
            let tx = c.transaction()?;
            let state = connection_state(&tx, id)?;
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
        let _forget = Forget::Key(self, rec.id);
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO keys (id, custom_key_store_id, creation_date_ms, description, key_state,
                                   policy)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    rec.id.to_string(),
                    rec.custom_key_store_id,
                    rec.creation_date_ms,
                    rec.description,
                    rec.key_state,
                    rec.policy
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
        let _forget = Forget::Key(self, *id);
        self.with(|c| {
            c.execute(
                "UPDATE keys SET key_state = ?2 WHERE id = ?1",
                params![id.to_string(), state],
            )
            .map(|_| ())
        })
    }

    pub fn delete_key(&self, id: &Uuid) -> KmsResult<()> {
        let _forget = Forget::Key(self, *id);
        write(&self.grants).remove(id);
        self.with(|c| {
            c.execute("DELETE FROM keys WHERE id = ?1", [id.to_string()])
                .map(|_| ())
        })
    }

    pub fn get_key(&self, id: &Uuid) -> KmsResult<Option<KeyRecord>> {
        if let Some(k) = read(&self.keys).get(id) {
            return Ok(Some(k.clone()));
        }
        self.with(|c| {
            let k = c
                .prepare_cached(&format!("{KEY_COLUMNS} WHERE id = ?1"))?
                .query_row([id.to_string()], key_row)
                .optional()?;
            if let Some(k) = &k {
                write(&self.keys).insert(*id, k.clone());
            }
            Ok(k)
        })
    }

    /// Usable keys (not `Creating`) ordered by id, starting after `after`.
    pub fn list_keys(&self, after: Option<&Uuid>, limit: usize) -> KmsResult<Vec<KeyRecord>> {
        let after = after.map(|u| u.to_string()).unwrap_or_default();
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{KEY_COLUMNS} WHERE id > ?1 AND key_state NOT IN ('Creating', 'Deleting')
                 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64], key_row)?;
            rows.collect()
        })
    }

    /// Keys of a store still in `Creating`: left by a crash mid-creation.
    pub fn creating_keys(&self, store_id: &str, created_before_ms: i64) -> KmsResult<Vec<Uuid>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id FROM keys WHERE custom_key_store_id = ?1 AND key_state = 'Creating' \
                 AND creation_date_ms < ?2",
            )?;
            let rows = stmt.query_map(rusqlite::params![store_id, created_before_ms], |r| {
                r.get::<_, String>(0)
            })?;
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

/// Invalidates a cached row when dropped: at the end of a write method, after its commit.
enum Forget<'a> {
    Key(&'a Store, Uuid),
    Store(&'a Store, &'a str),
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        match self {
            Forget::Key(s, id) => s.forget_key(id),
            Forget::Store(s, id) => s.forget_store(id),
        }
    }
}

fn read<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockReadGuard<'_, HashMap<K, V>> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockWriteGuard<'_, HashMap<K, V>> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn connection_state(c: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    c.query_row(
        "SELECT connection_state FROM custom_key_stores WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .optional()
}

/// Key lifecycle, tags, policies and aliases: each method one transaction, its condition
/// checked inside it, so concurrent changes to one key are serialised and none is lost.
impl Store {
    /// Sets the stored state if the key is in one of `from`.
    pub fn change_key_state(
        &self,
        id: &Uuid,
        from: &[&str],
        to: &str,
    ) -> KmsResult<Conditional<()>> {
        self.update_key_if(
            id,
            from,
            "UPDATE keys SET key_state = ?2 WHERE id = ?1",
            &[&to],
        )
    }

    pub fn schedule_deletion(
        &self,
        id: &Uuid,
        deletion_date_ms: i64,
        window_days: i32,
    ) -> KmsResult<Conditional<()>> {
        self.update_key_if(
            id,
            &["Enabled", "Disabled"],
            "UPDATE keys SET key_state = 'PendingDeletion', deletion_date_ms = ?2,
                 pending_window_days = ?3 WHERE id = ?1",
            &[&deletion_date_ms, &window_days],
        )
    }

    /// Cancels a scheduled deletion: the key comes back Disabled.
    pub fn cancel_deletion(&self, id: &Uuid) -> KmsResult<Conditional<()>> {
        self.update_key_if(
            id,
            &["PendingDeletion"],
            "UPDATE keys SET key_state = 'Disabled', deletion_date_ms = NULL,
                 pending_window_days = NULL WHERE id = ?1",
            &[],
        )
    }

    /// Keys pending deletion whose date has come.
    pub fn keys_due(&self, now_ms: i64, limit: usize) -> KmsResult<Vec<KeyRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{KEY_COLUMNS} WHERE key_state IN ('PendingDeletion', 'Deleting')
                     AND deletion_date_ms <= ?1
                 ORDER BY deletion_date_ms LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![now_ms, limit as i64], key_row)?;
            rows.collect()
        })
    }

    /// Marks a due key `Deleting` (invisible, no longer cancellable) if it is still due.
    pub fn begin_deletion(&self, id: &Uuid, now_ms: i64) -> KmsResult<bool> {
        let _forget = Forget::Key(self, *id);
        self.with(|c| {
            c.execute(
                "UPDATE keys SET key_state = 'Deleting' WHERE id = ?1
                     AND key_state IN ('PendingDeletion', 'Deleting') AND deletion_date_ms <= ?2",
                params![id.to_string(), now_ms],
            )
            .map(|n| n == 1)
        })
    }

    pub fn set_description(&self, id: &Uuid, description: &str) -> KmsResult<Conditional<()>> {
        self.update_key_if(
            id,
            &["Enabled", "Disabled"],
            "UPDATE keys SET description = ?2 WHERE id = ?1",
            &[&description],
        )
    }

    pub fn set_policy(&self, id: &Uuid, policy: &str) -> KmsResult<Conditional<()>> {
        self.update_key_if(
            id,
            &["Enabled", "Disabled", "PendingDeletion"],
            "UPDATE keys SET policy = ?2 WHERE id = ?1",
            &[&policy],
        )
    }

    /// Runs `sql` (whose `?1` is the key id, then `args`) if the key is in one of `allowed`,
    /// in one transaction with the check; the cached row is dropped afterwards.
    fn update_key_if(
        &self,
        id: &Uuid,
        allowed: &[&str],
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> KmsResult<Conditional<()>> {
        let _forget = Forget::Key(self, *id);
        let key = id.to_string();
        let mut all: Vec<&dyn rusqlite::ToSql> = vec![&key];
        all.extend_from_slice(args);
        self.with(|c| {
            let tx = c.transaction()?;
            let ok = require_state(&tx, id, allowed)?;
            if ok.is_ok() {
                tx.execute(sql, all.as_slice())?;
            }
            tx.commit()?;
            Ok(ok)
        })
    }

    /// Adds or overwrites tags; refuses if the key would carry more than `max`.
    pub fn tag_key(
        &self,
        id: &Uuid,
        tags: &[(String, String)],
        max: usize,
    ) -> KmsResult<Conditional<()>> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, id, &["Enabled", "Disabled"])? {
                return Ok(Err(r));
            }
            for (k, v) in tags {
                tx.execute(
                    "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                    params![id.to_string(), k, v],
                )?;
            }
            let n: i64 = tx.query_row(
                "SELECT COUNT(*) FROM key_tags WHERE key_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )?;
            if n as usize > max {
                return Ok(Err(Refused::TooMany(max))); // dropping `tx` rolls back
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    pub fn untag_key(&self, id: &Uuid, keys: &[String]) -> KmsResult<Conditional<()>> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, id, &["Enabled", "Disabled"])? {
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
        })
    }

    fn aliases_of(c: &Connection, id: &Uuid) -> rusqlite::Result<usize> {
        c.query_row(
            "SELECT COUNT(*) FROM aliases WHERE key_id = ?1",
            [id.to_string()],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n as usize)
    }

    pub fn create_alias(
        &self,
        name: &str,
        key: &Uuid,
        now_ms: i64,
        max: usize,
    ) -> KmsResult<Conditional<()>> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(r) = require_state(&tx, key, &["Enabled", "Disabled"])? {
                return Ok(Err(r));
            }
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )?;
            if exists {
                return Ok(Err(Refused::AliasExists));
            }
            if Self::aliases_of(&tx, key)? >= max {
                return Ok(Err(Refused::TooMany(max)));
            }
            tx.execute(
                "INSERT INTO aliases (name, key_id, creation_date_ms, last_updated_ms)
                 VALUES (?1, ?2, ?3, ?3)",
                params![name, key.to_string(), now_ms],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    pub fn update_alias(
        &self,
        name: &str,
        key: &Uuid,
        now_ms: i64,
        max: usize,
    ) -> KmsResult<Conditional<()>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<String> = tx
                .query_row("SELECT key_id FROM aliases WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(current) = current else {
                return Ok(Err(Refused::AliasMissing));
            };
            if let Err(r) = require_state(&tx, key, &["Enabled", "Disabled"])? {
                return Ok(Err(r));
            }
            if current != key.to_string() && Self::aliases_of(&tx, key)? >= max {
                return Ok(Err(Refused::TooMany(max)));
            }
            tx.execute(
                "UPDATE aliases SET key_id = ?2, last_updated_ms = ?3 WHERE name = ?1",
                params![name, key.to_string(), now_ms],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    pub fn delete_alias(&self, name: &str) -> KmsResult<Conditional<()>> {
        self.with(|c| {
            c.execute("DELETE FROM aliases WHERE name = ?1", [name])
                .map(|n| {
                    if n == 1 {
                        Ok(())
                    } else {
                        Err(Refused::AliasMissing)
                    }
                })
        })
    }

    pub fn get_alias(&self, name: &str) -> KmsResult<Option<AliasRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("{ALIAS_COLUMNS} WHERE name = ?1"),
                [name],
                alias_row,
            )
            .optional()
        })
    }

    /// Aliases ordered by name after `after`, of one key or of all.
    pub fn list_aliases(
        &self,
        key: Option<&Uuid>,
        after: Option<&str>,
        limit: usize,
    ) -> KmsResult<Vec<AliasRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "{ALIAS_COLUMNS} WHERE name > ?1 AND (?2 IS NULL OR key_id = ?2)
                 ORDER BY name LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![
                    after.unwrap_or(""),
                    key.map(|k| k.to_string()),
                    limit as i64
                ],
                alias_row,
            )?;
            rows.collect()
        })
    }

    // ------------------------------------------------------------ grants

    /// Inserts a grant, unless the key already has one with the same name and the same
    /// terms: then that grant is returned (CreateGrant's idempotency by Name).
    /// Adds a grant unless the key already has `per_key` grants, or `per_grantee` for the
    /// grant's grantee; an identical named grant is returned instead of a new one.
    pub fn insert_grant(
        &self,
        g: &GrantRecord,
        per_key: usize,
        per_grantee: usize,
    ) -> KmsResult<Conditional<GrantRecord>> {
        let ctx_json = |m: &Option<std::collections::BTreeMap<String, String>>| {
            m.as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default())
        };
        let out = self.with(|c| {
            let tx = c.transaction()?;
            // As AWS's key-state table: only an Enabled key takes new grants.
            if let Err(r) = require_state(&tx, &g.key_id, &["Enabled"])? {
                return Ok(Err(r));
            }
            if g.name.is_some() {
                let same = tx
                    .prepare_cached(&format!("{GRANT_COLUMNS} WHERE key_id = ?1 AND name = ?2"))?
                    .query_map(params![g.key_id.to_string(), g.name], grant_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
                    .into_iter()
                    .find(|e| {
                        e.grantee_principal == g.grantee_principal
                            && e.retiring_principal == g.retiring_principal
                            && e.operations == g.operations
                            && e.context_subset == g.context_subset
                            && e.context_equals == g.context_equals
                    });
                if let Some(existing) = same {
                    return Ok(Ok(existing));
                }
            }
            let (all, of_grantee): (i64, i64) = tx
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(grantee_principal = ?2), 0)
                     FROM grants WHERE key_id = ?1",
                )?
                .query_row(params![g.key_id.to_string(), g.grantee_principal], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            if all as usize >= per_key {
                return Ok(Err(Refused::TooManyGrants {
                    per_grantee: false,
                    limit: per_key,
                }));
            }
            if of_grantee as usize >= per_grantee {
                return Ok(Err(Refused::TooManyGrants {
                    per_grantee: true,
                    limit: per_grantee,
                }));
            }
            tx.execute(
                "INSERT INTO grants (grant_id, key_id, name, grantee_principal, retiring_principal,
                     issuing_account, operations, context_subset, context_equals,
                     creation_date_ms, token)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    g.grant_id,
                    g.key_id.to_string(),
                    g.name,
                    g.grantee_principal,
                    g.retiring_principal,
                    g.issuing_account,
                    g.operations.join(","),
                    ctx_json(&g.context_subset),
                    ctx_json(&g.context_equals),
                    g.creation_date_ms,
                    g.token
                ],
            )?;
            tx.commit()?;
            Ok(Ok(g.clone()))
        });
        write(&self.grants).remove(&g.key_id);
        out
    }

    /// Every grant of a key (cached).
    pub fn key_grants(&self, key: &Uuid) -> KmsResult<std::sync::Arc<Vec<GrantRecord>>> {
        if let Some(g) = read(&self.grants).get(key) {
            return Ok(std::sync::Arc::clone(g));
        }
        self.with(|c| {
            let rows = c
                .prepare_cached(&format!(
                    "{GRANT_COLUMNS} WHERE key_id = ?1 ORDER BY grant_id"
                ))?
                .query_map([key.to_string()], grant_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let rows = std::sync::Arc::new(rows);
            write(&self.grants).insert(*key, std::sync::Arc::clone(&rows));
            Ok(rows)
        })
    }

    pub fn grant_by_token(&self, token: &str) -> KmsResult<Option<GrantRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("{GRANT_COLUMNS} WHERE token = ?1"),
                [token],
                grant_row,
            )
            .optional()
        })
    }

    /// Deletes a grant of a key; returns whether there was one.
    pub fn delete_grant(&self, key: &Uuid, grant_id: &str) -> KmsResult<bool> {
        let out = self.with(|c| {
            c.execute(
                "DELETE FROM grants WHERE key_id = ?1 AND grant_id = ?2",
                params![key.to_string(), grant_id],
            )
            .map(|n| n > 0)
        });
        write(&self.grants).remove(key);
        out
    }

    /// Grants whose retiring principal is `principal`, ordered by grant id after `after`.
    pub fn retirable_grants(
        &self,
        principal: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KmsResult<Vec<GrantRecord>> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "{GRANT_COLUMNS} WHERE retiring_principal = ?1 AND grant_id > ?2
                 ORDER BY grant_id LIMIT ?3"
            ))?
            .query_map(
                params![principal, after.unwrap_or(""), limit as i64],
                grant_row,
            )?
            .collect()
        })
    }

    // ------------------------------------------------------------ kmsuser password rotation

    /// Records the password a rotation is about to set, before the token is changed.
    pub fn set_pending_password(&self, id: &str, sealed: Option<&[u8]>) -> KmsResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE custom_key_stores SET pending_password = ?2 WHERE id = ?1",
                params![id, sealed],
            )
            .map(|_| ())
        })
    }

    pub fn pending_password(&self, id: &str) -> KmsResult<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(
                "SELECT pending_password FROM custom_key_stores WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// Makes the pending password the stored one (the token now has it).
    pub fn promote_pending_password(&self, id: &str) -> KmsResult<()> {
        let _forget = Forget::Store(self, id);
        self.with(|c| {
            c.execute(
                "UPDATE custom_key_stores SET sealed_password = pending_password,
                     pending_password = NULL
                 WHERE id = ?1 AND pending_password IS NOT NULL",
                [id],
            )
            .map(|_| ())
        })
    }
}

const GRANT_COLUMNS: &str = "SELECT grant_id, key_id, name, grantee_principal, retiring_principal,
    issuing_account, operations, context_subset, context_equals, creation_date_ms, token
    FROM grants";

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    let ctx = |i: usize| -> rusqlite::Result<Option<std::collections::BTreeMap<String, String>>> {
        let s: Option<String> = r.get(i)?;
        s.map(|s| {
            serde_json::from_str(&s).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    i,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })
        })
        .transpose()
    };
    let ops: String = r.get(6)?;
    Ok(GrantRecord {
        grant_id: r.get(0)?,
        key_id: parse_id(r.get(1)?, 1)?,
        name: r.get(2)?,
        grantee_principal: r.get(3)?,
        retiring_principal: r.get(4)?,
        issuing_account: r.get(5)?,
        operations: ops
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        context_subset: ctx(7)?,
        context_equals: ctx(8)?,
        creation_date_ms: r.get(9)?,
        token: r.get(10)?,
    })
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

const KEY_COLUMNS: &str = "SELECT id, custom_key_store_id, creation_date_ms, description,
    key_state, deletion_date_ms, pending_window_days, policy FROM keys";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: parse_id(r.get(0)?, 0)?,
        custom_key_store_id: r.get(1)?,
        creation_date_ms: r.get(2)?,
        description: r.get(3)?,
        key_state: r.get(4)?,
        deletion_date_ms: r.get(5)?,
        pending_window_days: r.get(6)?,
        policy: r.get(7)?,
    })
}

fn parse_id(s: String, col: usize) -> rusqlite::Result<Uuid> {
    Uuid::try_parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The stored state of a visible key (not `Creating` or `Deleting`), inside a transaction.
fn key_state(c: &Connection, id: &Uuid) -> rusqlite::Result<Option<String>> {
    let s: Option<String> = c
        .query_row(
            "SELECT key_state FROM keys WHERE id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(s.filter(|s| s != "Creating" && s != "Deleting"))
}

/// Refuses unless the key exists and is in one of `allowed` states.
fn require_state(c: &Connection, id: &Uuid, allowed: &[&str]) -> rusqlite::Result<Conditional<()>> {
    Ok(match key_state(c, id)? {
        None => Err(Refused::KeyMissing),
        Some(s) if allowed.contains(&s.as_str()) => Ok(()),
        Some(state) => Err(Refused::KeyState {
            state,
            allowed: allowed.iter().map(|a| a.to_string()).collect(),
        }),
    })
}

const ALIAS_COLUMNS: &str = "SELECT name, key_id, creation_date_ms, last_updated_ms FROM aliases";

fn alias_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AliasRecord> {
    Ok(AliasRecord {
        name: r.get(0)?,
        key_id: parse_id(r.get(1)?, 1)?,
        creation_date_ms: r.get(2)?,
        last_updated_ms: r.get(3)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A database made by the first schema opens, migrates, and keeps its rows.
    #[test]
    fn migrates_a_v1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        let id = Uuid::new_v4();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute(
                "INSERT INTO custom_key_stores VALUES ('cks-0', 'n', 'cluster-x', 'pem', x'00',
                 'DISCONNECTED', NULL, 0)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO keys VALUES (?1, 'cks-0', 5, 'old key', 'Enabled')",
                [id.to_string()],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let key = store.get_key(&id).unwrap().unwrap();
        assert_eq!(
            (key.description.as_str(), key.policy, key.deletion_date_ms),
            ("old key", None, None)
        );
        assert_eq!(store.create_alias("alias/a", &id, 1, 50).unwrap(), Ok(()));
        drop(store);
        // Opening again runs no migration twice.
        let store = Store::open(&path).unwrap();
        assert!(store.get_alias("alias/a").unwrap().is_some());
    }

    /// The grant limits hold: per key, and per grantee on a key; a refused grant is not
    /// written.
    #[test]
    fn grants_are_bounded_per_key_and_per_grantee() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.sqlite3")).unwrap();
        store
            .insert_store(&StoreRecord {
                id: "cks-0".into(),
                name: "s".into(),
                cluster_id: "cluster-x".into(),
                trust_anchor: "pem".into(),
                sealed_password: vec![0],
                connection_state: "CONNECTED".into(),
                connection_error_code: None,
                creation_date_ms: 0,
            })
            .unwrap();
        let key = Uuid::new_v4();
        store
            .insert_key(
                &KeyRecord {
                    id: key,
                    custom_key_store_id: "cks-0".into(),
                    creation_date_ms: 0,
                    description: String::new(),
                    key_state: "Enabled".into(),
                    deletion_date_ms: None,
                    pending_window_days: None,
                    policy: None,
                },
                &[],
            )
            .unwrap();
        let grant = |n: usize, grantee: &str| GrantRecord {
            grant_id: format!("{n:064x}"),
            key_id: key,
            name: None,
            grantee_principal: grantee.into(),
            retiring_principal: None,
            issuing_account: "arn:aws:iam::111122223333:root".into(),
            operations: vec!["Encrypt".into()],
            context_subset: None,
            context_equals: None,
            creation_date_ms: 0,
            token: format!("t{n}"),
        };
        let (per_key, per_grantee) = (5, 2);
        let mut outcomes = Vec::new();
        for (n, who) in ["a", "a", "a", "b", "b", "c", "d"].iter().enumerate() {
            let r = store
                .insert_grant(&grant(n, who), per_key, per_grantee)
                .unwrap();
            outcomes.push(r.map(|_| ()));
        }
        let over = |per_grantee, limit| Err(Refused::TooManyGrants { per_grantee, limit });
        assert_eq!(
            outcomes,
            [
                Ok(()),
                Ok(()),
                over(true, 2),
                Ok(()),
                Ok(()),
                Ok(()),
                over(false, 5)
            ]
        );
        assert_eq!(store.key_grants(&key).unwrap().len(), 5);
    }
}
