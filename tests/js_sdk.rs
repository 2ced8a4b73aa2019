//! A second AWS SDK: the AWS SDK for JavaScript v3 (`@aws-sdk/client-kms`, tests/js) run
//! with Node against `hsm-kms dev`, as a Node application would use AWS KMS: key stores,
//! keys, aliases, tags, grants, cryptography and AWS's errors as the SDK's exception classes;
//! then, against the same instance under `serve` with a small quota, the SDK's retries of
//! ThrottlingException. scripts/setup.sh installs Node's packages (npm ci in tests/js).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Runs `node sdk.mjs <phase>` with the instance's variables; what it saw, as JSON.
fn node(phase: &str, env: &HashMap<String, String>) -> serde_json::Value {
    let script = js_dir().join("sdk.mjs");
    let stdout = node_output(
        &js_dir(),
        &[script.as_os_str(), phase.as_ref()],
        env,
        &format!("node sdk.mjs {phase}"),
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_javascript_sdk_works_against_hsm_kms() {
    // The check cannot run without the SDK: that fails, it does not pass.
    assert!(
        js_dir().join("node_modules/@aws-sdk/client-kms").is_dir(),
        "tests/js/node_modules is missing: run scripts/setup.sh (npm ci in tests/js)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let dev = start_dev(&data);
    let env = dev_aws_env(&data);
    assert!(env["AWS_ENDPOINT_URL_KMS"].starts_with("http://127.0.0.1:"));

    let seen = node("operations", &env);
    assert_eq!(seen["requests"], "ok", "{seen}");
    assert!(
        seen["rotation"]
            .as_str()
            .unwrap()
            .ends_with("origin is AWS_CLOUDHSM which is not valid for this operation."),
        "{seen}"
    );
    stop_cleanly(dev, "hsm-kms dev");

    // The same instance under `serve`, with a quota of 5 requests a second on its store.
    let config = data.join("hsm-kms.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let limited: String = text
        .lines()
        .map(|l| {
            if l.starts_with("store_requests_per_second") {
                "store_requests_per_second = 5".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(
        text, limited,
        "the dev config has no store_requests_per_second"
    );
    std::fs::write(&config, limited).unwrap();
    let mut served = Command::new(server_binary())
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_line(&mut served, "hsm-kms listening on", Duration::from_secs(60));
    let seen = node("throttling", &env);
    // The attack on the quota happened (40 at once), and the SDK rode it out by retrying.
    assert_eq!(seen["requests"], 40, "{seen}");
    assert!(seen["retried"].as_u64().unwrap() > 0, "{seen}");
    assert!(
        seen["succeeded_after_retry"].as_u64().unwrap() > 0,
        "{seen}"
    );
    stop_cleanly(served, "hsm-kms serve");
}
