//! The shared metadata database: PostgreSQL, for several active replicas.
//!
//! PostgreSQL is the only source of truth: this implementation keeps no cache, so a change
//! made through any replica is what every replica's next request reads. Every conditional
//! change is race-free under READ COMMITTED with any number of writers:
//!
//! * a change to one row under a condition on that row is a single
//!   `UPDATE ... WHERE <condition> RETURNING`; when it touches no row, a read says why
//!   (absent, or in which state), for the caller's error;
//! * a change whose condition spans rows (tags or aliases under a limit, grants under
//!   their limits, a store's deletion while it holds no keys) first locks the parent row
//!   (`SELECT ... FOR UPDATE`), so concurrent changes to the same parent take turns; a key
//!   inserted into a store takes a share lock on the store's row through its foreign key,
//!   so it cannot slip past a deletion.
//!
//! Schema migrations run once, in one transaction under an advisory transaction lock, so
//! replicas starting together apply each one exactly once.

mod aliases;
mod cache;
mod grants;
mod keys;
mod keystores;

use std::time::Duration;

/// The most one metadata call may take, waiting for a connection included.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use uuid::Uuid;

use super::{schema, Failure, MetaResult, Precondition, Unique};
use crate::metadata::sql;
use model::states::{KeyState, StateSet};

/// The advisory lock migrations run under (an arbitrary constant: "hsm-kms" in ASCII).
const MIGRATION_LOCK: i64 = 0x68_73_6d_2d_6b_6d_73;

/// Now, in Unix milliseconds, by the database's clock.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

pub struct Postgres {
    pool: Pool,
    /// Key, store and grant rows, kept true by LISTEN/NOTIFY (cache.rs).
    cache: std::sync::Arc<cache::Cache>,
}

/// Where the database is and how much of it a replica may hold.
pub struct Connect<'a> {
    /// `postgres://user@host:port/dbname` (a password in it works, but belongs in a file).
    pub url: &'a str,
    pub password: Option<&'a str>,
    pub pool_size: usize,
    /// TLS only, verifying the server against these CA certificates (PEM).
    pub tls_ca_file: Option<&'a std::path::Path>,
}

/// How connections are made: in the clear, or TLS verified against the configured CAs.
#[derive(Clone)]
pub(super) enum Tls {
    Off,
    Verified(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    fn load(ca_file: Option<&std::path::Path>) -> anyhow::Result<Tls> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        let Some(path) = ca_file else {
            return Ok(Tls::Off);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading database.tls_ca_file {}", path.display()))?
        {
            roots
                .add(cert.with_context(|| format!("a certificate in {}", path.display()))?)
                .with_context(|| format!("a CA certificate in {}", path.display()))?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "database.tls_ca_file {} holds no certificate",
            path.display()
        );
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Tls::Verified(
            tokio_postgres_rustls::MakeRustlsConnect::new(config),
        ))
    }
}

impl Postgres {
    /// Connects, and brings the schema up to date (once, whatever the number of replicas
    /// starting at the same time).
    pub async fn open(c: Connect<'_>) -> anyhow::Result<Postgres> {
        let mut config: tokio_postgres::Config = c
            .url
            .parse()
            .map_err(|_| anyhow::anyhow!("database.url is not a PostgreSQL connection URL"))?;
        if let Some(p) = c.password {
            config.password(p);
        }
        config.application_name("hsm-kms");
        let tls = Tls::load(c.tls_ca_file)?;
        if matches!(tls, Tls::Verified(_)) {
            // Never fall back to the clear.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        config.connect_timeout(Duration::from_secs(5));
        // A dead database host (or a failover that moved its address) is noticed within
        // about a minute, not at the kernel's two hours; a URL's own settings win.
        if !c.url.contains("keepalives") {
            config
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(10))
                .keepalives_retries(3);
        }
        let listener_config = config.clone();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls.clone() {
            Tls::Off => Manager::from_config(config, NoTls, manager_config),
            Tls::Verified(t) => Manager::from_config(config, t, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(c.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CALL_DEADLINE))
            .create_timeout(Some(CALL_DEADLINE))
            .build()?;
        let db = Postgres {
            pool,
            cache: Default::default(),
        };
        db.migrate()
            .await
            .map_err(|e| anyhow::anyhow!("migrating the metadata schema: {e}"))?;
        cache::spawn_listener(listener_config, tls, &db.cache);
        Ok(db)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        // "already exists, skipping" is not news to an operator.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS hsm_kms_schema (version INTEGER NOT NULL)")
            .await?;
        let done: i32 = match tx
            .query_opt("SELECT version FROM hsm_kms_schema", &[])
            .await?
        {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO hsm_kms_schema VALUES (0)", &[])
                    .await?;
                0
            }
        };
        for (n, step) in schema::pending(schema::Dialect::Postgres, done.max(0) as usize) {
            tx.batch_execute(step).await?;
            tx.execute("UPDATE hsm_kms_schema SET version = $1", &[&(n as i32)])
                .await?;
        }
        Ok(tx.commit().await?)
    }

