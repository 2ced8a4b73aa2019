//! Test harness: real `hsm-kms` processes on real SoftHSM2 tokens, one fresh token directory
//! per harness, driven over gRPC.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use hsm_kms::config::{
    AdminSettings, AuditSettings, AuthSettings, ClusterSettings, GcmIvMode, HsmEntry, HsmSettings,
    LifecycleSettings, PinFormat, SecuritySettings, ServerSettings, Settings, StorageSettings,
    ThrottlingSettings,
};
pub use hsm_kms::model::states::{ClusterState, HsmState};
use hsm_kms::proto::key_management_service_client::KeyManagementServiceClient;
use hsm_kms::proto::*;
use tonic::transport::Channel;
use tonic_types::StatusExt;

pub type Client = KeyManagementServiceClient<Channel>;

pub const SO_PIN: &str = "so-pin-1234";
pub const PASSWORD: &str = "kmsuser-Passw0rd";

/// One simulated cluster: a SoftHSM2 token plus its inventory.
#[derive(Clone)]
pub struct ClusterSpec {
    pub id: String,
    /// (availability zone, state) per HSM.
    pub hsms: Vec<(&'static str, HsmState)>,
    pub state: ClusterState,
    pub lineage: Option<String>,
    /// Whether the token exists (false: the cluster's token is absent).
    pub token: bool,
    /// Reach the token through the fault-injecting test module (see `faults`).
    pub faulty: bool,
    pub gcm_iv: GcmIvMode,
    pub pin_format: PinFormat,
}

impl ClusterSpec {
    /// An ACTIVE cluster with two active HSMs in two zones.
    pub fn good(id: &str) -> ClusterSpec {
        ClusterSpec {
            id: id.into(),
            hsms: vec![
                ("us-east-1a", HsmState::Active),
                ("us-east-1b", HsmState::Active),
            ],
            state: ClusterState::Active,
            lineage: None,
            token: true,
            faulty: false,
            gcm_iv: GcmIvMode::Service,
            pin_format: PinFormat::Password,
        }
    }

    /// A good cluster behind the fault-injecting module.
    pub fn faulty(id: &str) -> ClusterSpec {
        ClusterSpec {
            faulty: true,
            ..ClusterSpec::good(id)
        }
    }
}

/// The test-only PKCS#11 module that wraps SoftHSM2 (testing/faulty-pkcs11), built on first
/// use next to the hsm-kms binary.
pub fn faulty_module() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_hsm-kms"));
            let so = bin.parent().unwrap().join("libfaulty_pkcs11.so");
            let profile: Vec<&str> = if bin.parent().unwrap().ends_with("release") {
                vec!["--release"]
            } else {
                vec![]
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "faulty-pkcs11"])
                .args(profile)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo to build faulty-pkcs11");
            assert!(status.success(), "building faulty-pkcs11 failed");
            assert!(so.exists(), "{} missing after the build", so.display());
            so
        })
        .clone()
}
/// The server binary under test: this build's, or `HSM_KMS_TEST_BINARY` (to see whether a
/// test fails against an older build).
pub fn server_binary() -> PathBuf {
    std::env::var_os("HSM_KMS_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hsm-kms")))
}

