//! `hsm-kms dev`: a self-contained instance on a SoftHSM2 token, for trying the service and
//! for development. Everything lives under one data directory:
//!
//! ```text
//! softhsm2.conf        SoftHSM2 configuration pointing at tokens/
//! tokens/              the token (the stand-in "cluster")
//! hsm-kms.toml         the generated config: `hsm-kms serve --config` runs it as is
//! metadata.sqlite3     key and store metadata
//! sealing.key          seals the kmsuser password at rest (0600)
//! trust-anchor.pem     the cluster's trust anchor certificate
//! kmsuser-password     the token's current kmsuser password, for pkcs11-tool (0600)
//! so-pin               the token's security officer PIN (0600)
//! aws-access-key-id    the dev access key for the AWS protocol (its principal: the root)
//! aws-secret-access-key  its secret (0600)
//! aws.env              AWS_ENDPOINT_URL_KMS and the dev credentials, for `. aws.env` (0600)
//! ```
//!
//! Run again, it reuses what is there. It is the only place hsm-kms writes a secret to a
//! plain file, and it does so because a developer needs to inspect the token.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::config::{ClusterSettings, HsmEntry, PinFormat, Settings};
use crate::hsm::{self, Modules};
use crate::kms::gate::{Gate, Subject};
use crate::kms::keystores::{CreateStore, Password, UpdateStore};
use crate::kms::{Kms, Parts};
use crate::server;
use model::op::Op;
use model::states::ConnectionState::{Connected, Disconnected, Failed};

pub const STORE_NAME: &str = "dev";
pub const TOKEN_LABEL: &str = "hsm-kms-dev";

/// Where SoftHSM2's module is installed on common distributions.
const SOFTHSM2_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("hsm-kms").join("dev")
}

/// The SoftHSM2 module: `$SOFTHSM2_MODULE`, else the first of the usual install paths.
pub fn softhsm2_module() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(p));
    }
    SOFTHSM2_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("SoftHSM2 is not installed (no libsofthsm2.so found); run scripts/setup.sh or set SOFTHSM2_MODULE")
}

/// Random text from `alphabet`, by rejection sampling (no modulo bias).
pub fn random_text(alphabet: &[u8], len: usize) -> anyhow::Result<String> {
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
        for b in buf {
            if (b as usize) < limit && out.len() < len {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

const CLUSTER_ALPHABET: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The addresses asked for on the command line; unset ones take the config's (by default
/// 50051 gRPC, 50052 admin, 50053 AWS), or a free port when that one is busy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Listeners {
    pub grpc: Option<SocketAddr>,
    pub aws: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub xks: Option<SocketAddr>,
}

const AWS_PORT: u16 = 50053;
const XKS_PORT: u16 = 50054;
/// The dev XKS credential's URI path prefix (before /kms/xks/v1).
const XKS_PREFIX: &str = "hsm-kms/dev";

/// The address to listen on: `asked` as it is (port 0: a free port, chosen now so that the
/// banner and aws.env can name it), else `usual`, else, when `usual` is taken (another dev
/// instance, say), a free port on the same address. Another process can still take the port
/// before the server binds it; the bind then fails with the address.
fn pick(asked: Option<SocketAddr>, usual: SocketAddr) -> anyhow::Result<SocketAddr> {
    let free = |ip| -> anyhow::Result<SocketAddr> {
        Ok(std::net::TcpListener::bind(SocketAddr::new(ip, 0))?.local_addr()?)
    };
    match asked {
        Some(a) if a.port() == 0 => free(a.ip()),
        Some(a) => Ok(a),
        None => match std::net::TcpListener::bind(usual) {
            Ok(_) => Ok(usual),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => free(usual.ip()),
            Err(e) => Err(e).with_context(|| format!("binding {usual}")),
        },
    }
}

/// The dev access key (created once, kept in the data directory), standing for the root.
fn ensure_access_key(data_dir: &Path, settings: &mut Settings) -> anyhow::Result<()> {
    if !settings.auth.access_keys.is_empty() {
        return Ok(());
    }
    let id_file = data_dir.join("aws-access-key-id");
    let secret_file = data_dir.join("aws-secret-access-key");
    if !id_file.exists() || !secret_file.exists() {
        let id = format!("AKIA{}", random_text(ACCESS_KEY_ALPHABET, 16)?);
        let secret = Zeroizing::new(random_text(SECRET_ALPHABET, 40)?);
        write_private(&secret_file, secret.as_bytes())?;
        fs::write(&id_file, &id)?;
    }
    settings
        .auth
        .access_keys
        .push(crate::config::AccessKeySettings {
            access_key_id: fs::read_to_string(&id_file)?.trim().to_string(),
            secret_file: Some(secret_file),
            secret_env: None,
            principal: format!(
                "arn:{}:iam::{}:root",
                settings.account.partition, settings.account.account_id
            ),
        });
    Ok(())
}

const ACCESS_KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The dev XKS credential (created once, kept in the data directory): an access key id of
/// 26 characters of A-Z and 2-7, a secret of 32 random bytes in base64, for the principal
/// `role/aws-kms-xks` of the account, whom the dev XKS key's policy lets use it.
fn ensure_xks_credential(data_dir: &Path, settings: &mut Settings) -> anyhow::Result<()> {
    if !settings.xks.credentials.is_empty() {
        return Ok(());
    }
    let id_file = data_dir.join("xks-access-key-id");
    let secret_file = data_dir.join("xks-secret-access-key");
    if !id_file.exists() || !secret_file.exists() {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut()).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        use base64::Engine as _;
        let secret = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*raw));
        write_private(&secret_file, secret.as_bytes())?;
        fs::write(&id_file, random_text(ACCESS_KEY_ALPHABET, 26)?)?;
    }
    settings.xks.credentials.push(crate::config::XksCredential {
        uri_prefix: XKS_PREFIX.into(),
        access_key_id: fs::read_to_string(&id_file)?.trim().to_string(),
        secret_file: Some(secret_file),
        secret_env: None,
        principal: xks_principal(settings),
    });
    Ok(())
}

