//! The metadata seam: everything hsm-kms remembers besides key material (custom key stores,
//! keys, tags, aliases, grants), behind one interface, `Metadata`.
//!
//! An implementation stores rows and applies changes atomically; it knows no AWS exception
//! and no business rule. A change that depends on what is stored (a key's state, a unique
//! name, a count) is given its condition by the domain and reports a typed `Failure` when
//! the condition does not hold; the domain decides what that means to a caller.
//!
//! `sqlite` is the embedded implementation. `contract` is the test suite every
//! implementation must pass.

pub mod postgres;
mod schema;
mod sql;
pub mod sqlite;

#[cfg(test)]
pub mod contract;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use model::states::{ConnectionErrorCode, ConnectionState, KeyState, StateSet};

/// A custom key store row.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyStoreRecord {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    pub trust_anchor: String,
    /// The kmsuser password, sealed with the service's password-sealing key.
    pub sealed_password: Vec<u8>,
    pub connection_state: ConnectionState,
    pub connection_error_code: Option<ConnectionErrorCode>,
    pub creation_date_ms: i64,
}

impl std::fmt::Debug for KeyStoreRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStoreRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .field("connection_state", &self.connection_state)
            .finish_non_exhaustive()
    }
}

/// Changes to a custom key store row; `None` leaves a column as it is.
#[derive(Default)]
pub struct KeyStoreUpdate {
    pub name: Option<String>,
    pub cluster_id: Option<String>,
    /// A new sealed password; it also drops a pending one (see `set_pending_password`).
    pub sealed_password: Option<Vec<u8>>,
}

/// The last successful cryptographic use of a key (GetKeyLastUsage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: Uuid,
    /// The operation's AWS name.
    pub operation: String,
    pub used_ms: i64,
    /// The id of the request's audit line.
    pub request_id: String,
}

/// A key row. `key_state` is the stored state; what a caller sees also depends on the key
/// store's connection (`KeyState::seen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: Uuid,
    pub custom_key_store_id: String,
    pub creation_date_ms: i64,
    pub description: String,
    pub key_state: KeyState,
    pub deletion_date_ms: Option<i64>,
    pub pending_window_days: Option<i32>,
    /// The key policy; `None` for the default key policy.
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

/// A grant row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    pub grant_id: String,
    pub key_id: Uuid,
    pub name: Option<String>,
    pub grantee_principal: String,
    pub retiring_principal: Option<String>,
    pub issuing_account: String,
    pub operations: Vec<String>,
    pub context_subset: Option<BTreeMap<String, String>>,
    pub context_equals: Option<BTreeMap<String, String>>,
    pub creation_date_ms: i64,
    pub token: String,
}

/// How a grant's list columns are stored, the same by every implementation: operations
/// comma-separated, encryption-context constraints as JSON objects.
pub(crate) mod grant_columns {
    use std::collections::BTreeMap;

    pub fn operations(ops: &[String]) -> String {
        ops.join(",")
    }

    pub fn parse_operations(column: &str) -> Vec<String> {
        column
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    pub fn context(c: &Option<BTreeMap<String, String>>) -> Option<String> {
        c.as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_default())
    }

    pub fn parse_context(
        column: Option<&str>,
    ) -> Result<Option<BTreeMap<String, String>>, serde_json::Error> {
        column.map(serde_json::from_str).transpose()
    }
}

impl GrantRecord {
    /// Whether `other` grants the same thing to the same principals (a named grant asked
    /// for again with these terms is the same grant).
    pub fn same_terms(&self, other: &GrantRecord) -> bool {
        self.grantee_principal == other.grantee_principal
            && self.retiring_principal == other.retiring_principal
            && self.operations == other.operations
            && self.context_subset == other.context_subset
            && self.context_equals == other.context_equals
    }
}

/// A unique name that was already taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unique {
    KeyStoreName,
    KeyStoreCluster,
    AliasName,
}

/// A condition of a change that did not hold; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The key is in this (visible) state, which the change does not accept.
    KeyState(KeyState),
    /// The key store is in this connection state, which the change does not accept.
    ConnectionState(ConnectionState),
    /// The key store still holds this many keys.
    KeyStoreHasKeys(u64),
    /// The change would take a count (tags or aliases of a key) over this limit.
    Limit(usize),
    /// The key has this many grants already, in all or (`per_grantee`) for the grantee.
    GrantLimit { per_grantee: bool, limit: usize },
}