/// The config file's text. Against an older binary (`HSM_KMS_TEST_BINARY`), the settings it
/// may not know are left out when they hold their defaults.
fn config_text(settings: &Settings) -> String {
    let text = toml::to_string_pretty(settings).unwrap();
    if std::env::var_os("HSM_KMS_TEST_BINARY").is_none() {
        return text;
    }
    let defaults = toml::to_string_pretty(&hsm_kms::config::ServerSettings::default()).unwrap();
    let audit_default = "fsync = false";
    text.lines()
        .filter(|l| {
            let newer = [
                "max_connections",
                "max_concurrent_streams",
                "max_inflight_requests",
                "header_timeout_seconds",
                "max_pending_connections",
                "idle_timeout_seconds",
                "drain_seconds",
            ];
            let is_newer_default = newer.iter().any(|k| l.starts_with(&format!("{k} = ")))
                && defaults.lines().any(|d| d == *l);
            // audit.replica came with the recorded audit heads.
            !is_newer_default && *l != audit_default && !l.starts_with("replica = ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn softhsm2_module() -> PathBuf {
    hsm_kms::dev::softhsm2_module().expect("SoftHSM2 must be installed (scripts/setup.sh)")
}

/// How the server process runs.
#[derive(Clone, Default)]
pub struct Options {
    /// The limit on open files (soft and hard).
    pub open_files: Option<u64>,
    /// RUST_LOG for the server [default: the test's RUST_LOG, else "warn"].
    pub log: Option<&'static str>,
    /// More environment variables for the server.
    pub env: Vec<(&'static str, String)>,
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub anchors: Vec<String>,
    pub options: Options,
    child: Option<Child>,
    pub addr: String,
    /// The admin (metrics) listener's address.
    pub admin: String,
    /// The AWS protocol listener's address, when server.aws_listen is set.
    pub aws: String,
}

impl Harness {
    /// Makes tokens and a config for `clusters`, and starts the server.
    pub async fn start(clusters: &[ClusterSpec]) -> Harness {
        Harness::start_with(clusters, |_| {}).await
    }

    /// As `start`, with `change` applied to the config first.
    pub async fn start_with(
        clusters: &[ClusterSpec],
        change: impl FnOnce(&mut Settings),
    ) -> Harness {
        Harness::start_opts(clusters, Options::default(), change).await
    }

    /// As `start_with`, with the process `options`.
    pub async fn start_opts(
        clusters: &[ClusterSpec],
        options: Options,
        change: impl FnOnce(&mut Settings),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let mut anchors = Vec::new();
        let mut cluster_settings = Vec::new();
        for c in clusters {
            let label = token_label(&c.id);
            if c.token {
                init_token(&conf, &label);
            }
            let pem = make_anchor(&c.id);
            let anchor_file = dir.path().join(format!("{}.pem", c.id));
            std::fs::write(&anchor_file, &pem).unwrap();
            anchors.push(pem);
            cluster_settings.push(ClusterSettings {
                id: c.id.clone(),
                module: if c.faulty {
                    faulty_module()
                } else {
                    softhsm2_module()
                },
                token_label: label,
                trust_anchor_file: anchor_file,
                state: c.state,
                lineage: c.lineage.clone(),
                pin_format: c.pin_format,
                gcm_iv: c.gcm_iv,
                crypto_user: "kmsuser".into(),
                hsms: c
                    .hsms
                    .iter()
                    .enumerate()
                    .map(|(i, (az, state))| HsmEntry {
                        id: format!("hsm-{i}"),
                        availability_zone: az.to_string(),
                        state: *state,
                    })
                    .collect(),
            });
        }
        let settings = Settings {
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().unwrap(),
                shutdown_grace_seconds: 2,
                worker_threads: None,
                ..Default::default()
            },
            account: Default::default(),
            storage: StorageSettings {
                sqlite_path: dir.path().join("metadata.sqlite3"),
            },
            database: None,
            security: SecuritySettings {
                sealing_key_file: dir.path().join("sealing.key"),
                // Off so that tests can inspect tokens with the password they chose;
                // tests/access.rs covers rotation.
                rotate_kmsuser_password: false,
            },
            hsm: HsmSettings {
                softhsm2_conf: Some(conf),
                session_pool_size: 8,
                // Short, so that fault tests see deadlines and recovery quickly.
                call_timeout_ms: 2_000,
                login_timeout_ms: 5_000,
                reconnect_initial_backoff_ms: 100,
                reconnect_max_backoff_ms: 1_000,
            },
            lifecycle: LifecycleSettings {
                deletion_check_interval_seconds: 1,
                clock_offset_seconds: 0,
            },
            // Off: tests drive short bursts far above a real HSM's rate. tests/faults.rs
            // covers the quota.
            throttling: ThrottlingSettings {
                store_requests_per_second: 0,
            },
            admin: AdminSettings {
                enabled: true,
                listen: "127.0.0.1:0".parse().unwrap(),
            },
            tls: Default::default(),
            // Plaintext on loopback as the account root; tests/access.rs runs TLS.
            auth: AuthSettings {
                allow_plaintext_loopback: true,
                ..Default::default()
            },
            audit: AuditSettings {
                file: dir.path().join("audit.jsonl"),
                fsync: false,
                replica: "main".into(),
            },
            kms: Default::default(),
            clusters: cluster_settings,
        };
        let mut settings = settings;
        change(&mut settings);
        let mut h = Harness {
            dir,
            settings,
            anchors,
            options,
            child: None,
            addr: String::new(),
            admin: String::new(),
            aws: String::new(),
        };
        h.launch().await;
        h
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hsm-kms.toml")
    }

    pub fn softhsm2_conf(&self) -> PathBuf {
        self.settings.hsm.softhsm2_conf.clone().unwrap()
    }

    async fn launch(&mut self) {
        std::fs::write(self.config_path(), config_text(&self.settings)).unwrap();
        let mut command = match self.options.open_files {
            // sh's ulimit -n sets the soft and the hard limit; exec keeps the pid.
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(server_binary());
                c
            }
            None => Command::new(server_binary()),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env(
                "RUST_LOG",
                self.options
                    .log
                    .map(str::to_string)
                    .or_else(|| std::env::var("RUST_LOG").ok())
                    .unwrap_or("warn".into()),
            )
            .env_remove("HSM_KMS_SEALING_KEY")
            .envs(self.options.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("FAULTY_PKCS11_CONTROL", self.fault_control())
            .env("FAULTY_PKCS11_MODULE", softhsm2_module())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hsm-kms");
        // The server's log goes to the test's output, and to a file that tests can read.
        let stderr = child.stderr.take().unwrap();
        let log = self.log_path();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = writeln!(file, "{line}");
            }
        });
        let mut prefixes = vec!["hsm-kms admin listening on "];
        if self.settings.server.aws_listen.is_some() {
            prefixes.push("hsm-kms AWS protocol listening on ");
        }
        prefixes.push("hsm-kms listening on ");
        let mut lines = wait_for_lines(&mut child, &prefixes, Duration::from_secs(60));
        self.addr = lines.pop().unwrap();
        if self.settings.server.aws_listen.is_some() {
            self.aws = lines.pop().unwrap();
        }
        self.admin = lines[0].clone();
        self.child = Some(child);
    }

    /// The file that collects the server's log (standard error), over restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// The server's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the server again after `kill` or `stop`, on the same config and data. With
    /// the old process still running, a client could reach either; that is a test's bug.
    pub async fn relaunch(&mut self) {
        assert!(
            !self.running(),
            "relaunch while the server runs: kill or stop it first"
        );
        self.launch().await;
    }

    /// The control file of the fault-injecting module (see testing/faulty-pkcs11).
    pub fn fault_control(&self) -> PathBuf {
        self.dir.path().join("faults.ctl")
    }

    /// Sets the fault-injecting module's commands (`""`: behave as plain SoftHSM2).
    pub fn set_faults(&self, commands: &str) {
        std::fs::write(self.fault_control(), commands).unwrap();
    }

    /// Rewrites the config file with `change` applied and sends SIGHUP (reload).
    pub fn reload_with(&mut self, change: impl FnOnce(&mut Settings)) {
        change(&mut self.settings);
        std::fs::write(self.config_path(), config_text(&self.settings)).unwrap();
        self.sighup();
    }

    /// Asks the server to reload its config file.
    pub fn sighup(&self) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// Whether `pin` logs in to the token of cluster `i` as the user (through pkcs11-tool).
    pub fn pin_works(&self, i: usize, pin: &str) -> bool {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", self.softhsm2_conf())
            .args(["--module"])
            .arg(softhsm2_module())
            .args(["--token-label", &self.settings.clusters[i].token_label])
            .args(["--login", "--pin", pin, "--list-objects"])
            .output()
            .expect("run pkcs11-tool")
            .status
            .success()
    }

    /// How many objects the token of cluster `i` holds (every one is a key: hsm-kms makes
    /// nothing else), counted from the token's object files. Without a login, on purpose:
    /// SoftHSM2 2.6.1 rewrites the token's own file on every C_Login and releases its lock
    /// before the data is flushed (fixed upstream after 2.6.1), so a server reading that
    /// file at the same moment can see it empty. A check made while servers run must not
    /// write to their token.
    pub fn token_secret_keys(&self, i: usize) -> usize {
        std::fs::read_dir(self.token_dir(i))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".object") && name != "token.object")
            .count()
    }

    /// The directory of the token of cluster `i`: the one whose token file names its label.
    /// A server's C_Login rewrites that file (see `token_secret_keys`), so a read can find it
    /// empty for a moment: it is read again.
    fn token_dir(&self, i: usize) -> PathBuf {
        let label = self.settings.clusters[i].token_label.as_bytes();
        let tokens = self.dir.path().join("tokens");
        for _ in 0..100 {
            let found: Vec<PathBuf> = std::fs::read_dir(&tokens)
                .unwrap()
                .filter_map(|e| {
                    let dir = e.unwrap().path();
                    let file = std::fs::read(dir.join("token.object")).ok()?;
                    file.windows(label.len()).any(|w| w == label).then_some(dir)
                })
                .collect();
            match found.as_slice() {
                [dir] => return dir.clone(),
                [] => std::thread::sleep(Duration::from_millis(10)),
                _ => panic!("two token directories name the label"),
            }
        }
        panic!("no token directory names the label")
    }

    /// The labels (key ARNs) of the secret-key objects on the token of cluster `i`, one per
    /// object, through pkcs11-tool.
    pub fn token_key_labels(&self, i: usize) -> Vec<String> {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", self.softhsm2_conf())
            .args(["--module"])
            .arg(softhsm2_module())
            .args(["--token-label", &self.settings.clusters[i].token_label])
            .args([
                "--login",
                "--pin",
                PASSWORD,
                "--list-objects",
                "--type",
                "secrkey",
            ])
            .output()
            .expect("run pkcs11-tool");
        assert!(
            out.status.success(),
            "pkcs11-tool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each object is a "Secret Key Object" line followed by indented attribute lines.
        let text = String::from_utf8_lossy(&out.stdout);
        let mut labels = Vec::new();
        let mut in_key = false;
        for line in text.lines() {
            if !line.starts_with(' ') {
                in_key = line.starts_with("Secret Key Object");
                if in_key {
                    labels.push(String::new());
                }
            } else if let Some(label) = line.trim().strip_prefix("label:") {
                if in_key {
                    *labels.last_mut().unwrap() = label.trim().to_string();
                }
            }
        }
        labels
    }

    /// The admin listener's /metrics text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// GET `path` from the admin listener: (HTTP status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path)
    }

    /// The gRPC health status of `service` (a store id, or "" for the whole server).
    pub async fn health(&self, service: &str) -> i32 {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
        match c
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
        {
            Ok(r) => r.into_inner().status,
            Err(s) => panic!("health check of {service}: {s:?}"),
        }
    }

    /// Stops the server with SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        sigterm(&child);
        let status = child.wait().unwrap();
        status.success()
    }

    /// Stops the server, lets `change` edit the config, and starts it again on the same
    /// tokens and metadata.
    pub async fn restart_with(&mut self, change: impl FnOnce(&mut Settings)) {
        assert!(self.stop(), "hsm-kms did not exit cleanly");
        change(&mut self.settings);
        self.launch().await;
    }

    pub async fn client(&self) -> Client {
        let url = format!("http://{}", self.addr);
        for _ in 0..50 {
            if let Ok(c) = KeyManagementServiceClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot connect to {url}");
    }

    pub fn cluster(&self, i: usize) -> &ClusterSettings {
        &self.settings.clusters[i]
    }

    /// CreateCustomKeyStore for cluster `i` with the right anchor.
    pub async fn create_store(
        &self,
        c: &mut Client,
        i: usize,
        name: &str,
        password: &str,
    ) -> String {
        c.create_custom_key_store(CreateCustomKeyStoreRequest {
            custom_key_store_name: name.into(),
            cloud_hsm_cluster_id: Some(self.cluster(i).id.clone()),
            trust_anchor_certificate: Some(self.anchors[i].clone()),
            key_store_password: Some(password.into()),
            custom_key_store_type: None,
        })
        .await
        .expect("CreateCustomKeyStore")
        .into_inner()
        .custom_key_store_id
    }

    /// A CONNECTED store on cluster `i`.
    pub async fn connected_store(&self, c: &mut Client, i: usize, name: &str) -> String {
        let id = self.create_store(c, i, name, PASSWORD).await;
        assert_eq!(connect(c, &id).await, ("CONNECTED".into(), None));
        id
    }
}

