//! The embedded metadata database: SQLite, one file, one writer.
//!
//! Every call is one transaction, so each is atomic with respect to the others, and a
//! condition a change depends on is checked inside the transaction that makes it; calls run
//! off the async workers (`Sqlite::raw`). Rows read
//! on the hot path (every cryptographic request reads its key and key store, and the key's
//! grants when a policy does not allow it) are cached, and invalidated after every write to
//! them. The files hold one table family each: key stores, keys (with tags), aliases, grants.

mod aliases;
mod grants;
mod keys;
mod keystores;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use super::{Failure, GrantRecord, KeyRecord, KeyStoreRecord, MetaResult, Precondition};
use crate::metadata::{schema, sql};
use model::states::{KeyState, StateSet};

/// `sql`, written with PostgreSQL's `$N` placeholders (`metadata::sql`), in SQLite's `?N`.
pub(super) fn q(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        let numbered = c == '$' && chars.peek().is_some_and(char::is_ascii_digit);
        out.push(if numbered { '?' } else { c });
    }
    out
}

/// Now, in Unix milliseconds, in SQLite's SQL.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

pub struct Sqlite {
    conn: Mutex<Connection>,
    /// Cached rows. Filled only while holding `conn`, and invalidated after every write to
    /// the row, so a fill can never put back a value older than the last write.
    keys: RwLock<HashMap<Uuid, KeyRecord>>,
    keystores: RwLock<HashMap<String, KeyStoreRecord>>,
    /// Each key's grants; dropped on any change to the key's grants.
    grants: RwLock<HashMap<Uuid, Arc<Vec<GrantRecord>>>>,
}

impl Sqlite {
    /// Opens (creating it owner-only if need be) and migrates the database file.
    pub fn open(path: &Path) -> anyhow::Result<Sqlite> {
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
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::with_connection(conn)
    }

    /// A database in memory, for tests of the domain.
    pub fn in_memory() -> anyhow::Result<Sqlite> {
        Self::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(mut conn: Connection) -> anyhow::Result<Sqlite> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (n, step) in schema::pending(schema::Dialect::Sqlite, done) {
            let tx = conn.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", n)?;
            tx.commit()?;
        }
        Ok(Sqlite {
            conn: Mutex::new(conn),
            keys: RwLock::new(HashMap::new()),
            keystores: RwLock::new(HashMap::new()),
            grants: RwLock::new(HashMap::new()),
        })
    }

    /// Runs `f` on the connection; an SQLite error is `Failure::Internal`.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> MetaResult<T> {
        self.raw(f).map_err(internal)
    }

    /// Runs `f` on the connection, for callers that translate SQLite errors themselves.
    ///
    /// SQLite blocks: a write waits for its fsync (synchronous=FULL), and every call waits
    /// for the one connection. On a multi-threaded runtime (the server's) the call runs in
    /// `block_in_place`, which first hands this worker's other tasks to another thread, so
    /// that requests that need no database (and the timers of the request path) are not
    /// held up behind a disk flush. A current-thread runtime (unit tests) runs it inline.
    fn raw<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let run = || {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    fn forget_key(&self, id: &Uuid) {
        write(&self.keys).remove(id);
    }

    fn forget_keystore(&self, id: &str) {
        write(&self.keystores).remove(id);
    }

    fn forget_grants(&self, key: &Uuid) {
        write(&self.grants).remove(key);
    }
}

/// Invalidates a cached row when dropped: at the end of a write method, after its commit.
enum Forget<'a> {
    Key(&'a Sqlite, Uuid),
    KeyStore(&'a Sqlite, &'a str),
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        match self {
            Forget::Key(s, id) => s.forget_key(id),
            Forget::KeyStore(s, id) => s.forget_keystore(id),
        }
    }
}

fn read<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockReadGuard<'_, HashMap<K, V>> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockWriteGuard<'_, HashMap<K, V>> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn internal(e: rusqlite::Error) -> Failure {
    Failure::Internal(e.to_string())
}

/// A column that does not hold what this code wrote there.
fn bad_column(col: usize, what: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("not {what}").into(),
    )
}

fn parse_id(s: String, col: usize) -> rusqlite::Result<Uuid> {
    Uuid::try_parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A key's stored state, inside a transaction; `None` if there is no such key.
fn stored_key_state(c: &Connection, id: &Uuid) -> rusqlite::Result<Option<KeyState>> {
    let s: Option<String> = c
        .query_row(&q(sql::KEY_STATE), [id.to_string()], |r| r.get(0))
        .optional()?;
    s.map(|s| KeyState::parse(&s).ok_or_else(|| bad_column(0, "a key state")))
        .transpose()
}

/// Whether a change accepting `accepted` may go ahead on the key, inside its transaction.
fn require_state(
    c: &Connection,
    id: &Uuid,
    accepted: StateSet,
) -> rusqlite::Result<MetaResult<()>> {
    Ok(match stored_key_state(c, id)? {
        Some(s) if accepted.contains(s) => Ok(()),
        Some(s) if s.visible() => Err(Failure::Precondition(Precondition::KeyState(s))),
        _ => Err(Failure::NotFound),
    })
}

/// Turns the unique-constraint violation of `column` (as SQLite names it, `table.column`)
/// into `Taken(what)`.
fn taken(e: rusqlite::Error, columns: &[(&str, super::Unique)]) -> Failure {
    if let rusqlite::Error::SqliteFailure(f, Some(msg)) = &e {
        if f.code == rusqlite::ErrorCode::ConstraintViolation {
            if let Some((_, u)) = columns.iter().find(|(c, _)| msg.contains(c)) {
                return Failure::Taken(*u);
            }
        }
    }
    internal(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Aliases, Keys};

    /// The metadata contract, each check a test of its own.
    mod contract {
        use super::*;

        crate::metadata::contract::contract_tests!(
            async { Arc::new(Sqlite::in_memory().unwrap()) as Arc<dyn crate::metadata::Metadata> }
                .await
        );
    }

    /// A database made by the first schema opens, migrates, and keeps its rows.
    #[test]
    fn placeholders_are_written_as_sqlite_writes_them() {
        assert_eq!(
            q("UPDATE t SET a = $2, b = $10 WHERE id = $1 AND c = '$x'"),
            "UPDATE t SET a = ?2, b = ?10 WHERE id = ?1 AND c = '$x'"
        );
    }

    #[tokio::test]
    async fn migrates_a_v1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        let id = Uuid::new_v4();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(crate::metadata::schema::SQLITE_FIRST)
                .unwrap();
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
        let db = Sqlite::open(&path).unwrap();
        let key = db.key(&id).await.unwrap().unwrap();
        assert_eq!(
            (key.description.as_str(), key.policy, key.deletion_date_ms),
            ("old key", None, None)
        );
        let any = StateSet::of(&[KeyState::Enabled]);
        db.create_alias("alias/a", &id, any, 1, 50).await.unwrap();
        drop(db);
        // Opening again runs no migration twice.
        let db = Sqlite::open(&path).unwrap();
        assert!(db.alias("alias/a").await.unwrap().is_some());
    }
}
