//! The schema's history: one list of steps for both databases, in order. Each step is one
//! change, written for SQLite and for PostgreSQL side by side (their types and constraints
//! differ: BLOB and BYTEA, collations, triggers); a step that has nothing to do on one
//! database is empty there. PostgreSQL's text keys compare bytewise (`COLLATE "C"`), as
//! SQLite's do and as pagination markers expect.
//!
//! Each database records how many of the steps with SQL for it have been applied (SQLite
//! in `PRAGMA user_version`, PostgreSQL in `hsm_kms_schema`), which is what it recorded
//! before the two histories were one list, so databases made by older versions migrate
//! as they did, and older replicas beside newer ones read the same record.

/// One change to the schema.
pub(super) struct Step {
    /// Its SQL for SQLite; empty when there is nothing to do there.
    pub sqlite: &'static str,
    /// Its SQL for PostgreSQL; empty when there is nothing to do there.
    pub postgres: &'static str,
}

/// Which database a history is applied to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

impl Step {
    fn sql(&self, d: Dialect) -> &'static str {
        match d {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }
}

/// The steps of `d` still to apply when `recorded` of its steps have been, each with the
/// count to record once it is applied.
pub(super) fn pending(d: Dialect, recorded: usize) -> impl Iterator<Item = (usize, &'static str)> {
    STEPS
        .iter()
        .map(move |s| s.sql(d))
        .filter(|sql| !sql.trim().is_empty())
        .enumerate()
        .skip(recorded)
        .map(|(i, sql)| (i + 1, sql))
}

/// How many steps `d` records once it is up to date.
#[cfg(test)]
pub(super) fn complete(d: Dialect) -> usize {
    pending(d, 0).count()
}

/// The first step's SQL for SQLite, for a test that migrates a database it made.
#[cfg(test)]
pub(super) const SQLITE_FIRST: &str = STEPS[0].sqlite;