    /// A connection from the pool.
    async fn client(&self) -> MetaResult<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Failure::Unavailable(format!("no database connection: {e}")))
    }

    /// `call` (one metadata call: its connection, statements and commit) within
    /// `CALL_DEADLINE`; past it, `Unavailable`. A database that stops answering (a stalled
    /// server, a partition that no TCP error reports) then costs a request this long, not
    /// the time until the server comes back. Dropping the call drops its connection and any
    /// open transaction with it (rolled back, or never committed).
    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = MetaResult<T>>,
    ) -> MetaResult<T> {
        match tokio::time::timeout(CALL_DEADLINE, call).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Unavailable(format!(
                "no answer within {CALL_DEADLINE:?}"
            ))),
        }
    }

    // Statements are prepared once per pooled connection (`prepare_cached`): an unprepared
    // query costs PostgreSQL a parse and a plan each time, which measured ~340 µs of its
    // CPU per query under the replica bench.

    /// Every row `sql` returns, through `decode`.
    async fn rows<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        decode: fn(&tokio_postgres::Row) -> MetaResult<T>,
    ) -> MetaResult<Vec<T>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(internal)?;
        let rows = c.query(&stmt, params).await.map_err(internal)?;
        rows.iter().map(decode).collect()
    }

    /// The row `sql` returns, if any, through `decode`.
    async fn row<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        decode: fn(&tokio_postgres::Row) -> MetaResult<T>,
    ) -> MetaResult<Option<T>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(internal)?;
        let r = c.query_opt(&stmt, params).await.map_err(internal)?;
        r.as_ref().map(decode).transpose()
    }

    /// How many rows `sql` changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<u64> {
        let c = self.writer().await?;
        let stmt = c.prepare_cached(sql).await.map_err(internal)?;
        c.execute(&stmt, params).await.map_err(internal)
    }

    /// A pooled connection to change rows with (see `Writer`).
    async fn writer(&self) -> MetaResult<Writer<'_>> {
        Ok(Writer {
            conn: self.client().await?,
            cache: &self.cache,
        })
    }

    /// Whether the change listener works (else the cache is bypassed); for readiness.
    pub fn listening(&self) -> bool {
        self.cache.listening()
    }

    /// Whether cached rows may be served now (the listener is up to date: see `cache`).
    #[cfg(test)]
    fn key_is_fresh(&self) -> bool {
        self.cache.is_fresh()
    }
}

/// A pooled connection that changes rows. Given back (dropped, after its transaction
/// committed or not), it empties this replica's cache, so that this replica's next request
/// reads its own change; the other replicas hear of it through their listeners. Every write
/// takes its connection here, so no write path can leave the cache behind.
struct Writer<'a> {
    conn: Object,
    cache: &'a cache::Cache,
}

impl std::ops::Deref for Writer<'_> {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.conn
    }
}

impl std::ops::DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut Object {
        &mut self.conn
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        self.cache.forget_all();
    }
}

/// A database error is internal; an error of the connection (closed, reset, timed out) is
/// `Unavailable`, which callers may retry.
fn internal(e: tokio_postgres::Error) -> Failure {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        return Failure::Internal(format!("{} ({})", db.message(), db.code().code()));
    }
    let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        Failure::Unavailable(e.to_string())
    } else {
        Failure::Internal(e.to_string())
    }
}

