//! Test harness: real `hsm-kms` processes on real SoftHSM2 tokens, one fresh token directory
//! per harness, driven over gRPC.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hsm_kms::config::{
    ClusterSettings, HsmEntry, HsmSettings, LifecycleSettings, PinFormat, SecuritySettings,
    ServerSettings, Settings, StorageSettings,
};
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
    pub hsms: Vec<(&'static str, &'static str)>,
    pub state: &'static str,
    pub lineage: Option<String>,
    /// Whether the token exists (false: the cluster's token is absent).
    pub token: bool,
}

impl ClusterSpec {
    /// An ACTIVE cluster with two active HSMs in two zones.
    pub fn good(id: &str) -> ClusterSpec {
        ClusterSpec {
            id: id.into(),
            hsms: vec![("us-east-1a", "ACTIVE"), ("us-east-1b", "ACTIVE")],
            state: "ACTIVE",
            lineage: None,
            token: true,
        }
    }
}

pub fn softhsm2_module() -> PathBuf {
    hsm_kms::dev::softhsm2_module().expect("SoftHSM2 must be installed (scripts/setup.sh)")
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub anchors: Vec<String>,
    child: Option<Child>,
    pub addr: String,
}

impl Harness {
    /// Makes tokens and a config for `clusters`, and starts the server.
    pub async fn start(clusters: &[ClusterSpec]) -> Harness {
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
                module: softhsm2_module(),
                token_label: label,
                trust_anchor_file: anchor_file,
                state: c.state.into(),
                lineage: c.lineage.clone(),
                pin_format: PinFormat::Password,
                crypto_user: "kmsuser".into(),
                hsms: c
                    .hsms
                    .iter()
                    .enumerate()
                    .map(|(i, (az, state))| HsmEntry {
                        id: format!("hsm-{i}"),
                        availability_zone: az.to_string(),
                        state: state.to_string(),
                    })
                    .collect(),
            });
        }
        let settings = Settings {
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().unwrap(),
                shutdown_grace_seconds: 2,
            },
            account: Default::default(),
            storage: StorageSettings {
                sqlite_path: dir.path().join("metadata.sqlite3"),
            },
            security: SecuritySettings {
                sealing_key_file: dir.path().join("sealing.key"),
            },
            hsm: HsmSettings {
                softhsm2_conf: Some(conf),
                session_pool_size: 8,
            },
            lifecycle: LifecycleSettings {
                deletion_check_interval_seconds: 1,
                clock_offset_seconds: 0,
            },
            clusters: cluster_settings,
        };
        let mut h = Harness {
            dir,
            settings,
            anchors,
            child: None,
            addr: String::new(),
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
        std::fs::write(
            self.config_path(),
            toml::to_string_pretty(&self.settings).unwrap(),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .env_remove("HSM_KMS_SEALING_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hsm-kms");
        self.addr = wait_for_line(&mut child, "hsm-kms listening on ", Duration::from_secs(60));
        self.child = Some(child);
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

/// Reads the child's stdout until a line starting with `prefix`; returns the rest of it.
/// The rest of stdout keeps being drained so the child never blocks on a full pipe.
pub fn wait_for_line(child: &mut Child, prefix: &str, timeout: Duration) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(rest) = line.strip_prefix(&prefix) {
                    let _ = tx.send(rest.to_string());
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("hsm-kms did not print '{}' in time", "listening"))
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
    c.describe_key(DescribeKeyRequest { key_id: key.into() })
        .await
        .expect("DescribeKey")
        .into_inner()
        .key_metadata
        .unwrap()
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
        "LimitExceededException" | "ThrottlingException" => ResourceExhausted,
        _ => FailedPrecondition,
    }
}