/// Why a metadata call did not do what it was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The row the call names does not exist (a key in `Creating` or `Deleting` counts as
    /// absent unless the call accepts that state).
    NotFound,
    Taken(Unique),
    Precondition(Precondition),
    /// The database failed; the text is for the log only.
    Internal(String),
    /// The database did not answer in time, or could not be reached: the call may or may
    /// not have taken effect, and the caller may retry. The text is for the log only.
    Unavailable(String),
}

pub type MetaResult<T> = Result<T, Failure>;

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => f.write_str("not found"),
            Failure::Taken(u) => write!(f, "{u:?} taken"),
            Failure::Precondition(p) => write!(f, "precondition failed: {p:?}"),
            Failure::Internal(e) => write!(f, "metadata database: {e}"),
            Failure::Unavailable(e) => write!(f, "metadata database unavailable: {e}"),
        }
    }
}

/// A metadata outcome the calling code did not expect is an internal error; the outcomes a
/// caller can cause (not found, a name taken, a state refused) are matched where they arise.
impl From<Failure> for model::error::KmsError {
    fn from(f: Failure) -> Self {
        match f {
            // Retryable, as AWS's DependencyTimeoutException is; the detail goes to the log.
            Failure::Unavailable(_) => {
                let _logged = model::error::KmsError::internal(&f);
                model::error::KmsError::new(
                    model::error::ErrorKind::DependencyTimeout,
                    "The metadata database did not answer in time; retry the request",
                )
            }
            f => model::error::KmsError::internal(f),
        }
    }
}