/// Another replica of a harness's service: the same config, token and database, its own
/// listeners and audit trail. Killed when dropped.
pub struct Replica {
    child: Child,
    pub addr: String,
    /// The admin listener (/healthz, /readyz).
    pub admin: String,
    pub audit: PathBuf,
}

impl Replica {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> Client {
        let url = format!("http://{}", self.addr);
        KeyManagementServiceClient::connect(url)
            .await
            .expect("connect to the replica")
    }

    /// SIGTERM, and whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        sigterm(&self.child);
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Harness {
    /// Starts replica `name` of this service (which must use `[database]`).
    pub fn replica(&self, name: &str) -> Replica {
        self.replica_with(name, |_| {}, &[])
    }

    /// Starts replica `name` with `change` applied to its config and `env` added to its
    /// environment (e.g. its own FAULTY_PKCS11_CONTROL), and waits until it is ready: logged
    /// in to every CONNECTED store.
    ///
    /// Waiting keeps replicas from logging in at the same moment. With SoftHSM2 2.6.1, a
    /// process that reads the token's own file (C_Login, C_GetTokenInfo) while another
    /// process's C_Login rewrites it can lose sight of every object made after that, for
    /// good: measured here, a process went on finding 136 keys while the token held 159.
    /// (The file is unlocked before its write is flushed; fixed upstream after 2.6.1.)
    pub fn replica_with(
        &self,
        name: &str,
        change: impl FnOnce(&mut Settings),
        env: &[(&str, &Path)],
    ) -> Replica {
        let (mut command, audit) = self.replica_command(name, change);
        command.envs(env.iter().copied());
        let replica = Self::spawn_replica(command, audit);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, why) = http_get(&replica.admin, "/readyz");
            if status == 200 {
                break replica;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {name} is not ready: {why}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts replica `name` from `binary` (another build than the one under test).
    pub fn replica_of(&self, binary: &Path, name: &str) -> Replica {
        let (command, audit) = self.replica_command_of(binary, name, |_| {});
        Self::spawn_replica(command, audit)
    }

    fn spawn_replica(mut command: Command, audit: PathBuf) -> Replica {
        let mut child = command
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a replica");
        let mut lines = wait_for_lines(
            &mut child,
            &["hsm-kms admin listening on ", "hsm-kms listening on "],
            Duration::from_secs(60),
        );
        let addr = lines.pop().unwrap();
        let admin = lines.pop().unwrap();
        Replica {
            child,
            addr,
            admin,
            audit,
        }
    }

    /// The command that runs replica `name`, with `change` applied to its config, and its
    /// audit file. Its standard output and error are piped.
    pub fn replica_command(
        &self,
        name: &str,
        change: impl FnOnce(&mut Settings),
    ) -> (Command, PathBuf) {
        self.replica_command_of(&server_binary(), name, change)
    }

    fn replica_command_of(
        &self,
        binary: &Path,
        name: &str,
        change: impl FnOnce(&mut Settings),
    ) -> (Command, PathBuf) {
        assert!(
            self.settings.database.is_some(),
            "replicas share a database"
        );
        let mut s = self.settings.clone();
        s.server.listen = "127.0.0.1:0".parse().unwrap();
        s.admin.listen = "127.0.0.1:0".parse().unwrap();
        s.server.aws_listen = None;
        s.audit.file = self.dir.path().join(format!("{name}-audit.jsonl"));
        s.audit.replica = name.into();
        change(&mut s);
        let config = self.dir.path().join(format!("{name}.toml"));
        let text = if binary == server_binary() {
            config_text(&s)
        } else {
            toml::to_string_pretty(&s).unwrap()
        };
        std::fs::write(&config, text).unwrap();
        let mut command = Command::new(binary);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("HSM_KMS_SEALING_KEY")
            .envs(self.options.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        (command, s.audit.file)
    }
}

/// Runs `hsm-kms audit verify` (with `--config`, against the recorded heads): whether the
/// chain holds, and what the command said.
pub fn audit_verify(config: Option<&Path>, files: &[PathBuf]) -> (bool, String) {
    let mut command = Command::new(server_binary());
    command.args(["audit", "verify"]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let out = command.args(files).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Cuts the last `n` lines off a file.
pub fn cut_last_lines(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > n,
        "{} has only {} lines",
        path.display(),
        lines.len()
    );
    std::fs::write(path, lines[..lines.len() - n].join("\n") + "\n").unwrap();
}

/// Points `s` at `database`, with a sealing key file made for it (with a database, the
/// service never makes one itself: every replica needs a copy of the same key).
pub fn use_database(s: &mut Settings, database: hsm_kms::config::DatabaseSettings) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = &s.security.sealing_key_file;
    if !path.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        f.write_all(&key).unwrap();
    }
    s.database = Some(database);
}

/// A fresh database on this test process's throwaway PostgreSQL server.
pub async fn postgres_database() -> hsm_kms::config::DatabaseSettings {
    let server = testing::postgres::Server::shared()
        .expect("PostgreSQL for the replica tests (scripts/setup.sh installs it)");
    database_on(server).await
}

/// A fresh database on `server`.
pub async fn database_on(server: &testing::postgres::Server) -> hsm_kms::config::DatabaseSettings {
    hsm_kms::config::DatabaseSettings {
        url: server.fresh_database().await.unwrap(),
        password_file: None,
        password_env: None,
        pool_size: 8,
        tls_ca_file: None,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

/// GET `path` from the HTTP listener at `addr`: the status and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

/// Reads the child's stdout until a line starting with `prefix`; returns the rest of it.
/// The rest of stdout keeps being drained so the child never blocks on a full pipe.
pub fn wait_for_line(child: &mut Child, prefix: &str, timeout: Duration) -> String {
    wait_for_lines(child, &[prefix], timeout).remove(0)
}

/// As `wait_for_line`, for lines that come in this order.
pub fn wait_for_lines(child: &mut Child, prefixes: &[&str], timeout: Duration) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut wanted: Vec<String> = prefixes.iter().rev().map(|p| p.to_string()).collect();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(prefix) = wanted.last() {
                if let Some(rest) = line.strip_prefix(prefix.as_str()) {
                    let _ = tx.send(rest.to_string());
                    wanted.pop();
                }
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    prefixes
        .iter()
        .map(|p| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            rx.recv_timeout(left)
                .unwrap_or_else(|_| panic!("hsm-kms did not print '{p}' in time"))
        })
        .collect()
}

pub fn token_label(cluster_id: &str) -> String {
    format!("tok-{cluster_id}")
}

pub fn init_token(conf: &Path, label: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
            "--pin",
            PASSWORD,
        ])
        .output()
        .expect("softhsm2-util must be installed");
    assert!(
        out.status.success(),
        "softhsm2-util: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn make_anchor(cluster_id: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("anchor {cluster_id}"));
    params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

/// Connects a store and waits for the outcome: (state, error code).
pub async fn connect(c: &mut Client, id: &str) -> (String, Option<String>) {
    c.connect_custom_key_store(ConnectCustomKeyStoreRequest {
        custom_key_store_id: id.into(),
    })
    .await
    .expect("ConnectCustomKeyStore");
    wait_settled(c, id).await
}

/// Polls until the store is no longer CONNECTING.
pub async fn wait_settled(c: &mut Client, id: &str) -> (String, Option<String>) {
    for _ in 0..300 {
        let s = describe_store(c, id).await;
        if s.connection_state != "CONNECTING" {
            return (s.connection_state, s.connection_error_code);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store {id} stayed CONNECTING");
}

pub async fn describe_store(c: &mut Client, id: &str) -> CustomKeyStoresListEntry {
    let mut r = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
            custom_key_store_id: Some(id.into()),
            ..Default::default()
        })
        .await
        .expect("DescribeCustomKeyStores")
        .into_inner();
    assert_eq!(r.custom_key_stores.len(), 1);
    r.custom_key_stores.remove(0)
}

pub async fn disconnect(c: &mut Client, id: &str) {
    c.disconnect_custom_key_store(DisconnectCustomKeyStoreRequest {
        custom_key_store_id: id.into(),
    })
    .await
    .expect("DisconnectCustomKeyStore");
}

pub async fn create_key(c: &mut Client, store: &str) -> KeyMetadata {
    c.create_key(CreateKeyRequest {
        custom_key_store_id: Some(store.into()),
        origin: Some("AWS_CLOUDHSM".into()),
        ..Default::default()
    })
    .await
    .expect("CreateKey")
    .into_inner()
    .key_metadata
    .unwrap()
}

pub async fn describe_key(c: &mut Client, key: &str) -> KeyMetadata {
    c.describe_key(DescribeKeyRequest {
        key_id: key.into(),
        ..Default::default()
    })
    .await
    .expect("DescribeKey")
    .into_inner()
    .key_metadata
    .unwrap()
}

/// CreateKey in `store`, as a result.
pub async fn try_create_key(
    c: &mut Client,
    store: &str,
) -> Result<tonic::Response<CreateKeyResponse>, tonic::Status> {
    c.create_key(CreateKeyRequest {
        custom_key_store_id: Some(store.into()),
        origin: Some("AWS_CLOUDHSM".into()),
        ..Default::default()
    })
    .await
}

/// Encrypt without context, as a result.
pub async fn try_encrypt(
    c: &mut Client,
    key: &str,
    pt: &[u8],
) -> Result<tonic::Response<EncryptResponse>, tonic::Status> {
    c.encrypt(EncryptRequest {
        key_id: key.into(),
        plaintext: pt.to_vec(),
        ..Default::default()
    })
    .await
}

pub async fn encrypt(c: &mut Client, key: &str, pt: &[u8]) -> Vec<u8> {
    c.encrypt(EncryptRequest {
        key_id: key.into(),
        plaintext: pt.to_vec(),
        ..Default::default()
    })
    .await
    .expect("Encrypt")
    .into_inner()
    .ciphertext_blob
}

/// The AWS exception name a failed call carries (its ErrorInfo reason).
pub fn aws_error(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("no ErrorInfo: {status:?}"))
}

/// The value of one sample in a Prometheus text exposition (`name{labels}` exactly as
/// printed), if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Asserts that a call failed with the AWS exception `name` (ErrorInfo reason, domain kms)
/// and the gRPC code of DESIGN.md's table; returns the message.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    name: &str,
) -> String {
    let status = match r {
        Ok(v) => panic!("expected {name}, got success: {:?}", v.into_inner()),
        Err(s) => s,
    };
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, name, "status: {status:?}");
    assert_eq!(info.domain, "kms");
    assert_eq!(status.code(), expected_code(name), "code of {name}");
    status.message().to_string()
}