fn xks_principal(settings: &Settings) -> String {
    format!(
        "arn:{}:iam::{}:role/aws-kms-xks",
        settings.account.partition, settings.account.account_id
    )
}

/// Synchronous set-up, before any thread starts: directories, SoftHSM2 config (exported as
/// SOFTHSM2_CONF), trust anchor and the config file. Returns the settings to run with.
pub fn prepare(data_dir: &Path, listen: Listeners) -> anyhow::Result<Settings> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let tokens = data_dir.join("tokens");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)?;
    let softhsm_conf = data_dir.join("softhsm2.conf");
    if !softhsm_conf.exists() {
        fs::write(
            &softhsm_conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )?;
    }
    let anchor = data_dir.join("trust-anchor.pem");
    let config_path = data_dir.join("hsm-kms.toml");
    let mut settings = if config_path.exists() {
        Settings::read(&config_path)?
    } else {
        let cluster_id = format!("cluster-{}", random_text(CLUSTER_ALPHABET, 11)?);
        let settings = Settings {
            server: crate::config::ServerSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
                aws_listen: Some(SocketAddr::from(([127, 0, 0, 1], AWS_PORT))),
                // A developer's Ctrl-C should not wait long on idle clients.
                shutdown_grace_seconds: 3,
                worker_threads: None,
                ..Default::default()
            },
            account: Default::default(),
            storage: crate::config::StorageSettings {
                sqlite_path: data_dir.join("metadata.sqlite3"),
            },
            database: None,
            security: crate::config::SecuritySettings {
                sealing_key_file: data_dir.join("sealing.key"),
                // The token stays usable with the password in the data directory.
                rotate_kmsuser_password: false,
            },
            hsm: crate::config::HsmSettings {
                softhsm2_conf: Some(softhsm_conf.clone()),
                ..Default::default()
            },
            lifecycle: Default::default(),
            throttling: Default::default(),
            admin: Default::default(),
            tls: Default::default(),
            // Development: plaintext on loopback, every caller the account root.
            auth: crate::config::AuthSettings {
                allow_plaintext_loopback: true,
                ..Default::default()
            },
            audit: crate::config::AuditSettings {
                file: data_dir.join("audit.jsonl"),
                fsync: false,
                ..Default::default()
            },
            xks: Default::default(),
            kms: crate::config::KmsSettings {
                // Tools that name no store create their keys in the dev store.
                default_custom_key_store: Some(STORE_NAME.into()),
            },
            clusters: vec![ClusterSettings {
                id: cluster_id.clone(),
                module: softhsm2_module()?,
                token_label: TOKEN_LABEL.into(),
                trust_anchor_file: anchor.clone(),
                state: Default::default(),
                lineage: None,
                pin_format: PinFormat::Password,
                gcm_iv: Default::default(),
                crypto_user: "kmsuser".into(),
                hsms: vec![
                    HsmEntry {
                        id: format!("hsm-{}", random_text(CLUSTER_ALPHABET, 11)?),
                        availability_zone: "us-east-1a".into(),
                        state: Default::default(),
                    },
                    HsmEntry {
                        id: format!("hsm-{}", random_text(CLUSTER_ALPHABET, 11)?),
                        availability_zone: "us-east-1b".into(),
                        state: Default::default(),
                    },
                ],
            }],
        };
        let mut settings = settings;
        ensure_access_key(&data_dir, &mut settings)?;
        write_config(&config_path, &settings)?;
        settings
    };
    if !anchor.exists() {
        let cluster = settings
            .clusters
            .first()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("hsm-kms dev trust anchor for {cluster}"),
        );
        let cert = params.self_signed(&rcgen::KeyPair::generate()?)?;
        fs::write(&anchor, cert.pem())?;
    }
    // Each listener: as asked, else as configured, else a free port (see `pick`). A data
    // directory from before the AWS protocol gets its listener and access key here.
    settings.server.listen = pick(listen.grpc, settings.server.listen)?;
    let aws_usual = settings
        .server
        .aws_listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], AWS_PORT)));
    settings.server.aws_listen = Some(pick(listen.aws, aws_usual)?);
    settings.admin.listen = pick(listen.admin, settings.admin.listen)?;
    let xks_usual = settings
        .server
        .xks_listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], XKS_PORT)));
    settings.server.xks_listen = Some(pick(listen.xks, xks_usual)?);
    ensure_access_key(&data_dir, &mut settings)?;
    ensure_xks_credential(&data_dir, &mut settings)?;
    // Dev mode is plaintext on loopback whatever an older generated file says; a --listen
    // off loopback is refused by the check below.
    settings.auth.allow_plaintext_loopback = true;
    // A file generated before the audit trail existed names none: keep it in the data dir.
    if settings.audit.file == crate::config::AuditSettings::default().file {
        settings.audit.file = data_dir.join("audit.jsonl");
    }
    check_own_paths(&data_dir, &settings, &softhsm_conf)?;
    settings.check()?;
    if let Some(conf) = &settings.hsm.softhsm2_conf {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    Ok(settings)
}