/// Custom key store rows, and the kmsuser password being rotated.
#[async_trait]
pub trait KeyStores: Send + Sync {
    /// Fails with `Taken` if the name or the cluster is another store's.
    async fn insert_keystore(&self, rec: &KeyStoreRecord) -> MetaResult<()>;
    async fn keystore(&self, id: &str) -> MetaResult<Option<KeyStoreRecord>>;
    async fn keystore_by_name(&self, name: &str) -> MetaResult<Option<KeyStoreRecord>>;
    /// Stores ordered by id, after `after`.
    async fn list_keystores(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<KeyStoreRecord>>;
    /// Sets the connection state (and error code) if the current state is one of `from`.
    async fn transition_keystore(
        &self,
        id: &str,
        from: &[ConnectionState],
        to: ConnectionState,
        error_code: Option<ConnectionErrorCode>,
    ) -> MetaResult<()>;
    /// Ends a `from` state (CONNECTING or DISCONNECTING) that began more than
    /// `older_than_ms` ago by the database's clock: the replica driving it is gone. The
    /// store turns DISCONNECTED. A younger or other state fails (`Precondition`): a live
    /// transition on another replica is left alone.
    async fn abandon_transition(
        &self,
        id: &str,
        from: ConnectionState,
        older_than_ms: i64,
    ) -> MetaResult<()>;
    /// Fails with `Taken` if a new name or cluster is another store's.
    async fn update_keystore(&self, id: &str, update: &KeyStoreUpdate) -> MetaResult<()>;
    /// Deletes the store if it is in state `only_in` and holds no keys.
    async fn delete_keystore(&self, id: &str, only_in: ConnectionState) -> MetaResult<()>;
    /// Records (or clears) the sealed password a rotation is about to set on the token.
    async fn set_pending_password(&self, id: &str, sealed: Option<&[u8]>) -> MetaResult<()>;
    async fn pending_password(&self, id: &str) -> MetaResult<Option<Vec<u8>>>;
    /// Makes the pending password the stored one, if there is one.
    async fn promote_pending_password(&self, id: &str) -> MetaResult<()>;
    /// Records `candidate` as the service's sealing-key check value unless one is recorded
    /// already; returns the value recorded (the first replica's).
    async fn sealing_check(&self, candidate: &[u8]) -> MetaResult<Vec<u8>>;
    /// Records that `replica` is alive at `now_ms`; returns how many replicas were seen
    /// within `live_ms` of it (this one included).
    async fn heartbeat(&self, replica: &str, now_ms: i64, live_ms: i64) -> MetaResult<u32>;
    /// Forgets `replica` (it is stopping): the others take its share at their next beat.
    async fn leave(&self, replica: &str) -> MetaResult<()>;
    /// The database's clock, in milliseconds since the Unix epoch: the one clock every
    /// replica agrees on (due dates, leases, heartbeats).
    async fn clock_ms(&self) -> MetaResult<i64>;
    /// Records a replica's audit chain head, unless a later line of that chain is recorded
    /// already (a head never moves back: a trail cut at its end then shows).
    async fn record_audit_head(&self, head: &AuditHead) -> MetaResult<()>;
    /// Every replica's last recorded audit chain head.
    async fn audit_heads(&self) -> MetaResult<Vec<AuditHead>>;
    /// Why this replica reads every row from the database instead of its cache (the change
    /// listener is down), if it does; for readiness. A single node has nothing to hear.
    fn cache_bypassed(&self) -> Option<&'static str> {
        None
    }
    /// Whether other replicas may share this database (PostgreSQL) or this process is
    /// alone with it (SQLite).
    fn shared(&self) -> bool {
        false
    }
    /// How long after a change commits every other live replica has it in force (or has
    /// stopped serving from its cache): the request path waits this long before it answers
    /// a change that takes access away. None to wait for a single node.
    fn revocation_fence(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// The metadata database a configuration names: PostgreSQL (`[database]`, migrated), else
/// the SQLite file at storage.sqlite_path (created if missing).
pub async fn open(settings: &crate::config::Settings) -> anyhow::Result<Arc<dyn Metadata>> {
    use anyhow::Context as _;
    Ok(match &settings.database {
        Some(db) => {
            let password = db.password()?;
            Arc::new(
                postgres::Postgres::open(postgres::Connect {
                    url: &db.url,
                    password: password.as_ref().map(|p| p.as_str()),
                    pool_size: db.pool_size,
                    tls_ca_file: db.tls_ca_file.as_deref(),
                })
                .await
                .context("opening the PostgreSQL metadata database (database.url)")?,
            )
        }
        None => {
            let path = &settings.storage.sqlite_path;
            Arc::new(
                sqlite::Sqlite::open(path)
                    .with_context(|| format!("opening metadata database {}", path.display()))?,
            )
        }
    })
}

/// Where a replica's audit chain stood: its line `seq` had hash `head`, at `recorded_ms`
/// (the database's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditHead {
    pub replica: String,
    pub seq: u64,
    pub head: String,
    pub recorded_ms: i64,
}

/// Which keys a sweeper may claim for removal (`Keys::claim_removal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// A scheduled deletion whose date is at or before the claim's `now_ms`.
    Due,
    /// A creation abandoned before `created_before_ms`: the row is still `Creating`, so no
    /// CreateKey made since then can be working on it.
    Abandoned { created_before_ms: i64 },
}