fn expected_code(name: &str) -> tonic::Code {
    use tonic::Code::*;
    match name {
        "ValidationException"
        | "InvalidCiphertextException"
        | "IncorrectKeyException"
        | "InvalidKeyUsageException"
        | "InvalidArnException"
        | "InvalidMarkerException"
        | "TagException"
        | "IncorrectTrustAnchorException"
        | "InvalidAliasNameException"
        | "MalformedPolicyDocumentException" => InvalidArgument,
        "NotFoundException"
        | "CustomKeyStoreNotFoundException"
        | "CloudHsmClusterNotFoundException" => NotFound,
        "CustomKeyStoreNameInUseException"
        | "CloudHsmClusterInUseException"
        | "AlreadyExistsException" => AlreadyExists,
        "UnsupportedOperationException" => Unimplemented,
        "KMSInternalException" => Internal,
        "DependencyTimeoutException" => Unavailable,
        "LimitExceededException" | "ThrottlingException" => ResourceExhausted,
        _ => FailedPrecondition,
    }
}

/// The headers of an AWS protocol request for `target` with `body`, signed as the AWS SDKs
/// sign (aws-sigv4) with `key` for `region` at `at`; unsigned when `key` is None.
pub fn aws_headers(
    host: &str,
    target: &str,
    body: &[u8],
    key: Option<(&str, &str)>,
    region: &str,
    at: std::time::SystemTime,
) -> Vec<(String, String)> {
    let target = format!("TrentService.{target}");
    let headers = [
        ("host", host),
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target.as_str()),
    ];
    match key {
        Some((id, secret)) => {
            hsm_kms::api::aws::sigv4::sign_post(&headers, body, id, secret, region, at).unwrap()
        }
        None => headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    }
}

