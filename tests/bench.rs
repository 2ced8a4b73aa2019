//! `hsm-kms bench` runs end to end (a short run: the figures themselves are for
//! docs/BENCHMARKS.md, never asserted here).

use std::process::Command;

/// Runs `hsm-kms` with the arguments `args` gives it and `--json` into `dir`: its table and
/// its JSON report, after checking that it succeeded.
fn bench(dir: &tempfile::TempDir, args: impl FnOnce(&mut Command)) -> (String, serde_json::Value) {
    let json = dir.path().join("bench.json");
    let mut c = Command::new(env!("CARGO_BIN_EXE_hsm-kms"));
    args(&mut c);
    let out = c
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), report)
}

#[test]
fn bench_verb_produces_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bench.svg");
    let (table, r) = bench(&dir, |c| {
        c.args([
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
        .args(["--session-pool-size", "3", "--server-worker-threads", "2"])
        .arg("--svg")
        .arg(&svg);
    });
    assert!(
        table.contains("raw PKCS#11") && table.contains("service (gRPC)"),
        "{table}"
    );

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
    // 3 operations x 2 levels, Encrypt over the AWS protocol and over the XKS proxy API x 2
    // levels each, then Encrypt over 3 keys and over 1 key.
    assert_eq!(service.len(), 12);
    assert_eq!(service[2]["operation"], "Encrypt (AWS)");
    assert_eq!(service[4]["operation"], "Encrypt (XKS)");
    for x in service {
        assert_eq!(x["errors"], 0, "{x}");
        assert!(x["requests"].as_u64().unwrap() > 0, "{x}");
        assert!(x["server_rss_mib"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["p99_ms"].as_f64().unwrap() >= x["p50_ms"].as_f64().unwrap());
    }
    assert_eq!(service[10]["keys"], 3);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

/// `bench --h2load` drives Encrypt and its two floors (Encrypt with DryRun, the health check)
/// with h2load, and reports each one's CPU per request and the bound they give.
#[test]
fn bench_h2load_reports_cpu_per_request_and_the_floors() {
    let dir = tempfile::tempdir().unwrap();
    let (table, r) = bench(&dir, |c| {
        c.args(["bench", "--h2load", "--levels", "4", "--seconds", "1"])
            .args(["--session-pool-size", "2"]);
    });
    assert!(table.contains("CPU per request"), "{table}");
    let service = r["service"].as_array().unwrap();
    let names: Vec<&str> = service
        .iter()
        .map(|x| x["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Encrypt (h2load)", "Encrypt DryRun", "Health/Check"]
    );
    for x in service {
        // Answered as the drive expects: allowed, DryRunOperationException, SERVING. h2load
        // may cut the last few requests off when its time is up (SerializationException).
        let (requests, errors) = (
            x["requests"].as_u64().unwrap(),
            x["errors"].as_u64().unwrap(),
        );
        assert!(requests > errors && errors <= 8, "{x}");
        assert!(x["ops_per_sec"].as_f64().unwrap() > 0.0, "{x}");
    }
    let cpu = r["cpu"].as_array().unwrap();
    assert_eq!(cpu.len(), 3);
    for x in cpu {
        assert!(x["service_us"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["load_generator_us"].as_f64().unwrap() > 0.0, "{x}");
    }
    // Only Encrypt has a bound, and no Encrypt can beat it.
    let bound = cpu[0]["bound_ops_per_sec"].as_f64().unwrap();
    assert!(bound > 0.0 && cpu[1].get("bound_ops_per_sec").is_none());
    // How the floors compare is a measurement, reported by the bench, not asserted here.
    eprintln!("CPU per request: {cpu:?}");
}