/// Key rows and their tags. A change given `accepted` applies only to a key in one of those
/// states; otherwise it fails with `Precondition(KeyState)`, or `NotFound` for a key that
/// is absent or invisible (`Creating`, `Deleting`) and not accepted.
#[async_trait]
pub trait Keys: Send + Sync {
    /// Inserts a key row and its tags, atomically.
    async fn insert_key(&self, rec: &KeyRecord, tags: &[(String, String)]) -> MetaResult<()>;
    async fn key(&self, id: &Uuid) -> MetaResult<Option<KeyRecord>>;
    /// Visible keys ordered by id, after `after`.
    async fn list_keys(&self, after: Option<&Uuid>, limit: usize) -> MetaResult<Vec<KeyRecord>>;
    /// Keys of a store whose creation was abandoned: rows still `Creating` that were
    /// created before `before_ms`, and rows a sweeper claimed for removal as such (`Deleting`
    /// without a deletion date) whatever their claim; `claim_removal` decides which are free.
    async fn abandoned_creations(&self, keystore_id: &str, before_ms: i64)
        -> MetaResult<Vec<Uuid>>;
    async fn set_key_state(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()>;
    async fn delete_key(&self, id: &Uuid) -> MetaResult<()>;
    async fn set_description(
        &self,
        id: &Uuid,
        accepted: StateSet,
        description: &str,
    ) -> MetaResult<()>;
    async fn set_policy(&self, id: &Uuid, accepted: StateSet, policy: &str) -> MetaResult<()>;
    /// PendingDeletion with its date and window.
    async fn schedule_deletion(
        &self,
        id: &Uuid,
        accepted: StateSet,
        date_ms: i64,
        window_days: i32,
    ) -> MetaResult<()>;
    /// Ends a pending deletion: the key goes to state `to`, its deletion date cleared.
    async fn cancel_deletion(&self, id: &Uuid, accepted: StateSet, to: KeyState) -> MetaResult<()>;
    /// Keys pending deletion (or being deleted) whose date is at or before `now_ms`.
    async fn keys_due(&self, now_ms: i64, limit: usize) -> MetaResult<Vec<KeyRecord>>;
    /// Claims a key for removal (`removal` says which keys qualify) by `owner` until
    /// `now_ms + lease_ms`, marking it `Deleting`: only if it still qualifies and no other
    /// owner holds an unexpired claim (`NotFound` otherwise). The owner claiming again renews
    /// its claim. With several replicas sweeping, one destroys the key's material; a replica
    /// frozen past its lease loses the key to another, and finds so when it renews before
    /// destroying.
    async fn claim_removal(
        &self,
        id: &Uuid,
        removal: Removal,
        now_ms: i64,
        owner: &str,
        lease_ms: i64,
    ) -> MetaResult<()>;
    /// Adds or overwrites tags; `Precondition(Limit)` if the key would carry more than `max`.
    async fn tag_key(
        &self,
        id: &Uuid,
        accepted: StateSet,
        tags: &[(String, String)],
        max: usize,
    ) -> MetaResult<()>;
    async fn untag_key(&self, id: &Uuid, accepted: StateSet, keys: &[String]) -> MetaResult<()>;
    /// Tags ordered by tag key, after `after`.
    async fn list_tags(
        &self,
        id: &Uuid,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<(String, String)>>;
    /// Records the uses in `uses`, one transaction: a key keeps its newest use (replicas
    /// write theirs in any order); a key that is gone is skipped.
    async fn record_key_usage(&self, uses: &[KeyUsage]) -> MetaResult<()>;
    /// The last recorded use of a key, and when usage tracking began in this database.
    async fn key_usage(&self, id: &Uuid) -> MetaResult<(Option<KeyUsage>, i64)>;
}

/// Alias rows. The key an alias is created for, or moved to, must be in `accepted`.
#[async_trait]
pub trait Aliases: Send + Sync {
    /// `Taken(AliasName)`, or `Precondition(Limit)` if the key has `max` aliases already.
    async fn create_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()>;
    /// `NotFound` if there is no such alias.
    async fn update_alias(
        &self,
        name: &str,
        key: &Uuid,
        accepted: StateSet,
        now_ms: i64,
        max: usize,
    ) -> MetaResult<()>;
    async fn delete_alias(&self, name: &str) -> MetaResult<()>;
    async fn alias(&self, name: &str) -> MetaResult<Option<AliasRecord>>;
    /// Aliases ordered by name after `after`, of one key or of all.
    async fn list_aliases(
        &self,
        key: Option<&Uuid>,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<AliasRecord>>;
}

/// Grant rows.
#[async_trait]
pub trait Grants: Send + Sync {
    /// Adds a grant to a key in `accepted`, within the limits; a named grant identical to
    /// one the key has is not added again, and the existing one is returned.
    async fn insert_grant(
        &self,
        g: &GrantRecord,
        accepted: StateSet,
        per_key: usize,
        per_grantee: usize,
    ) -> MetaResult<GrantRecord>;
    /// Every grant of a key, ordered by grant id.
    async fn key_grants(&self, key: &Uuid) -> MetaResult<Arc<Vec<GrantRecord>>>;
    async fn grant_by_token(&self, token: &str) -> MetaResult<Option<GrantRecord>>;
    /// `NotFound` if the key has no such grant.
    async fn delete_grant(&self, key: &Uuid, grant_id: &str) -> MetaResult<()>;
    /// Grants whose retiring principal is `principal`, ordered by grant id after `after`.
    async fn retirable_grants(
        &self,
        principal: &str,
        after: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<GrantRecord>>;
}

/// The whole seam: what the domain is handed.
pub trait Metadata: KeyStores + Keys + Aliases + Grants {}

impl<T: KeyStores + Keys + Aliases + Grants> Metadata for T {}