/// An AWS protocol answer: HTTP status, headers (names in lower case), JSON body.
pub type AwsAnswer = (
    u16,
    std::collections::HashMap<String, String>,
    serde_json::Value,
);

/// One HTTP/1.1 `POST /` over `stream` with `headers` and `body`; the connection closes.
pub fn http1_post(
    mut stream: impl Read + Write,
    headers: &[(String, String)],
    body: &[u8],
) -> AwsAnswer {
    let mut request = "POST / HTTP/1.1\r\n".to_string();
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    // A TLS peer may close without close_notify after the response: keep what arrived.
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    (
        status,
        headers,
        serde_json::from_str(body).unwrap_or_default(),
    )
}

// The AWS protocol front: a server with two access keys, the AWS SDK for Rust against it,
// and its audit trail.

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::ProvideErrorMetadata;

pub const ROOT_KEY: (&str, &str) = (
    "AKIAROOTROOTROOT0001",
    "root-secret-0123456789abcdefghijklmnopqr",
);
pub const BOB_KEY: (&str, &str) = (
    "AKIABOBBOBBOBBOB0002",
    "bob-secret-0123456789abcdefghijklmnopqrst",
);
pub const ROOT: &str = "arn:aws:iam::111122223333:root";
pub const BOB: &str = "arn:aws:iam::111122223333:user/bob";
pub const STORE: &str = "aws-store";
pub const REGION: &str = "us-east-1";