/// Refuses a data directory whose config or SoftHSM2 config points outside it: a copy of
/// another data directory would otherwise go on using the original's metadata, audit trail
/// and token, silently.
fn check_own_paths(
    data_dir: &Path,
    settings: &Settings,
    softhsm_conf: &Path,
) -> anyhow::Result<()> {
    let tokendir = fs::read_to_string(softhsm_conf)?.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
    });
    let mut paths = vec![
        ("storage.sqlite_path", settings.storage.sqlite_path.clone()),
        (
            "security.sealing_key_file",
            settings.security.sealing_key_file.clone(),
        ),
        ("audit.file", settings.audit.file.clone()),
    ];
    paths.extend(
        settings
            .hsm
            .softhsm2_conf
            .clone()
            .map(|p| ("hsm.softhsm2_conf", p)),
    );
    paths.extend(
        settings
            .clusters
            .iter()
            .map(|c| ("clusters.trust_anchor_file", c.trust_anchor_file.clone())),
    );
    paths.extend(tokendir.map(|p| ("directories.tokendir in softhsm2.conf", p)));
    for (what, path) in paths {
        if !path.starts_with(data_dir) {
            anyhow::bail!(
                "{what} is {}, outside the data directory {}: was this directory copied from \
                 another one? It would go on using the other's metadata, audit trail and \
                 token. Use a new data directory, or correct the paths in {} and {}.",
                path.display(),
                data_dir.display(),
                data_dir.join("hsm-kms.toml").display(),
                softhsm_conf.display()
            );
        }
    }
    Ok(())
}

/// The generated config at `path`: `hsm-kms serve --config` runs it as is.
fn write_config(path: &Path, settings: &Settings) -> anyhow::Result<()> {
    let text = format!(
        "# Generated by `hsm-kms dev`; `hsm-kms serve --config {}` runs it as is.\n\
         # Every setting is documented in deploy/hsm-kms.example.toml.\n{}",
        path.display(),
        toml::to_string_pretty(settings)?
    );
    fs::write(path, text)?;
    Ok(())
}

