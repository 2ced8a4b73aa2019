//! The SQL both metadata databases run, each statement written once, with PostgreSQL's
//! `$N` placeholders: PostgreSQL runs them as written, SQLite after `sqlite::q` (`?N`). State
//! names are never written by hand (`lit`, `states`). A change conditioned on a key's state
//! is one statement on both (`if_key_in`); when it changes nothing, the backend reads why.
//!
//! What the two databases do differently on purpose stays with each: PostgreSQL locks rows
//! (`FOR UPDATE`) where SQLite, one writer, checks inside its transaction; PostgreSQL keeps a
//! store's `state_since_ms` with a trigger; the clock query. The schema's history is
//! `schema.rs`.

use super::Removal;
use model::states::{KeyState, StateSet};

/// A state as an SQL string literal, spelled by its enum (`KeyState::Deleting` is
/// `'Deleting'`): no state name is written by hand in SQL.
pub fn lit(state: &str) -> String {
    format!("'{state}'")
}

/// `SELECT <the columns of the table of aliases> FROM ...`, then `$tail`.
macro_rules! select_aliases {
    () => {
        "SELECT name, key_id, creation_date_ms, last_updated_ms FROM aliases"
    };
    ($tail:literal) => {
        concat!(select_aliases!(), " ", $tail)
    };
}

/// `SELECT <the columns of the table of grants> FROM ...`, then `$tail`.
macro_rules! select_grants {
    () => {
        "SELECT grant_id, key_id, name, grantee_principal, retiring_principal, issuing_account, \
         operations, context_subset, context_equals, creation_date_ms, token FROM grants"
    };
    ($tail:literal) => {
        concat!(select_grants!(), " ", $tail)
    };
}

/// `SELECT <the columns of the table of keys> FROM ...`, then `$tail`.
macro_rules! select_keys {
    () => {
        "SELECT id, custom_key_store_id, creation_date_ms, description, key_state, \
         deletion_date_ms, pending_window_days, policy FROM keys"
    };
    ($tail:literal) => {
        concat!(select_keys!(), " ", $tail)
    };
}

/// `SELECT <the columns of the table of keystores> FROM ...`, then `$tail`.
macro_rules! select_keystores {
    () => {
        "SELECT id, name, cluster_id, trust_anchor, sealed_password, connection_state, \
         connection_error_code, creation_date_ms FROM custom_key_stores"
    };
    ($tail:literal) => {
        concat!(select_keystores!(), " ", $tail)
    };
}

pub const ALIAS_COLUMNS: &str = select_aliases!();
pub const KEY_COLUMNS: &str = select_keys!();

pub const COUNT_ALIASES_OF_KEY: &str = "SELECT COUNT(*) FROM aliases WHERE key_id = $1";
pub const INSERT_ALIAS: &str =
    "INSERT INTO aliases (name, key_id, creation_date_ms, last_updated_ms)
    VALUES ($1, $2, $3, $3)";
pub const UPDATE_ALIAS_TARGET: &str =
    "UPDATE aliases SET key_id = $2, last_updated_ms = $3 WHERE name = $1";
pub const DELETE_ALIAS: &str = "DELETE FROM aliases WHERE name = $1";
pub const ALIAS_BY_NAME: &str = select_aliases!("WHERE name = $1");
pub const GRANT_BY_NAME: &str = select_grants!("WHERE key_id = $1 AND name = $2");
pub const INSERT_GRANT: &str =
    "INSERT INTO grants (grant_id, key_id, name, grantee_principal, retiring_principal,
    issuing_account, operations, context_subset, context_equals,
    creation_date_ms, token)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
pub const GRANTS_OF_KEY: &str = select_grants!("WHERE key_id = $1 ORDER BY grant_id");
pub const GRANT_BY_TOKEN: &str = select_grants!("WHERE token = $1");
/// The key `$1`'s grants, and how many of them are for the grantee `$2`.
pub const COUNT_GRANTS_OF_KEY: &str =
    "SELECT COUNT(*), COUNT(CASE WHEN grantee_principal = $2 THEN 1 END)
    FROM grants WHERE key_id = $1";
pub const DELETE_GRANT: &str = "DELETE FROM grants WHERE key_id = $1 AND grant_id = $2";
pub const RETIRABLE_GRANTS: &str =
    select_grants!("WHERE retiring_principal = $1 AND grant_id > $2 ORDER BY grant_id LIMIT $3");