/// The environment that carries the test access keys' secrets (`add_access_keys`).
pub fn access_key_env() -> Vec<(&'static str, String)> {
    vec![
        ("TEST_ROOT_SECRET", ROOT_KEY.1.to_string()),
        ("TEST_BOB_SECRET", BOB_KEY.1.to_string()),
    ]
}

/// The root's and bob's access keys in `s`, their secrets from `access_key_env`.
pub fn add_access_keys(s: &mut Settings) {
    for (id, var, principal) in [
        (ROOT_KEY.0, "TEST_ROOT_SECRET", ROOT),
        (BOB_KEY.0, "TEST_BOB_SECRET", BOB),
    ] {
        s.auth.access_keys.push(hsm_kms::config::AccessKeySettings {
            access_key_id: id.into(),
            secret_file: None,
            secret_env: Some(var.into()),
            principal: principal.into(),
        });
    }
}

/// A server with the AWS protocol on a free port, two access keys (the root's and bob's,
/// their secrets from the environment), and `kms.default_custom_key_store` naming STORE.
pub async fn aws_server(clusters: &[ClusterSpec]) -> Harness {
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    Harness::start_opts(clusters, options, |s| {
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        s.kms.default_custom_key_store = Some(STORE.into());
        add_access_keys(s);
    })
    .await
}