/// Makes sure the token exists; returns the current kmsuser password.
fn ensure_token(
    modules: &Modules,
    settings: &Settings,
    data_dir: &Path,
) -> anyhow::Result<Zeroizing<String>> {
    let cluster = settings
        .clusters
        .first()
        .context("the dev config has no cluster")?;
    let ctx = modules
        .get(&cluster.module)
        .map_err(|e| anyhow::anyhow!(e))?;
    let password_file = data_dir.join("kmsuser-password");
    if hsm::find_token(&ctx, &cluster.token_label)?.is_some() {
        let pw = Zeroizing::new(
            fs::read_to_string(&password_file)
                .with_context(|| format!("reading {}", password_file.display()))?
                .trim()
                .to_string(),
        );
        return Ok(pw);
    }
    let so_pin = Zeroizing::new(random_text(SECRET_ALPHABET, 24)?);
    let password = Zeroizing::new(random_text(SECRET_ALPHABET, 24)?);
    write_private(&data_dir.join("so-pin"), so_pin.as_bytes())?;
    write_private(&password_file, password.as_bytes())?;
    hsm::init_token(&ctx, &cluster.token_label, &so_pin, &password)?;
    tracing::info!(token = %cluster.token_label, "initialised the dev token");
    Ok(password)
}

/// Runs the dev instance: server up, token and `dev` store ready and CONNECTED, quickstart
/// printed, then serves until SIGINT/SIGTERM.
pub async fn run(data_dir: PathBuf, settings: Settings) -> anyhow::Result<()> {
    let data_dir = data_dir.canonicalize()?;
    let modules = Arc::new(Modules::default());
    let password = {
        let (modules, settings, dir) = (Arc::clone(&modules), settings.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || ensure_token(&modules, &settings, &dir)).await??
    };
    let kms = Kms::new(Parts::from_settings(&settings, modules).await?);
    let running = server::start(
        &settings,
        Arc::clone(&kms),
        Some(data_dir.join("hsm-kms.toml")),
        server::shutdown_signal(),
    )
    .await?;
    let store_id = ensure_store(&kms, &settings, &password).await?;
    // The config names the addresses this instance bound (a busy default, or port 0, gave
    // it others), so that `serve --config` and aws.env agree with what is running.
    let mut bound = Settings::read(&data_dir.join("hsm-kms.toml"))?;
    let before = (
        bound.server.listen,
        bound.server.aws_listen,
        bound.admin.listen,
    );
    bound.server.listen = running.addr;
    bound.server.aws_listen = running.aws_addr.or(bound.server.aws_listen);
    let xks_before = bound.server.xks_listen;
    bound.server.xks_listen = running.xks_addr.or(bound.server.xks_listen);
    bound.admin.listen = running.admin_addr.unwrap_or(bound.admin.listen);
    if before
        != (
            bound.server.listen,
            bound.server.aws_listen,
            bound.admin.listen,
        )
        || xks_before != bound.server.xks_listen
    {
        write_config(&data_dir.join("hsm-kms.toml"), &bound)?;
    }
    if let Some(aws) = running.aws_addr {
        write_aws_env(&data_dir, &settings, aws)?;
    }
    let xks_key = ensure_xks_key(&kms, &settings, &data_dir, &store_id).await?;
    if let Some(xks) = running.xks_addr {
        write_xks_env(&data_dir, &settings, xks, &xks_key)?;
    }
    print_quickstart(&running, &data_dir, &settings, &store_id);
    running.task.await?
}

