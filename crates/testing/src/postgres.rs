//! A throwaway PostgreSQL server for tests and the bench: `initdb` in a temporary
//! directory, one server per process on a Unix socket in that directory (no TCP port to
//! collide on), fsync off, and a fresh database per caller. The server stops when the
//! process that started it is gone. A test may restart a server of its own with
//! `pg_ctl restart` (`restart`).
//!
//! PostgreSQL refuses to run as root; when this process is root, the server runs as the
//! `postgres` user (which Debian's package creates), through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const PORT: u16 = 5432;
const USER: &str = "hsm_kms";

/// A running server.
pub struct Server {
    dir: tempfile::TempDir,
    /// The port (of the Unix socket, and with `start_tcp` of loopback TCP too).
    port: u16,
    /// Whether the server listens on loopback TCP (`start_tcp`).
    tcp: bool,
}

/// PostgreSQL's programs: `$PG_BIN`, else the newest /usr/lib/postgresql/<version>/bin.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program args...`, as the postgres user when this process is root.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Server {
    /// A server of the caller's own stops with it (the process's shared server lives in a
    /// static and is stopped by its watchdog when the process is gone).
    fn drop(&mut self) {
        if let Some(bin) = bin_dir() {
            let _ = command(&bin.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(self.dir.path().join("data"))
                .output();
        }
    }
}

impl Server {
    /// The process's server, started on first use.
    pub fn shared() -> anyhow::Result<&'static Server> {
        static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
        SERVER
            .get_or_init(|| Server::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn start() -> anyhow::Result<Server> {
        Self::start_with(None, &[])
    }

    /// A server of the caller's own (to restart, say), on a Unix socket only, whose commits
    /// are acknowledged only once their WAL is written (`synchronous_commit` on): what the
    /// server acknowledged survives `pg_ctl restart -m immediate`. (fsync stays off: the
    /// machine does not crash in a test, only the server.)
    pub fn start_own() -> anyhow::Result<Server> {
        Self::start_with(None, &["synchronous_commit=on"])
    }

    /// `pg_ctl restart -m <mode>` (`fast`, `immediate`...): the server stops, every
    /// connection to it breaks, and it starts again with the same settings and data.
    /// Returns once it accepts connections again.
    pub fn restart(&self, mode: &str) -> anyhow::Result<()> {
        let bin = bin_dir().context("PostgreSQL is not installed")?;
        let out = command(&bin.join("pg_ctl"))
            .args(["restart", "-w", "-t", "60", "-m", mode, "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl restart -m {mode} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A server of the caller's own that also listens on a loopback TCP port, offering TLS
    /// there with `tls` (certificate and key PEM; the certificate should name `localhost`),
    /// or not at all. `tcp_url` gives a connection string to it.
    pub fn start_tcp(tls: Option<(&str, &str)>) -> anyhow::Result<Server> {
        Self::start_with(Some(tls), &[])
    }

    /// A connection string for `database` over loopback TCP (`start_tcp` servers).
    pub fn tcp_url(&self, database: &str) -> Option<String> {
        self.tcp.then(|| {
            format!(
                "host=localhost port={} user={USER} dbname={database}",
                self.port
            )
        })
    }

    /// Starts a server; `settings` (`name=value`) come after, and so override, the
    /// defaults.
    fn start_with(tcp: Option<Option<(&str, &str)>>, settings: &[&str]) -> anyhow::Result<Server> {
        let bin = bin_dir().context(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; set PG_BIN or \
             run scripts/setup.sh)",
        )?;
        let dir = tempfile::Builder::new().prefix("hsm-kms-pg").tempdir()?;
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()?
                .success();
            if !ok {
                bail!("cannot hand {} to the postgres user", dir.path().display());
            }
        }
        // TLS: the files in the server's directory, owner-only as PostgreSQL demands.
        let mut options = Vec::new();
        let port = match tcp {
            Some(tls) => {
                use std::os::unix::fs::PermissionsExt as _;
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                options = vec!["-c".to_string(), "listen_addresses=127.0.0.1".to_string()];
                for (name, pem) in tls
                    .map(|(c, k)| [("server.crt", c), ("server.key", k)])
                    .into_iter()
                    .flatten()
                {
                    let path = dir.path().join(name);
                    std::fs::write(&path, pem)?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                    if is_root() {
                        Command::new("chown").arg("postgres:").arg(&path).status()?;
                    }
                }
                if tls.is_some() {
                    options.extend([
                        "-c".to_string(),
                        "ssl=on".to_string(),
                        "-c".to_string(),
                        format!("ssl_cert_file={}", dir.path().join("server.crt").display()),
                        "-c".to_string(),
                        format!("ssl_key_file={}", dir.path().join("server.key").display()),
                    ]);
                }
                port
            }
            None => PORT,
        };
        for setting in settings {
            options.extend(["-c".to_string(), setting.to_string()]);
        }
        let out = command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The server, and a watchdog that stops it once this process has gone. The
        // watchdog asks pg_ctl, which finds the postmaster through its pid file: after
        // `restart` it is another process than the one started here.
        let script = r#"
bin=$1 data=$2 port=$3 dir=$4 parent=$5
shift 5
"$bin/postgres" -D "$data" -p "$port" -k "$dir" -c listen_addresses= -c fsync=off \
    -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "$@" \
    >"$dir/server.log" 2>&1 &
while [ -d "/proc/$parent" ]; do sleep 1; done
"$bin/pg_ctl" stop -D "$data" -m fast -w >/dev/null 2>&1 || kill -INT $! 2>/dev/null
wait
rm -rf "$dir"
"#;
        command(Path::new("sh"))
            .args(["-c", script, "sh"])
            .arg(&bin)
            .arg(&data)
            .arg(port.to_string())
            .arg(dir.path())
            .arg(std::process::id().to_string())
            .args(&options)
            .spawn()?;
        let server = Server {
            dir,
            port,
            tcp: tcp.is_some(),
        };
        let socket = server.dir.path().join(format!(".s.PGSQL.{port}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(server.dir.path().join("server.log"));
                bail!("PostgreSQL did not start: {}", log.unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// A connection string for `database` on this server.
    /// The server's processes: the postmaster and its children, for tests that stop the
    /// server in its tracks (SIGSTOP) as a stalled database host would be.
    pub fn processes(&self) -> Vec<i32> {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let Some(main) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![main];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (command) state ppid ...": the command may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        pids
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={database}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A new, empty database; its connection string.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // The socket appears a moment before the server takes connections.
        let mut tries = 0;
        let (client, connection) = loop {
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok(c) => break c,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        drop(client);
        let _ = task.await;
        Ok(self.url(&name))
    }
}