pub fn sdk_in(h: &Harness, key: (&str, &str), region: &str) -> aws_sdk_kms::Client {
    sdk_at(&h.aws, key, region)
}

/// The AWS SDK for the AWS protocol listener at `addr` (plaintext), signing with `key`.
pub fn sdk_at(addr: &str, key: (&str, &str), region: &str) -> aws_sdk_kms::Client {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(Credentials::new(key.0, key.1, None, None, "test"))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

pub fn sdk(h: &Harness, key: (&str, &str)) -> aws_sdk_kms::Client {
    sdk_in(h, key, REGION)
}

/// The exception name and message of a failed call.
pub fn refusal<E: ProvideErrorMetadata, R>(r: Result<R, E>) -> (String, String) {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => (
            e.code().unwrap_or("<no code>").to_string(),
            e.message().unwrap_or("").to_string(),
        ),
    }
}

pub fn audit_lines(h: &Harness) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&h.settings.audit.file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The outcome line of a request id (not the `intent` line a state change has before it),
/// waiting for the writer to get there.
pub async fn audit_line(h: &Harness, request_id: &str) -> serde_json::Value {
    for _ in 0..100 {
        if let Some(l) = audit_lines(h)
            .into_iter()
            .find(|l| l["request_id"] == request_id && l["outcome"] != "intent")
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit line for request {request_id}");
}

/// The STORE on cluster 0, created and connected through the AWS protocol.
pub async fn aws_connected_store(h: &Harness, c: &aws_sdk_kms::Client) -> String {
    let id = c
        .create_custom_key_store()
        .custom_key_store_name(STORE)
        .cloud_hsm_cluster_id(&h.cluster(0).id)
        .trust_anchor_certificate(&h.anchors[0])
        .key_store_password(PASSWORD)
        .send()
        .await
        .unwrap()
        .custom_key_store_id
        .unwrap();
    c.connect_custom_key_store()
        .custom_key_store_id(&id)
        .send()
        .await
        .unwrap();
    for _ in 0..300 {
        let stores = c
            .describe_custom_key_stores()
            .custom_key_store_id(&id)
            .send()
            .await
            .unwrap();
        let state = stores.custom_key_stores()[0]
            .connection_state()
            .unwrap()
            .as_str()
            .to_string();
        if state == "CONNECTED" {
            return id;
        }
        assert!(state == "CONNECTING", "store state {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store did not connect");
}

/// A key in the STORE on cluster 0, made through the AWS protocol.
pub async fn aws_connected_key(h: &Harness, c: &aws_sdk_kms::Client) -> String {
    aws_connected_store(h, c).await;
    let made = c.create_key().send().await.unwrap();
    made.key_metadata.unwrap().key_id
}

/// A raw HTTP/2 connection (prior knowledge, plaintext), as a hostile client drives it.
pub async fn h2_connection(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A free TCP port on loopback (bound and released: the caller binds it again at once).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// HAProxy running deploy/haproxy-replicas.cfg, the configuration scripts/cluster.sh ships,
/// in front of replicas; stopped when dropped.
pub struct Balancer {
    child: Child,
    /// The gRPC front (plaintext HTTP/2) and the AWS front.
    pub grpc: String,
    pub aws: String,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One replica as the balancer sees it: its gRPC address, its AWS address if it has one,
/// and its admin address (for /readyz).
pub struct Backend {
    pub grpc: String,
    pub aws: Option<String>,
    pub admin: String,
}

impl Balancer {
    /// Starts HAProxy in `dir` with the shipped configuration for `backends`, and waits
    /// until its gRPC front accepts connections.
    pub fn start(dir: &Path, backends: &[Backend]) -> Balancer {
        let (grpc, aws) = (free_port(), free_port());
        let lines = |addr: &dyn Fn(&Backend) -> Option<String>, suffix: &str| -> String {
            backends
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    let admin_port = b.admin.rsplit(':').next().unwrap();
                    addr(b).map(|a| format!("    server r{i} {a} check port {admin_port}{suffix}"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/haproxy-replicas.cfg"
        ))
        .unwrap();
        let config = template
            .replace("@BIND@", "127.0.0.1")
            .replace(
                "@ERRORS@",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy-errors"),
            )
            .replace("@GRPC_PORT@", &grpc.to_string())
            .replace("@AWS_PORT@", &aws.to_string())
            .replace(
                "@GRPC_SERVERS@",
                &lines(&|b| Some(b.grpc.clone()), " proto h2"),
            )
            .replace("@AWS_SERVERS@", &lines(&|b| b.aws.clone(), ""));
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("haproxy (scripts/setup.sh installs it)");
        let balancer = Balancer {
            child,
            grpc: format!("127.0.0.1:{grpc}"),
            aws: format!("127.0.0.1:{aws}"),
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&balancer.grpc).is_ok() {
                return balancer;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("haproxy did not listen on {}", balancer.grpc);
    }
}

/// Asserts that the `made` changes `op` made to `key`, as the database counted them, are each
/// in the audit `lines` (of one or more trails): as an `allowed` line or, where the process
/// died before writing that, as an `intent` line with no outcome line. Returns how many
/// intents had none.
pub fn assert_changes_in_trail(lines: &[serde_json::Value], key: &str, op: &str, made: i64) -> i64 {
    let finished: std::collections::HashSet<&str> = lines
        .iter()
        .filter(|l| l["outcome"] != "intent")
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    let of_key = |l: &&serde_json::Value| {
        l["operation"] == op
            && l["resources"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.ends_with(key)))
            })
    };
    let allowed = lines
        .iter()
        .filter(of_key)
        .filter(|l| l["outcome"] == "allowed")
        .count() as i64;
    let unfinished = lines
        .iter()
        .filter(of_key)
        .filter(|l| l["outcome"] == "intent")
        .filter(|l| !finished.contains(l["request_id"].as_str().unwrap_or("")))
        .count() as i64;
    assert!(
        allowed <= made && made <= allowed + unfinished,
        "{op} on {key}: the database made {made}, the trail says {allowed} allowed and \
         {unfinished} begun and not finished"
    );
    unfinished
}

/// A stream the attacker keeps open: the request half and the answer it may get.
pub type Held = (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>);

/// Opens up to `streams` streams on `send`, an HTTP/2 connection to the AWS listener at
/// `addr`, each sending the headers of a request with `headers` (and no Host: HTTP/2 names
/// it in :authority) and then nothing: no body, never the end of the request.
pub async fn headers_only_streams(
    send: h2::client::SendRequest<bytes::Bytes>,
    addr: &str,
    headers: &[(String, String)],
    streams: usize,
) -> Vec<Held> {
    let mut held = Vec::new();
    for _ in 0..streams {
        let ready = tokio::time::timeout(Duration::from_millis(500), send.clone().ready()).await;
        let Ok(Ok(mut ready)) = ready else { break };
        let mut req = http::Request::post(format!("http://{addr}/"));
        for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
            req = req.header(n.as_str(), v.as_str());
        }
        let Ok(sent) = ready.send_request(req.body(()).unwrap(), false) else {
            break;
        };
        held.push(sent);
    }
    held
}

/// A check this machine cannot make (it needs root, say). Under CI, which must make every
/// check, that is a failure; elsewhere the test says loudly that it skipped the check and
/// why (docs/TESTING.md).
pub fn cannot_check(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI must make this check, and cannot here: {why}");
    }
    eprintln!("SKIPPED (this machine cannot make this check; CI must): {why}");
}