/// A unique-constraint violation of one of `constraints` is `Taken`; anything else internal.
fn taken(e: tokio_postgres::Error, constraints: &[(&str, Unique)]) -> Failure {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let name = e.as_db_error().and_then(|d| d.constraint()).unwrap_or("");
        if let Some((_, u)) = constraints.iter().find(|(c, _)| *c == name) {
            return Failure::Taken(*u);
        }
    }
    internal(e)
}

fn bad(what: &str) -> Failure {
    Failure::Internal(format!("the database holds a value that is not {what}"))
}

fn parse_id(s: &str) -> MetaResult<Uuid> {
    Uuid::try_parse(s).map_err(|_| bad("a key id"))
}

fn parse_state(s: &str) -> MetaResult<KeyState> {
    KeyState::parse(s).ok_or_else(|| bad("a key state"))
}

/// Why a change conditioned on the key's state touched no row: the key is absent (or
/// invisible), or in a visible state the change does not accept.
async fn key_refusal(c: &tokio_postgres::Client, id: &Uuid) -> MetaResult<Failure> {
    let row = c
        .query_opt(sql::KEY_STATE, &[&id.to_string()])
        .await
        .map_err(internal)?;
    Ok(match row {
        Some(r) => refusal(parse_state(r.get(0))?),
        None => Failure::NotFound,
    })
}

/// Why a change does not apply to a key in state `s`: a visible state it does not accept,
/// or an invisible key, which is absent to callers.
fn refusal(s: KeyState) -> Failure {
    if s.visible() {
        Failure::Precondition(Precondition::KeyState(s))
    } else {
        Failure::NotFound
    }
}

