//! `hsm-kms bench` runs end to end (a short run: the figures themselves are for
//! docs/BENCHMARKS.md, never asserted here).

use std::process::Command;

#[test]
fn bench_verb_produces_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
        .args([
            "bench",
            "--levels",
            "1,2",
            "--seconds",
            "0.3",
            "--keys",
            "3",
            "--keys-level",
            "2",
        ])
        .args(["--raw-sessions", "2", "--connections", "3", "--aws"])
        .args([
            "--session-pool-size",
            "3",
            "--server-worker-threads",
            "2",
            "--json",
        ])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("raw PKCS#11") && table.contains("service (gRPC)"),
        "{table}"
    );

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The started service's tuning is part of the record.
    assert_eq!(r["session_pool_size"], 3);
    assert_eq!(r["server_worker_threads"], 2);
    assert!(
        table.contains("hsm.session_pool_size 3, server.worker_threads 2"),
        "{table}"
    );
    let raw = r["raw"].as_array().unwrap();
    assert_eq!(
        raw.len(),
        5,
        "Encrypt and Decrypt, 1 and N sessions, then Encrypt on the service's many-key token"
    );
    assert!(raw.iter().all(|x| x["ops_per_sec"].as_f64().unwrap() > 0.0));
    let service = r["service"].as_array().unwrap();
    // 3 operations x 2 levels, Encrypt over the AWS protocol x 2 levels, then Encrypt over
    // 3 keys and over 1 key.
    assert_eq!(service.len(), 10);
    assert_eq!(service[2]["operation"], "Encrypt (AWS)");
    for x in service {
        assert_eq!(x["errors"], 0, "{x}");
        assert!(x["requests"].as_u64().unwrap() > 0, "{x}");
        assert!(x["server_rss_mib"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["p99_ms"].as_f64().unwrap() >= x["p50_ms"].as_f64().unwrap());
    }
    assert_eq!(service[8]["keys"], 3);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}
