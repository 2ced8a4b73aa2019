//! The operator console in a real browser: Debian's Chromium, driven by playwright-core from
//! Node's test runner (console/test/console.test.mjs), against a real `hsm-kms dev` with two
//! more clusters (one whose token exists, one whose token does not) and a second access key
//! without permissions; then once against `hsm-kms serve` over TLS. The browser walks every
//! procedure of the console and the Node side checks each result through the AWS SDK.
//! Screenshots of each page go to target/console-screenshots (or $HSM_KMS_SCREENSHOTS).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hsm_kms::config::{AccessKeySettings, ClusterSettings, Settings};

const SECOND: &str = "cluster-consolesecond";
const ABSENT: &str = "cluster-consoleabsent";
const BOB_KEY_ID: &str = "AKIACONSOLEBOB234567";
const BOB_SECRET: &str = "consoleBobSecret0123456789abcdefghijklmnop";

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn screenshots() -> PathBuf {
    std::env::var_os("HSM_KMS_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots"))
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    // The check cannot run without a browser: that fails, it does not pass.
    assert!(
        path.exists(),
        "{} is missing: scripts/setup.sh installs Debian's chromium",
        path.display()
    );
    assert!(
        console_dir().join("node_modules/playwright-core").is_dir(),
        "console/node_modules is missing: run scripts/setup.sh (npm ci in console/)"
    );
    path
}

/// Runs the browser tests of `phase` with `env`; their output is shown on failure.
fn browser_tests(phase: &str, env: &HashMap<String, String>) {
    let mut env = env.clone();
    env.insert("CONSOLE_PHASE".into(), phase.into());
    env.insert("CHROMIUM".into(), chromium().display().to_string());
    env.insert("SCREENSHOT_DIR".into(), screenshots().display().to_string());
    let script = console_dir().join("test/console.test.mjs");
    let stdout = node_output(
        &console_dir(),
        &[
            "--test".as_ref(),
            "--test-reporter=spec".as_ref(),
            script.as_os_str(),
        ],
        &env,
        &format!("the console's browser tests ({phase})"),
    );
    // The tests ran (a runner that found nothing to run would pass).
    assert!(stdout.contains("ℹ fail 0"), "{stdout}");
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ℹ pass "))
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert!(passed.is_some_and(|n| n > 0), "no test passed: {stdout}");
}

#[test]
fn the_console_walks_every_procedure_in_a_real_browser() {
    chromium();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");

    // A first run makes the dev instance (token, store, config); then the config gets a
    // second cluster with a token, one whose token does not exist, and bob's access key.
    stop_cleanly(start_dev(&data), "hsm-kms dev");
    let config = data.join("hsm-kms.toml");
    let mut settings = Settings::read(&config).unwrap();
    let base = settings.clusters[0].clone();
    for (id, label) in [(SECOND, "console-second"), (ABSENT, "console-absent")] {
        settings.clusters.push(ClusterSettings {
            id: id.into(),
            token_label: label.into(),
            ..base.clone()
        });
    }
    init_token(&data.join("softhsm2.conf"), "console-second");
    let bob_secret = data.join("bob-secret");
    std::fs::write(&bob_secret, BOB_SECRET).unwrap();
    let account = settings.account.account_id.clone();
    let bob = format!("arn:aws:iam::{account}:user/console-bob");
    settings.auth.access_keys.push(AccessKeySettings {
        access_key_id: BOB_KEY_ID.into(),
        secret_file: Some(bob_secret),
        secret_env: None,
        principal: bob.clone(),
    });
    std::fs::write(&config, toml::to_string_pretty(&settings).unwrap()).unwrap();

    let dev = start_dev(&data);
    let mut env = dev_aws_env(&data);
    let endpoint = env["AWS_ENDPOINT_URL_KMS"].clone();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    env.insert("CONSOLE_URL".into(), format!("{endpoint}/console/"));
    env.insert("ROOT_ARN".into(), format!("arn:aws:iam::{account}:root"));
    env.insert("BOB_ACCESS_KEY_ID".into(), BOB_KEY_ID.into());
    env.insert("BOB_SECRET_ACCESS_KEY".into(), BOB_SECRET.into());
    env.insert("BOB_ARN".into(), bob);
    env.insert("SECOND_CLUSTER_ID".into(), SECOND.into());
    env.insert("ABSENT_CLUSTER_ID".into(), ABSENT.into());
    env.insert(
        "TRUST_ANCHOR_FILE".into(),
        base.trust_anchor_file.display().to_string(),
    );
    env.insert("SECOND_PASSWORD".into(), PASSWORD.into());
    browser_tests("dev", &env);
    stop_cleanly(dev, "hsm-kms dev");

    // What the console did is in the audit trail, as the principal who signed in.
    let trail = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for op in [
        "CreateCustomKeyStore",
        "ConnectCustomKeyStore",
        "UpdateCustomKeyStore",
        "DeleteCustomKeyStore",
        "CreateKey",
        "ScheduleKeyDeletion",
        "GetCallerIdentity",
    ] {
        assert!(
            trail
                .lines()
                .any(|l| l.contains(&format!("\"operation\":\"{op}\""))
                    && l.contains("\"outcome\":\"allowed\"")),
            "no allowed {op} in the trail"
        );
    }
    assert!(
        trail.lines().any(
            |l| l.contains("\"operation\":\"DescribeCustomKeyStoreHealth\"")
                && l.contains("console-bob")
                && l.contains("\"outcome\":\"denied\"")
        ),
        "bob's refused health view is not in the trail"
    );
}

/// Once over TLS under `serve` (the browser accepts the test CA's certificate): sign in,
/// the pages load, a key is created through the wizard, and the page's headers hold.
#[tokio::test(flavor = "multi_thread")]
async fn the_console_works_over_tls_under_serve() {
    chromium();
    let pki = Pki::new("hsm-kms console test CA");
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    let h = Harness::start_opts(&[ClusterSpec::good("cluster-consoletlsab")], options, |s| {
        use_tls(s, &pki);
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        add_access_keys(s);
    })
    .await;
    let ca = h.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let endpoint = format!("https://{}", h.aws.replace("127.0.0.1", "localhost"));
    let env: HashMap<String, String> = [
        ("CONSOLE_URL", format!("{endpoint}/console/")),
        ("AWS_ENDPOINT_URL_KMS", endpoint),
        ("AWS_ACCESS_KEY_ID", ROOT_KEY.0.to_string()),
        ("AWS_SECRET_ACCESS_KEY", ROOT_KEY.1.to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("ROOT_ARN", ROOT.to_string()),
        ("SECOND_CLUSTER_ID", "cluster-consoletlsab".to_string()),
        (
            "TRUST_ANCHOR_FILE",
            h.cluster(0).trust_anchor_file.display().to_string(),
        ),
        ("SECOND_PASSWORD", PASSWORD.to_string()),
        ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    tokio::task::spawn_blocking(move || browser_tests("tls", &env))
        .await
        .unwrap();
}

/// The console's TypeScript type-checks (esbuild, which bundles it, strips types unread).
#[test]
fn the_console_type_checks() {
    chromium();
    let out = Command::new("node")
        .arg(console_dir().join("node_modules/typescript/bin/tsc"))
        .args(["--noEmit", "-p"])
        .arg(console_dir())
        .output()
        .unwrap_or_else(|e| panic!("node is needed (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "tsc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