pub const INSERT_KEY: &str =
    "INSERT INTO keys (id, custom_key_store_id, creation_date_ms, description, key_state,
    policy)
    VALUES ($1, $2, $3, $4, $5, $6)";
pub const INSERT_TAG: &str =
    "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES ($1, $2, $3)";
pub const KEY_BY_ID: &str = select_keys!("WHERE id = $1");
pub const DELETE_KEY: &str = "DELETE FROM keys WHERE id = $1";
pub const UPSERT_TAG: &str = "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES ($1, $2, $3)
    ON CONFLICT (key_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value";
pub const COUNT_TAGS: &str = "SELECT COUNT(*) FROM key_tags WHERE key_id = $1";
pub const TAGS_PAGE: &str =
    "SELECT tag_key, tag_value FROM key_tags WHERE key_id = $1 AND tag_key > $2
    ORDER BY tag_key LIMIT $3";
/// A key's use, kept only if newer than the one recorded, and only for a key that exists.
pub const RECORD_KEY_USAGE: &str = "INSERT INTO key_usage (key_id, operation, used_ms, request_id)
    SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS BIGINT), CAST($4 AS TEXT)
    WHERE EXISTS (SELECT 1 FROM keys WHERE id = $1)
    ON CONFLICT (key_id) DO UPDATE SET operation = excluded.operation,
        used_ms = excluded.used_ms, request_id = excluded.request_id
    WHERE excluded.used_ms > key_usage.used_ms";
pub const KEY_USAGE: &str =
    "SELECT operation, used_ms, request_id FROM key_usage WHERE key_id = $1";
pub const USAGE_TRACKING_START: &str = "SELECT MIN(started_ms) FROM usage_tracking";
pub const KEYSTORE_STATE: &str = "SELECT connection_state FROM custom_key_stores WHERE id = $1";
pub const INSERT_KEYSTORE: &str =
    "INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor, sealed_password,
    connection_state, connection_error_code, creation_date_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
pub const KEYSTORE_BY_ID: &str = select_keystores!("WHERE id = $1");
pub const KEYSTORE_BY_NAME: &str = select_keystores!("WHERE name = $1");
pub const KEYSTORES_PAGE: &str = select_keystores!("WHERE id > $1 ORDER BY id LIMIT $2");
pub const COUNT_KEYS_OF_KEYSTORE: &str = "SELECT COUNT(*) FROM keys WHERE custom_key_store_id = $1";
pub const DELETE_KEYSTORE: &str = "DELETE FROM custom_key_stores WHERE id = $1";
pub const SET_PENDING_PASSWORD: &str =
    "UPDATE custom_key_stores SET pending_password = $2 WHERE id = $1";
pub const PENDING_PASSWORD: &str = "SELECT pending_password FROM custom_key_stores WHERE id = $1";
pub const PROMOTE_PENDING_PASSWORD: &str =
    "UPDATE custom_key_stores SET sealed_password = pending_password,
    pending_password = NULL
    WHERE id = $1 AND pending_password IS NOT NULL";
pub const INSERT_SEALING_CHECK: &str =
    "INSERT INTO service_checks (name, value) VALUES ('sealing', $1)
    ON CONFLICT (name) DO NOTHING";
pub const SEALING_CHECK: &str = "SELECT value FROM service_checks WHERE name = 'sealing'";
pub const UPSERT_REPLICA: &str = "INSERT INTO replicas (id, last_seen_ms) VALUES ($1, $2)
    ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms";
pub const DELETE_STALE_REPLICAS: &str = "DELETE FROM replicas WHERE last_seen_ms < $1";
pub const COUNT_LIVE_REPLICAS: &str = "SELECT COUNT(*) FROM replicas WHERE last_seen_ms >= $1";
pub const DELETE_REPLICA: &str = "DELETE FROM replicas WHERE id = $1";
pub const UPSERT_AUDIT_HEAD: &str =
    "INSERT INTO audit_heads (replica, seq, head, recorded_ms) VALUES ($1, $2, $3, $4)
    ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq, head = excluded.head,
    recorded_ms = excluded.recorded_ms
    WHERE audit_heads.seq <= excluded.seq";
pub const AUDIT_HEADS: &str =
    "SELECT replica, seq, head, recorded_ms FROM audit_heads ORDER BY replica";