async fn ensure_store(
    kms: &Arc<Kms>,
    settings: &Settings,
    password: &str,
) -> anyhow::Result<String> {
    let err = |e: model::error::KmsError| anyhow::anyhow!("{e}");
    let cluster = &settings.clusters[0];
    let me = kms.service_caller();
    // The service acts as the account root, through the same gate as any request.
    let gate = |op| Gate::new(&me, op);
    let auth = gate(Op::DescribeCustomKeyStores)
        .authorize(kms, Subject::KeyStore(None))
        .await
        .map_err(err)?;
    let existing = kms
        .describe_custom_key_stores(&auth, None, Some(STORE_NAME), None, None)
        .await
        .ok()
        .and_then(|p| p.items.into_iter().next());
    let (id, fresh) = match existing {
        Some(s) => (s.id, false),
        None => {
            let anchor = fs::read_to_string(&cluster.trust_anchor_file)?;
            let auth = gate(Op::CreateCustomKeyStore)
                .authorize(kms, Subject::KeyStore(None))
                .await
                .map_err(err)?;
            let id = kms
                .create_custom_key_store(
                    &auth,
                    CreateStore {
                        name: STORE_NAME.into(),
                        cluster_id: Some(cluster.id.clone()),
                        trust_anchor: Some(anchor),
                        password: Some(Password::new(password.to_string()).map_err(err)?),
                        store_type: None,
                    },
                )
                .await
                .map_err(err)?;
            (id, true)
        }
    };
    for attempt in 0..2 {
        kms.settle(&id).await;
        let state = kms.keystore_state(&id).await.map_err(err)?;
        match state {
            Connected => return Ok(id),
            Failed => {
                let auth = gate(Op::DisconnectCustomKeyStore)
                    .authorize(kms, Subject::KeyStore(Some(&id)))
                    .await
                    .map_err(err)?;
                kms.disconnect_custom_key_store(&auth, &id)
                    .await
                    .map_err(err)?;
            }
            _ => {}
        }
        if kms.keystore_state(&id).await.map_err(err)? == Disconnected {
            if !fresh || attempt > 0 {
                // The token may have been made anew: the password file is the truth in dev.
                let auth = gate(Op::UpdateCustomKeyStore)
                    .authorize(kms, Subject::KeyStore(Some(&id)))
                    .await
                    .map_err(err)?;
                kms.update_custom_key_store(
                    &auth,
                    UpdateStore {
                        id: id.clone(),
                        new_name: None,
                        password: Some(Password::new(password.to_string()).map_err(err)?),
                        cluster_id: None,
                    },
                )
                .await
                .map_err(err)?;
            }
            let auth = gate(Op::ConnectCustomKeyStore)
                .authorize(kms, Subject::KeyStore(Some(&id)))
                .await
                .map_err(err)?;
            kms.connect_custom_key_store(&auth, &id)
                .await
                .map_err(err)?;
        }
        tracing::debug!(attempt, "waiting for the dev store to connect");
    }
    kms.settle(&id).await;
    let state = kms.keystore_state(&id).await.map_err(err)?;
    if state != Connected {
        bail!("the dev custom key store {id} did not connect (state {state}); see the log above");
    }
    Ok(id)
}

/// The key AWS KMS may use through the dev XKS credential (made once, its id kept in
/// `<data-dir>/xks-key-id`): in the dev store, its policy the account's statement and one
/// letting the credential's principal DescribeKey, Encrypt and Decrypt.
async fn ensure_xks_key(
    kms: &Arc<Kms>,
    settings: &Settings,
    data_dir: &Path,
    store_id: &str,
) -> anyhow::Result<String> {
    let err = |e: model::error::KmsError| anyhow::anyhow!("{e}");
    let file = data_dir.join("xks-key-id");
    let me = kms.service_caller();
    if let Ok(id) = fs::read_to_string(&file) {
        let id = id.trim().to_string();
        let found = Gate::new(&me, Op::DescribeKey)
            .authorize(kms, Subject::Key(crate::kms::gate::KeyNamed::id(&id)))
            .await;
        if found.is_ok() {
            return Ok(id);
        }
    }
    let account = format!(
        "arn:{}:iam::{}:root",
        settings.account.partition, settings.account.account_id
    );
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
             "Principal": {"AWS": account}, "Action": "kms:*", "Resource": "*"},
            {"Sid": "Allow AWS KMS through the XKS proxy", "Effect": "Allow",
             "Principal": {"AWS": xks_principal(settings)},
             "Action": ["kms:DescribeKey", "kms:Encrypt", "kms:Decrypt"], "Resource": "*"}
        ]
    });
    let auth = Gate::new(&me, Op::CreateKey)
        .authorize(kms, Subject::AccountBypassingLockout(false))
        .await
        .map_err(err)?;
    let key = kms
        .create_key(
            &auth,
            crate::kms::keys::CreateKey {
                description: Some("hsm-kms dev: the key AWS KMS uses through the XKS proxy".into()),
                key_usage: None,
                customer_master_key_spec: None,
                key_spec: None,
                origin: Some("AWS_CLOUDHSM".into()),
                custom_key_store_id: Some(store_id.to_string()),
                tags: Vec::new(),
                multi_region: None,
                policy: Some(policy.to_string()),
                bypass_policy_lockout_safety_check: false,
            },
        )
        .await
        .map_err(err)?;
    let id = key.key_id.to_string();
    fs::write(&file, &id)?;
    Ok(id)
}