pub(super) const STEPS: &[Step] = &[
    // Key stores, keys and their tags. PostgreSQL's first step also made what steps 2 and 3
    // add (its history began later), so those are empty for it.
    Step {
        sqlite: "
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
",
        postgres: "
CREATE TABLE custom_key_stores (
    id                    TEXT COLLATE \"C\" PRIMARY KEY,
    name                  TEXT COLLATE \"C\" NOT NULL CONSTRAINT keystore_name_taken UNIQUE,
    cluster_id            TEXT NOT NULL CONSTRAINT keystore_cluster_taken UNIQUE,
    trust_anchor          TEXT NOT NULL,
    sealed_password       BYTEA NOT NULL,
    pending_password      BYTEA,
    connection_state      TEXT NOT NULL,
    connection_error_code TEXT,
    creation_date_ms      BIGINT NOT NULL
);
CREATE TABLE keys (
    id                  TEXT COLLATE \"C\" PRIMARY KEY,
    custom_key_store_id TEXT NOT NULL REFERENCES custom_key_stores(id),
    creation_date_ms    BIGINT NOT NULL,
    description         TEXT NOT NULL,
    key_state           TEXT NOT NULL,
    deletion_date_ms    BIGINT,
    pending_window_days INTEGER,
    policy              TEXT
);
CREATE INDEX keys_by_store ON keys(custom_key_store_id);
CREATE INDEX keys_by_deletion ON keys(deletion_date_ms) WHERE deletion_date_ms IS NOT NULL;
CREATE TABLE key_tags (
    key_id    TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    tag_key   TEXT COLLATE \"C\" NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
CREATE TABLE aliases (
    name             TEXT COLLATE \"C\" CONSTRAINT alias_name_taken PRIMARY KEY,
    key_id           TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    creation_date_ms BIGINT NOT NULL,
    last_updated_ms  BIGINT NOT NULL
);
CREATE INDEX aliases_by_key ON aliases(key_id);
CREATE TABLE grants (
    grant_id           TEXT COLLATE \"C\" PRIMARY KEY,
    key_id             TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    name               TEXT,
    grantee_principal  TEXT NOT NULL,
    retiring_principal TEXT,
    issuing_account    TEXT NOT NULL,
    operations         TEXT NOT NULL,
    context_subset     TEXT,
    context_equals     TEXT,
    creation_date_ms   BIGINT NOT NULL,
    token              TEXT NOT NULL UNIQUE
);
CREATE INDEX grants_by_key ON grants(key_id, grant_id);
CREATE INDEX grants_by_retiring ON grants(retiring_principal, grant_id);
",
    },
    // Scheduled deletion, key policies and aliases.
    Step {
        sqlite: "
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
",
        postgres: "",
    },
    // Grants, and the kmsuser password that replaces the stored one while it is being rotated.
    Step {
        sqlite: "
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
",
        postgres: "",
    },
    // Who is deleting a key, and until when (deletion claims, for several sweepers).
    Step {
        sqlite: "
ALTER TABLE keys ADD COLUMN deletion_owner TEXT;
ALTER TABLE keys ADD COLUMN deletion_lease_until INTEGER;
",
        postgres: "
ALTER TABLE keys ADD COLUMN deletion_owner TEXT;
ALTER TABLE keys ADD COLUMN deletion_lease_until BIGINT;
",
    },
    // Values the service checks itself against at start (the sealing key's).
    Step {
        sqlite: "
CREATE TABLE IF NOT EXISTS service_checks (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
",
        postgres: "
CREATE TABLE service_checks (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
",
    },
    // Replicas' heartbeats.
    Step {
        sqlite: "
CREATE TABLE IF NOT EXISTS replicas (
    id           TEXT PRIMARY KEY,
    last_seen_ms INTEGER NOT NULL
);
",
        postgres: "
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    last_seen_ms BIGINT NOT NULL
);
",
    },
    // Each replica's last recorded audit chain head (`audit verify --config` compares).
    Step {
        sqlite: "
CREATE TABLE IF NOT EXISTS audit_heads (
    replica     TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    head        TEXT NOT NULL,
    recorded_ms INTEGER NOT NULL
);
",
        postgres: "
CREATE TABLE audit_heads (
    replica     TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL,
    head        TEXT NOT NULL,
    recorded_ms BIGINT NOT NULL
);
",
    },
    // Replicas cache key, store and grant rows (postgres/cache.rs): every change to one is
    // announced in the transaction that makes it. SQLite, one process, drops its cached rows
    // itself.
    Step {
        sqlite: "",
        postgres: "
CREATE FUNCTION hsm_kms_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('hsm_kms', TG_ARGV[0] || ':' || (to_jsonb(r) ->> TG_ARGV[1]));
    RETURN NULL;
END
$$;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION hsm_kms_notify('k', 'id');
CREATE TRIGGER keystores_changed AFTER INSERT OR UPDATE OR DELETE ON custom_key_stores
    FOR EACH ROW EXECUTE FUNCTION hsm_kms_notify('s', 'id');
CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH ROW EXECUTE FUNCTION hsm_kms_notify('g', 'key_id');
",
    },
    // When each store entered its connection state: a CONNECTING or DISCONNECTING left by a
    // replica that died is finished by another once it is clearly abandoned. On PostgreSQL the
    // database keeps it itself, so that replicas of an older version, which do not know the
    // column, keep it true during a rolling upgrade.
    Step {
        sqlite: "
ALTER TABLE custom_key_stores ADD COLUMN state_since_ms INTEGER NOT NULL DEFAULT 0;
",
        postgres: "
ALTER TABLE custom_key_stores ADD COLUMN state_since_ms BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION hsm_kms_state_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.connection_state IS DISTINCT FROM OLD.connection_state THEN
        NEW.state_since_ms := (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER keystores_state_since BEFORE INSERT OR UPDATE ON custom_key_stores
    FOR EACH ROW EXECUTE FUNCTION hsm_kms_state_since();
",
    },
    // Each key's last successful cryptographic use (GetKeyLastUsage), and when tracking
    // began: AWS's TrackingStartDate is the later of that and the key's creation.
    Step {
        sqlite: "
CREATE TABLE key_usage (
    key_id     TEXT PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,
    operation  TEXT NOT NULL,
    used_ms    INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE TABLE usage_tracking (started_ms INTEGER NOT NULL);
INSERT INTO usage_tracking (started_ms)
    VALUES (CAST(strftime('%s', 'now') AS INTEGER) * 1000);
",
        postgres: "
CREATE TABLE key_usage (
    key_id     TEXT COLLATE \"C\" PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,
    operation  TEXT NOT NULL,
    used_ms    BIGINT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE TABLE usage_tracking (started_ms BIGINT NOT NULL);
INSERT INTO usage_tracking (started_ms)
    VALUES ((EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT);
",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    // What each database recorded before the histories were one list: SQLite counted its
    // 8 steps, PostgreSQL its 7. Both still mean the same steps; the key usage step came
    // after, the 9th and 8th.
    #[test]
    fn the_records_of_older_versions_keep_their_meaning() {
        assert_eq!(complete(Dialect::Sqlite), 9);
        assert_eq!(complete(Dialect::Postgres), 8);
        // A PostgreSQL database at 1 has the first step's tables (grants, aliases
        // included): the next step it runs adds the deletion claims.
        let next = pending(Dialect::Postgres, 1).next().unwrap();
        assert_eq!(next.0, 2);
        assert!(next.1.contains("deletion_owner"), "{}", next.1);
        // A SQLite database at 7 has the audit heads; the change notifications are not
        // its, so its next step is the stores' state times.
        let next = pending(Dialect::Sqlite, 7).next().unwrap();
        assert_eq!(next.0, 8);
        assert!(next.1.contains("state_since_ms"), "{}", next.1);
        let next = pending(Dialect::Sqlite, 8).next().unwrap();
        assert!(next.1.contains("key_usage"), "{}", next.1);
        assert!(pending(Dialect::Sqlite, 9).next().is_none());
    }
}