pub const KEY_STATE: &str = "SELECT key_state FROM keys WHERE id = $1";

/// Visible keys after `$1`, by id, at most `$2`.
pub fn keys_page() -> String {
    format!(
        "{KEY_COLUMNS} WHERE id > $1 AND key_state NOT IN ({}, {}) ORDER BY id LIMIT $2",
        lit(KeyState::Creating.as_str()),
        lit(KeyState::Deleting.as_str()),
    )
}

/// The keys of store `$1` whose creation began before `$2` and never finished, and those a
/// sweep marked Deleting without a deletion date.
pub fn abandoned_creations() -> String {
    format!(
        "SELECT id FROM keys WHERE custom_key_store_id = $1
         AND ((key_state = {} AND creation_date_ms < $2)
             OR (key_state = {} AND deletion_date_ms IS NULL))",
        lit(KeyState::Creating.as_str()),
        lit(KeyState::Deleting.as_str()),
    )
}

/// Keys whose deletion date is at or before `$1`, earliest first, at most `$2`.
pub fn keys_due() -> String {
    format!(
        "{KEY_COLUMNS} WHERE key_state IN ({}, {}) AND deletion_date_ms <= $1
         ORDER BY deletion_date_ms LIMIT $2",
        lit(KeyState::PendingDeletion.as_str()),
        lit(KeyState::Deleting.as_str()),
    )
}

/// A key state or set of them as an SQL list of literals (`'Enabled', 'Disabled'`); `NULL`
/// for none, which no row's state equals.
pub fn states(set: StateSet) -> String {
    let list: Vec<String> = set.iter().map(|s| lit(s.as_str())).collect();
    if list.is_empty() {
        "NULL".into()
    } else {
        list.join(", ")
    }
}

// Changes to one key, made only while it is in the states the change accepts
// (`if_key_in`): the key id is `$1`, the change's own values follow from `$2`.
pub const SET_KEY_STATE: &str = "UPDATE keys SET key_state = $2";
pub const SET_DESCRIPTION: &str = "UPDATE keys SET description = $2";
pub const SET_POLICY: &str = "UPDATE keys SET policy = $2";
pub const CANCEL_DELETION: &str =
    "UPDATE keys SET key_state = $2, deletion_date_ms = NULL, pending_window_days = NULL";

/// Schedules the key's deletion: `$2` the date, `$3` the window in days.
pub fn schedule_deletion() -> String {
    format!(
        "UPDATE keys SET key_state = {}, deletion_date_ms = $2, pending_window_days = $3",
        lit(KeyState::PendingDeletion.as_str())
    )
}

/// `change` (one of the key changes above), as one statement that changes the key `$1`
/// only if it is in `accepted`.
pub fn if_key_in(change: &str, accepted: StateSet) -> String {
    format!(
        "{change} WHERE id = $1 AND key_state IN ({})",
        states(accepted)
    )
}

/// The one UPDATE of a deletion claim on a key (`Keys::claim_removal`), and the
/// cutoff that is its fifth parameter, if any. Parameters: 1 key id, 2 now (ms), 3 owner,
/// 4 lease (ms), 5 the cutoff. A key qualifies, then its claim must be free: unclaimed,
/// this owner's, or lapsed.
pub fn claim(removal: Removal) -> (String, Option<i64>) {
    let (creating, deleting, pending) = (
        lit(KeyState::Creating.as_str()),
        lit(KeyState::Deleting.as_str()),
        lit(KeyState::PendingDeletion.as_str()),
    );
    let (qualifies, cutoff) = match removal {
        Removal::Due => (
            format!("deletion_date_ms <= $2 AND key_state IN ({pending}, {deleting})"),
            None,
        ),
        Removal::Abandoned { created_before_ms } => (
            format!(
                "deletion_date_ms IS NULL AND (key_state = {deleting}
                 OR (key_state = {creating} AND creation_date_ms < $5))"
            ),
            Some(created_before_ms),
        ),
    };
    let sql = format!(
        "UPDATE keys SET key_state = {deleting}, deletion_owner = $3,
             deletion_lease_until = $2 + $4
         WHERE id = $1 AND {qualifies} AND (key_state <> {deleting}
             OR deletion_owner IS NULL OR deletion_owner = $3 OR deletion_lease_until <= $2)"
    );
    (sql, cutoff)
}