/// `<data-dir>/xks.env`: what an XKS client (AWS's test client, curl) needs to call this
/// instance's XKS proxy API (0600: it holds the secret).
fn write_xks_env(
    data_dir: &Path,
    settings: &Settings,
    xks: SocketAddr,
    key_id: &str,
) -> anyhow::Result<()> {
    let credential = settings
        .xks
        .credentials
        .first()
        .context("the dev config has no XKS credential")?;
    let (_, secret) = credential.access_key()?;
    let text = Zeroizing::new(format!(
        "# Written by `hsm-kms dev`: its XKS proxy API (plain HTTP on loopback).\n\
         export XKS_PROXY_HOST={xks}\n\
         export XKS_URI_PREFIX={prefix}\n\
         export XKS_ACCESS_KEY_ID={id}\n\
         export XKS_SECRET_ACCESS_KEY={secret}\n\
         export XKS_REGION={region}\n\
         export XKS_KEY_ID={key_id}\n",
        prefix = credential.uri_prefix,
        id = credential.access_key_id,
        secret = secret.as_str(),
        region = settings.account.region,
    ));
    write_private(&data_dir.join("xks.env"), text.as_bytes())
}

/// `<data-dir>/aws.env`: the endpoint and the dev credentials as the AWS CLI and SDKs read
/// them from the environment, for `. aws.env` (0600: it holds the secret).
fn write_aws_env(data_dir: &Path, settings: &Settings, aws: SocketAddr) -> anyhow::Result<()> {
    let key = settings
        .auth
        .access_keys
        .first()
        .context("the dev config has no access key")?;
    let secret = key.secret()?;
    let region = &settings.account.region;
    let text = Zeroizing::new(format!(
        "# Written by `hsm-kms dev`: the AWS CLI and SDKs against this instance.\n\
         export AWS_ENDPOINT_URL_KMS=http://{aws}\n\
         export AWS_ACCESS_KEY_ID={id}\n\
         export AWS_SECRET_ACCESS_KEY={secret}\n\
         export AWS_DEFAULT_REGION={region}\n\
         export AWS_REGION={region}\n",
        id = key.access_key_id,
        secret = secret.as_str(),
    ));
    write_private(&data_dir.join("aws.env"), text.as_bytes())
}

