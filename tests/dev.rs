//! `hsm-kms dev`: one command to a working instance whose printed quickstart works exactly as
//! printed, that reuses its data directory, and whose config runs under `serve`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use hsm_kms::proto::key_management_service_client::KeyManagementServiceClient;
use hsm_kms::proto::*;

/// Every listener on a free port: tests run side by side.
const DEV_ARGS: &[&str] = &[
    "dev",
    "--listen",
    "127.0.0.1:0",
    "--aws-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
    "--xks-listen",
    "127.0.0.1:0",
    "--data-dir",
];

struct Dev {
    child: Child,
    banner: Vec<String>,
    addr: String,
}

/// Starts `hsm-kms dev` and reads its banner up to the last quickstart line.
fn start_dev(dir: &Path, log: &Path) -> Dev {
    start_dev_with(DEV_ARGS, dir, log)
}

fn start_dev_with(args: &[&str], dir: &Path, log: &Path) -> Dev {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
        .args(args)
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| {
                panic!(
                    "hsm-kms dev did not print its quickstart ({e}); its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        let last = line.contains("aws kms generate-data-key");
        banner.push(line);
        if last {
            break;
        }
    }
    let addr = banner[0]
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("address in the banner")
        .to_string();
    Dev {
        child,
        banner,
        addr,
    }
}

fn stop(mut d: Dev) {
    sigterm(&d.child);
    assert!(
        d.child.wait().unwrap().success(),
        "dev did not exit cleanly on SIGTERM"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is required for this test: run scripts/setup.sh");
}

#[tokio::test]
async fn dev_mode_end_to_end() {
    need("grpcurl");
    need("jq");
    need("pkcs11-tool");
    need("aws");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log = tmp.path().join("dev.log");
    let dev = start_dev(&dir, &log);

    for f in [
        "kmsuser-password",
        "so-pin",
        "sealing.key",
        "aws-secret-access-key",
        "aws.env",
    ] {
        assert_eq!(
            mode(&dir.join(f)),
            0o600,
            "{f} must be readable by its owner only"
        );
    }
    for f in [
        "hsm-kms.toml",
        "metadata.sqlite3",
        "trust-anchor.pem",
        "softhsm2.conf",
        "tokens",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let settings = hsm_kms::config::Settings::load(&dir.join("hsm-kms.toml")).unwrap();
    let cluster = &settings.clusters[0];
    let zones: std::collections::HashSet<_> = cluster
        .hsms
        .iter()
        .map(|h| h.availability_zone.clone())
        .collect();
    assert_eq!(
        (cluster.hsms.len(), zones.len()),
        (2, 2),
        "two HSMs in two zones"
    );

    // The quickstarts (grpcurl, then the aws CLI), run exactly as printed.
    let start = dev
        .banner
        .iter()
        .position(|l| l.starts_with("Quickstart"))
        .unwrap();
    let script: String = dev.banner[start..]
        .iter()
        .filter(|l| l.starts_with("  "))
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    assert!(script.contains("aws kms encrypt"), "{script}");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("kms.v1.KeyManagementService"), "{stdout}");
    assert!(stdout.contains("grpc.health.v1.Health"), "{stdout}");
    assert!(
        stdout.contains("\"connectionState\": \"CONNECTED\""),
        "{stdout}"
    );
    assert_eq!(stdout.matches("hello, HSM").count(), 2, "{stdout}");
    assert!(stdout.contains("\"KeyId\": \"arn:aws:kms:"), "{stdout}");
    // aws.env holds the secret, and nothing else printed or logged does.
    let secret = std::fs::read_to_string(dir.join("aws-secret-access-key")).unwrap();
    assert!(std::fs::read_to_string(dir.join("aws.env"))
        .unwrap()
        .contains(&format!("export AWS_SECRET_ACCESS_KEY={}", secret.trim())));
    assert!(!dev.banner.iter().any(|l| l.contains(secret.trim())));

    // The pkcs11-tool line shows the key objects labelled with their ARNs.
    let inspect = dev
        .banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("inspect the token: "))
        .unwrap();
    let out = Command::new("bash").args(["-c", inspect]).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listing.contains("label:      arn:aws:kms:"),
        "{listing}"
    );

    // A key and a ciphertext to carry across restarts.
    let mut c = KeyManagementServiceClient::connect(format!("http://{}", dev.addr))
        .await
        .unwrap();
    let store = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
            custom_key_store_name: Some("dev".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .custom_key_stores
        .remove(0);
    let key = create_key(&mut c, &store.custom_key_store_id).await;
    let ct = encrypt(&mut c, &key.key_id, b"carried over").await;
    drop(c);
    stop(dev);
    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(first_log.contains("initialised the dev token"));
    assert!(
        first_log.contains("closed HSM connection"),
        "shutdown must log out: {first_log}"
    );
    assert!(!first_log.contains(secret.trim()));
    assert!(
        !first_log.contains("kmsuser-Passw")
            && !first_log.contains(&std::fs::read_to_string(dir.join("kmsuser-password")).unwrap())
    );

    // Run again: same store, same token, the ciphertext still decrypts.
    let log2 = tmp.path().join("dev2.log");
    let dev = start_dev(&dir, &log2);
    assert!(dev
        .banner
        .iter()
        .any(|l| l.contains(&store.custom_key_store_id)));
    let mut c = KeyManagementServiceClient::connect(format!("http://{}", dev.addr))
        .await
        .unwrap();
    let out = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, b"carried over");
    drop(c);
    stop(dev);
    assert!(!std::fs::read_to_string(&log2)
        .unwrap()
        .contains("initialised the dev token"));

    // The generated config runs as is under `serve` (listen addresses overridden from the
    // environment, as any setting can be).
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
        .args(["serve", "--config"])
        .arg(dir.join("hsm-kms.toml"))
        .env("HSM_KMS__SERVER__LISTEN", "127.0.0.1:0")
        .env("HSM_KMS__ADMIN__LISTEN", "127.0.0.1:0")
        .env("HSM_KMS__SERVER__AWS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_for_line(&mut child, "hsm-kms listening on ", Duration::from_secs(60));
    let mut c = KeyManagementServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(
        wait_settled(&mut c, &store.custom_key_store_id).await,
        ("CONNECTED".into(), None)
    );
    let out = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, b"carried over");
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    // The metadata file is owner-only, as the other data files.
    assert_eq!(mode(&dir.join("metadata.sqlite3")), 0o600);

    // A copy of the data directory is refused, not run on the original's files.
    let copy = tmp.path().join("copy");
    assert!(Command::new("cp")
        .args(["-a"])
        .arg(&dir)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
        .args(DEV_ARGS)
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a copied data directory ran");
    assert!(said.contains("copied"), "{said}");
}

/// A second dev instance beside a first: a busy default port falls back to a free one that
/// the banner names, where the instance answers. Here the AWS protocol's default port is
/// held by this test (or by whoever already holds it).
#[tokio::test]
async fn a_busy_default_port_falls_back_to_a_free_one() {
    let _held = std::net::TcpListener::bind("127.0.0.1:50053");
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        // The XKS default (50054) is not this test's subject: a free port, so that the
        // other test's instance cannot meet it there.
        "--xks-listen",
        "127.0.0.1:0",
        "--data-dir",
    ];
    let dev = start_dev_with(&args, &tmp.path().join("data"), &tmp.path().join("dev.log"));
    let line = dev
        .banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("AWS KMS protocol: http://"))
        .expect("the banner names the AWS endpoint");
    let aws: std::net::SocketAddr = line.split_whitespace().next().unwrap().parse().unwrap();
    assert_ne!(aws.port(), 50053, "{line}");
    let env = std::fs::read_to_string(tmp.path().join("data/aws.env")).unwrap();
    assert!(
        env.contains(&format!("AWS_ENDPOINT_URL_KMS=http://{aws}")),
        "{env}"
    );
    // The generated config names the ports this instance bound, so that `serve --config`
    // runs it as is, where aws.env points.
    let config = hsm_kms::config::Settings::read(&tmp.path().join("data/hsm-kms.toml")).unwrap();
    assert_eq!(config.server.aws_listen, Some(aws));
    assert_ne!(config.server.listen.port(), 0);
    assert_ne!(config.admin.listen.port(), 0);
    // It answers there: an unsigned request gets AWS's refusal.
    let mut s = std::net::TcpStream::connect(aws).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: {aws}\r\nX-Amz-Target: TrentService.ListKeys\r\n\
         Content-Type: application/x-amz-json-1.1\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.contains("MissingAuthenticationTokenException"),
        "{answer}"
    );
    stop(dev);
}