/// Locks the key's row for the rest of `tx` if the key is in `accepted`; otherwise says why
/// not.
async fn lock_key(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &Uuid,
    accepted: StateSet,
) -> MetaResult<Result<(), Failure>> {
    let row = tx
        .query_opt(
            "SELECT key_state FROM keys WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )
        .await
        .map_err(internal)?;
    Ok(match row {
        Some(r) => {
            let s = parse_state(r.get(0))?;
            if accepted.contains(s) {
                Ok(())
            } else {
                Err(refusal(s))
            }
        }
        None => Err(Failure::NotFound),
    })
}

/// Exactly one row, or `NotFound`.
fn one(n: u64) -> MetaResult<()> {
    if n == 1 {
        Ok(())
    } else {
        Err(Failure::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The throwaway server, or None where PostgreSQL is not installed and the run neither
    /// requires it (HSM_KMS_REQUIRE_POSTGRES, which scripts/test.sh sets) nor is CI (`CI`):
    /// then the test fails rather than skip. A skip says SKIPPED and why.
    fn server() -> Option<&'static testing::postgres::Server> {
        match testing::postgres::Server::shared() {
            Ok(s) => Some(s),
            Err(e)
                if std::env::var_os("HSM_KMS_REQUIRE_POSTGRES").is_none()
                    && std::env::var_os("CI").is_none() =>
            {
                eprintln!("SKIPPED: PostgreSQL is not here: {e}");
                None
            }
            Err(e) => panic!("PostgreSQL is required here: {e}"),
        }
    }

    async fn open(server: &testing::postgres::Server) -> Postgres {
        let url = server.fresh_database().await.unwrap();
        Postgres::open(Connect {
            url: &url,
            password: None,
            pool_size: 16,
            tls_ca_file: None,
        })
        .await
        .unwrap()
    }

    /// A fresh database on the throwaway server; None where the run may skip PostgreSQL.
    async fn fresh() -> Option<Arc<dyn crate::metadata::Metadata>> {
        Some(Arc::new(open(server()?).await) as Arc<dyn crate::metadata::Metadata>)
    }

    /// The metadata contract, each check a test of its own.
    mod contract {
        use super::*;

        crate::metadata::contract::contract_tests!(match fresh().await {
            Some(db) => db,
            None => return,
        });
    }

    /// Until `check` holds (polled every millisecond, for at most 5 s); how long it took.
    async fn within<F: Fn() -> Fut, Fut: std::future::Future<Output = bool>>(
        what: &str,
        check: F,
    ) -> Duration {
        let start = std::time::Instant::now();
        while !check().await {
            assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        start.elapsed()
    }

    /// The listening connections' server processes.
    async fn listener_pids(db: &Postgres) -> Vec<i32> {
        let c = db.client().await.unwrap();
        // This database's listeners only: another test's are not this test's to stop.
        c.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'hsm-kms-listener' \
             AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Two replicas' metadata on one database: a key state changed through one reaches the
    /// other's cache (within milliseconds; printed, not asserted: speed is the bench's). With the listener
    /// killed, or silenced (its server process stopped), the cache is bypassed: a change
    /// made meanwhile is read at once, not after the cache's TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_reach_other_replicas_caches_and_a_lost_listener_fails_closed() {
        use crate::metadata::{Grants as _, Keys as _};
        use model::states::{KeyState::*, StateSet};
        if server().is_none() {
            return;
        }
        // A server of its own: a backend stopped with SIGSTOP can hold the server-wide
        // notification queue's lock, and every NOTIFY of every database then waits.
        let own = testing::postgres::Server::start_own().unwrap();
        let url = own.fresh_database().await.unwrap();
        let open = || async {
            Postgres::open(Connect {
                url: &url,
                password: None,
                pool_size: 2,
                tls_ca_file: None,
            })
            .await
            .unwrap()
        };
        let (a, b) = (open().await, open().await);
        within("A listening", || async { a.listening() }).await;
        let id = crate::metadata::contract::with_key(&b, Enabled).await;
        let any = StateSet::of(&[Enabled, Disabled]);
        let state = |want| {
            let (a, id) = (&a, id);
            move || async move { a.key(&id).await.unwrap().unwrap().key_state == want }
        };
        // A caches the key; B disables it, then enables it again.
        assert!(state(Enabled)().await);
        b.set_key_state(&id, any, Disabled).await.unwrap();
        let took = within("A sees Disabled", state(Disabled)).await;
        eprintln!("a change reached the other replica's cache in {took:?}");
        b.set_key_state(&id, any, Enabled).await.unwrap();
        within("A sees Enabled", state(Enabled)).await;

        // A grant made, then revoked, through B: A's cached grants follow within the bound.
        let grants = |n: usize| {
            let (a, id) = (&a, id);
            move || async move { a.key_grants(&id).await.unwrap().len() == n }
        };
        assert!(grants(0)().await);
        let grant = crate::metadata::GrantRecord {
            grant_id: "0".repeat(64),
            key_id: id,
            name: None,
            grantee_principal: "arn:aws:iam::111122223333:role/app".into(),
            retiring_principal: None,
            issuing_account: "arn:aws:iam::111122223333:root".into(),
            operations: vec!["Encrypt".into()],
            context_subset: None,
            context_equals: None,
            creation_date_ms: 0,
            token: "t".into(),
        };
        b.insert_grant(&grant, any, 50_000, 500).await.unwrap();
        within("A sees the grant", grants(1)).await;
        b.delete_grant(&id, &grant.grant_id).await.unwrap();
        let took = within("A sees the grant revoked", grants(0)).await;
        eprintln!("a revoked grant reached the other replica's cache in {took:?}");

        // The listeners killed: A stops trusting its cache before it can miss a change.
        let c = b.client().await.unwrap();
        for pid in listener_pids(&a).await {
            c.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap();
        }
        within("A not listening", || async { !a.listening() }).await;
        b.set_key_state(&id, any, Disabled).await.unwrap();
        assert!(
            state(Disabled)().await,
            "A served its cache without a listener"
        );
        within("A listening again", || async { a.listening() }).await;
        b.set_key_state(&id, any, Enabled).await.unwrap();
        within("A sees Enabled", state(Enabled)).await;

        // Silenced (SIGSTOP): no error, only silence; A stops trusting its cache. A change
        // made meanwhile is read at once. A backend stopped while it held the notification
        // queue's lock holds up B's change too (it times out): then thaw and try again.
        let mut tries = 0;
        loop {
            tries += 1;
            let stopped = Stopped::new(listener_pids(&a).await);
            within("A notices the silence", || async { !a.key_is_fresh() }).await;
            match b.set_key_state(&id, any, Disabled).await {
                Ok(()) => {}
                Err(Failure::Unavailable(_)) if tries < 5 => {
                    drop(stopped);
                    within("A listening after the thaw", || async { a.listening() }).await;
                    continue;
                }
                Err(e) => panic!("{e}"),
            }
            let fresh = state(Disabled)().await;
            drop(stopped);
            assert!(fresh, "A served its cache while its listener was silent");
            break;
        }
        within("A listening after the thaw", || async { a.listening() }).await;
    }

    /// Backends stopped with SIGSTOP, continued when this is dropped (a failing test too).
    struct Stopped(Vec<i32>);

    impl Stopped {
        fn new(pids: Vec<i32>) -> Stopped {
            for &pid in &pids {
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
            }
            Stopped(pids)
        }
    }

    impl Drop for Stopped {
        fn drop(&mut self) {
            for &pid in &self.0 {
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
    }

    /// A fresh database on `s`, over loopback TCP.
    async fn tcp_url(s: &testing::postgres::Server) -> String {
        let name = s.fresh_database().await.unwrap();
        let db = name.rsplit("dbname=").next().unwrap().to_string();
        s.tcp_url(&db).unwrap()
    }

    /// With database.tls_ca_file, the metadata runs over TLS to a server whose certificate
    /// that CA signed (the contract suite, over TLS); a server signed by another CA is
    /// refused, and so is one that does not offer TLS: no fall back to the clear.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_to_the_database_is_verified_and_never_falls_back() {
        if server().is_none() {
            return;
        }
        let (ca, cert, key) = crate::transport::tests::pki();
        let tls_server = testing::postgres::Server::start_tcp(Some((&cert, &key))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca).unwrap();
        let open = |url: String, ca: std::path::PathBuf| async move {
            Postgres::open(Connect {
                url: &url,
                password: None,
                pool_size: 4,
                tls_ca_file: Some(&ca),
            })
            .await
        };
        let u = tcp_url(&tls_server).await;
        let db = open(u.clone(), ca_file.clone()).await.unwrap();
        let c = db.client().await.unwrap();
        let ssl: bool = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "the connection is not TLS");
        drop(c);
        crate::metadata::contract::run(|| {
            let (tls_server, ca_file) = (&tls_server, ca_file.clone());
            async move {
                Arc::new(open(tcp_url(tls_server).await, ca_file).await.unwrap())
                    as Arc<dyn crate::metadata::Metadata>
            }
        })
        .await;
        // Another CA: refused.
        let (other_ca, _, _) = crate::transport::tests::pki();
        let other = dir.path().join("other.pem");
        std::fs::write(&other, other_ca).unwrap();
        let e = open(u, other)
            .await
            .err()
            .expect("a server of another CA was accepted");
        assert!(format!("{e:#}").contains("TLS handshake"), "{e:#}");
        // A server without TLS: refused, not used in the clear.
        let plain = testing::postgres::Server::start_tcp(None).unwrap();
        let e = open(tcp_url(&plain).await, ca_file)
            .await
            .err()
            .expect("a server without TLS was used in the clear");
        assert!(format!("{e:#}").to_lowercase().contains("tls"), "{e:#}");
    }

    /// Replicas starting together migrate the schema once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_starts_migrate_once() {
        let Some(server) = server() else { return };
        let url = server.fresh_database().await.unwrap();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    Postgres::open(Connect {
                        url: &url,
                        password: None,
                        pool_size: 2,
                        tls_ca_file: None,
                    })
                    .await
                })
            })
            .collect();
        for s in starts {
            s.await.unwrap().unwrap();
        }
        let db = Postgres::open(Connect {
            url: &url,
            password: None,
            pool_size: 1,
            tls_ca_file: None,
        })
        .await
        .unwrap();
        let c = db.client().await.unwrap();
        let v: i32 = c
            .query_one("SELECT version FROM hsm_kms_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            v as usize,
            crate::metadata::schema::complete(crate::metadata::schema::Dialect::Postgres)
        );
        let rows: i64 = c
            .query_one("SELECT COUNT(*) FROM hsm_kms_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 1);
    }
}