fn print_quickstart(
    running: &server::Running,
    data_dir: &Path,
    settings: &Settings,
    store_id: &str,
) {
    let addr = running.addr;
    let metrics = running
        .admin_addr
        .map(|a| format!("curl -s http://{a}/metrics"))
        .unwrap_or_else(|| "off (admin.enabled = false)".into());
    let aws = running
        .aws_addr
        .map(|a| format!("http://{a} (SigV4 with the dev access key)"))
        .unwrap_or_else(|| "off".into());
    let console = match running.aws_addr {
        Some(a) if crate::api::console::BUILT => format!(
            "http://{a}/console/   (sign in with the dev access key: {dir}/aws-access-key-id and {dir}/aws-secret-access-key)",
            dir = data_dir.display()
        ),
        Some(a) => format!(
            "http://{a}/console/ is NOT BUILT into this binary: run scripts/setup.sh (Node.js, npm ci in console/), then build again"
        ),
        None => "off (no AWS protocol listener)".into(),
    };
    let xks = running
        .xks_addr
        .map(|a| {
            format!(
                "http://{a}/{XKS_PREFIX}/kms/xks/v1   (. {dir}/xks.env: its credential and key; docs/XKS.md)",
                dir = data_dir.display()
            )
        })
        .unwrap_or_else(|| "off".into());
    let cluster = &settings.clusters[0];
    let svc = "kms.v1.KeyManagementService";
    let conf = settings
        .hsm
        .softhsm2_conf
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "\
hsm-kms dev is ready. listening on {addr} (plaintext gRPC; dev mode only)
  NO AUTHENTICATION on gRPC: plaintext on loopback, every caller acts as {principal}
  AWS KMS protocol: {aws}
  console:          {console}
  XKS proxy API:    {xks}
  audit trail:      {audit}   (hsm-kms audit verify {audit})
  data directory:   {dir}
  config:           {dir}/hsm-kms.toml   (hsm-kms serve --config {dir}/hsm-kms.toml)
  custom key store: {STORE_NAME} ({store_id}), CONNECTED to {cluster_id} (token {label})
  metrics:          {metrics}
  inspect the token: SOFTHSM2_CONF={conf} pkcs11-tool --module {module} --token-label {label} --login --pin \"$(cat {dir}/kmsuser-password)\" --list-objects

Quickstart (grpcurl and jq):
  grpcurl -plaintext {addr} list
  grpcurl -plaintext -d '{{\"custom_key_store_name\":\"{STORE_NAME}\"}}' {addr} {svc}/DescribeCustomKeyStores
  KEY=$(grpcurl -plaintext -d '{{\"custom_key_store_id\":\"{store_id}\",\"origin\":\"AWS_CLOUDHSM\",\"description\":\"quickstart\"}}' {addr} {svc}/CreateKey | jq -r .keyMetadata.keyId)
  CT=$(grpcurl -plaintext -d \"{{\\\"key_id\\\":\\\"$KEY\\\",\\\"plaintext\\\":\\\"$(printf 'hello, HSM' | base64)\\\",\\\"encryption_context\\\":{{\\\"app\\\":\\\"quickstart\\\"}}}}\" {addr} {svc}/Encrypt | jq -r .ciphertextBlob)
  grpcurl -plaintext -d \"{{\\\"ciphertext_blob\\\":\\\"$CT\\\",\\\"encryption_context\\\":{{\\\"app\\\":\\\"quickstart\\\"}}}}\" {addr} {svc}/Decrypt | jq -r .plaintext | base64 -d; echo
  grpcurl -plaintext -d \"{{\\\"key_id\\\":\\\"$KEY\\\",\\\"key_spec\\\":\\\"AES_256\\\"}}\" {addr} {svc}/GenerateDataKey

Quickstart (aws CLI; keys go to the {STORE_NAME} store, kms.default_custom_key_store):
  . {dir}/aws.env
  KEY=$(aws kms create-key --description quickstart --query KeyMetadata.KeyId --output text)
  printf 'hello, HSM' > quickstart.txt
  aws kms encrypt --key-id \"$KEY\" --plaintext fileb://quickstart.txt --encryption-context app=quickstart --query CiphertextBlob --output text | base64 -d > quickstart.bin
  aws kms decrypt --ciphertext-blob fileb://quickstart.bin --encryption-context app=quickstart --query Plaintext --output text | base64 -d; echo
  aws kms generate-data-key --key-id \"$KEY\" --key-spec AES_256
",
        dir = data_dir.display(),
        cluster_id = cluster.id,
        label = cluster.token_label,
        module = cluster.module.display(),
        principal = settings.auth.plaintext_principal.clone().unwrap_or_else(|| format!(
            "arn:{}:iam::{}:root",
            settings.account.partition, settings.account.account_id
        )),
        audit = settings.audit.file.display(),
    );
    if running.xks_addr.is_some() {
        // How AWS KMS calls the XKS proxy API, with curl's SigV4 (7.75 or later).
        println!(
            "\n\
Quickstart (XKS proxy API, as AWS KMS calls it; curl 7.75+):
  . {dir}/xks.env
  X=(--aws-sigv4 \"aws:amz:$XKS_REGION:kms-xks-proxy\" --user \"$XKS_ACCESS_KEY_ID:$XKS_SECRET_ACCESS_KEY\" -H 'Content-Type: application/json')
  curl -s \"${{X[@]}}\" -d '{{\"requestMetadata\":{{\"kmsRequestId\":\"1\",\"kmsOperation\":\"KmsHealthCheck\"}}}}' http://$XKS_PROXY_HOST/$XKS_URI_PREFIX/kms/xks/v1/health; echo
  curl -s \"${{X[@]}}\" -d '{{\"requestMetadata\":{{\"awsPrincipalArn\":\"arn:aws:iam::111122223333:user/me\",\"kmsKeyArn\":\"k\",\"kmsOperation\":\"Encrypt\",\"kmsRequestId\":\"2\"}},\"plaintext\":\"aGk=\",\"encryptionAlgorithm\":\"AES_GCM\"}}' http://$XKS_PROXY_HOST/$XKS_URI_PREFIX/kms/xks/v1/keys/$XKS_KEY_ID/encrypt; echo",
            dir = data_dir.display()
        );
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}
