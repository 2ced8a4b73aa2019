//! HSM faults, deadlines, throttling, the runtime HSM inventory, CloudHSM compatibility and
//! the metrics, through the fault-injecting PKCS#11 module (testing/faulty-pkcs11) that wraps
//! each test's own SoftHSM2 token.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hsm_kms::config::{GcmIvMode, PinFormat};
use hsm_kms::proto::*;

const A: &str = "cluster-faultsaaaaaa";
const B: &str = "cluster-faultsbbbbbb";
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// (plaintext, ciphertext) of every acknowledged Encrypt.
    acked: Vec<(Vec<u8>, Vec<u8>)>,
    /// Failed requests by exception name.
    errors: HashMap<String, usize>,
}

/// Concurrent Encrypt load over `keys` until `stop`.
fn spawn_load(
    c: &Client,
    keys: &[String],
    workers: usize,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (mut c, keys, stop, seen) = (c.clone(), keys.to_vec(), stop.clone(), seen.clone());
        set.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let pt = format!("worker {w} request {n}").into_bytes();
                let r = c
                    .encrypt(EncryptRequest {
                        key_id: keys[n % keys.len()].clone(),
                        plaintext: pt.clone(),
                        ..Default::default()
                    })
                    .await;
                {
                    let mut seen = seen.lock().unwrap();
                    match r {
                        Ok(r) => seen.acked.push((pt, r.into_inner().ciphertext_blob)),
                        Err(s) => *seen.errors.entry(aws_error(&s)).or_default() += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    set
}

/// `n` concurrent Encrypt calls of `key`; their outcomes.
async fn burst(
    c: &Client,
    key: &str,
    n: u8,
) -> Vec<Result<tonic::Response<EncryptResponse>, tonic::Status>> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (mut c, key) = (c.clone(), key.to_string());
        set.spawn(async move { try_encrypt(&mut c, &key, &[i; 8]).await });
    }
    set.join_all().await
}

/// Polls `check` every 50 ms until it holds; panics after `limit` naming `what`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn key_ids(c: &mut Client) -> Vec<String> {
    let mut ids: Vec<String> = c
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    ids.sort();
    ids
}

async fn decrypt(c: &mut Client, blob: &[u8]) -> Vec<u8> {
    c.decrypt(DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        ..Default::default()
    })
    .await
    .expect("Decrypt")
    .into_inner()
    .plaintext
}

/// A device-tier fault under load: requests fail fast with KMSInvalidStateException, the
/// store reports NOT_SERVING, then heals by itself once the token answers; nothing
/// acknowledged is lost and no key is lost or duplicated.
async fn survive(fault: &str) {
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "faults").await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        keys.push(create_key(&mut c, &store).await.key_id);
    }
    keys.sort();
    assert_eq!(h.health(&store).await, SERVING);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut load = spawn_load(&c, &keys, 8, &stop, &seen);
    let acked = || seen.lock().unwrap().acked.len();
    wait_for("traffic before the fault", Duration::from_secs(30), || {
        let n = acked();
        async move { n >= 50 }
    })
    .await;

    h.set_faults(&format!("fault = {fault}\n"));
    wait_for(
        "the store to report NOT_SERVING",
        Duration::from_secs(20),
        || {
            let h = &h;
            let store = &store;
            async move { h.health(store).await == NOT_SERVING }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let degraded =
        format!(r#"hsm_kms_store_state{{custom_key_store_id="{store}",state="DEGRADED"}}"#);
    assert_eq!(
        metric(&h.metrics(), &degraded),
        Some(1.0),
        "{fault}: DEGRADED in the metrics"
    );
    assert_eq!(
        describe_store(&mut c, &store).await.connection_state,
        "CONNECTED",
        "{fault}: the store stays CONNECTED while it heals"
    );
    // Management of the store's keys fails cleanly while its HSM is out.
    let r = try_create_key(&mut c, &store).await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    let failed_during = seen.lock().unwrap().errors.values().sum::<usize>();
    assert!(failed_during > 0, "requests during the fault must fail");

    h.set_faults("");
    wait_for("the store to heal", Duration::from_secs(30), || {
        let h = &h;
        let store = &store;
        async move { h.health(store).await == SERVING }
    })
    .await;
    let at_recovery = acked();
    wait_for("traffic after recovery", Duration::from_secs(30), || {
        let n = acked();
        async move { n >= at_recovery + 50 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let names: Vec<&String> = seen.errors.keys().collect();
    assert_eq!(
        names,
        vec!["KMSInvalidStateException"],
        "{fault}: every failure is KMSInvalidStateException"
    );
    for (pt, ct) in &seen.acked {
        assert_eq!(
            &decrypt(&mut c, ct).await,
            pt,
            "{fault}: an acknowledged ciphertext"
        );
    }
    assert_eq!(key_ids(&mut c).await, keys, "{fault}: no key lost or added");
    assert_eq!(
        h.token_secret_keys(0),
        2,
        "{fault}: one token object per key"
    );
    let m = h.metrics();
    let ok = metric(
        &m,
        &format!(r#"hsm_kms_reconnects_total{{custom_key_store_id="{store}",outcome="ok"}}"#),
    );
    assert_eq!(ok, Some(1.0), "{fault}: one successful reconnection\n{m}");
    let state =
        format!(r#"hsm_kms_store_state{{custom_key_store_id="{store}",state="CONNECTED"}}"#);
    assert_eq!(metric(&m, &state), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_error_fails_fast_and_heals() {
    survive("device_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_removed_fails_fast_and_heals() {
    survive("device_removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_not_present_fails_fast_and_heals() {
    survive("token_not_present").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_session_is_replaced_and_the_call_retried() {
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "sessions").await;
    let key = create_key(&mut c, &store).await.key_id;
    // Each new control text re-arms one failure: the caller never sees it.
    for round in 0..3u8 {
        h.set_faults(&format!(
            "fault = session_handle_invalid\nfunctions = C_Encrypt\ncount = 1\n# round {round}\n"
        ));
        let ct = encrypt(&mut c, &key, &[round; 16]).await;
        assert_eq!(decrypt(&mut c, &ct).await, vec![round; 16]);
    }
    let m = h.metrics();
    assert_eq!(
        metric(&m, "hsm_kms_session_replacements_total"),
        Some(3.0),
        "{m}"
    );
    // The retry happens once: a second failure in a row reaches the caller.
    h.set_faults("fault = session_handle_invalid\nfunctions = C_Encrypt\ncount = 2\n");
    let r = try_encrypt(&mut c, &key, b"twice").await;
    assert_err(r, "KMSInternalException");
    encrypt(&mut c, &key, b"fine again").await;
    assert_eq!(
        h.health(&store).await,
        SERVING,
        "a session error is not a device error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_hsm_gives_dependency_timeout_within_the_deadline() {
    // The harness sets hsm.call_timeout_ms = 2000 and 8 sessions.
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "hangs").await;
    let key = create_key(&mut c, &store).await.key_id;
    h.set_faults("delay_ms = 15000\ndelay_functions = C_Encrypt\n");

    let started = Instant::now();
    let r = try_encrypt(&mut c, &key, b"stalled").await;
    let took = started.elapsed();
    assert_err(r, "DependencyTimeoutException");
    // What ended the call: the 2 s deadline, not the HSM, which stalls 15 s (a causal
    // check with a wide margin, not a speed one).
    eprintln!("a call to the stalled HSM answered in {took:?}");
    assert!(
        took < Duration::from_secs(12),
        "the deadline, not the stalled HSM, must end the call (took {took:?})"
    );

    // Twice as many requests as sessions: none hangs; the ones still queued at their
    // deadline are dropped without reaching the HSM.
    for r in burst(&c, &key, 16).await {
        assert_err(r, "DependencyTimeoutException");
    }

    h.set_faults("");
    wait_for("Encrypt to work again", Duration::from_secs(30), || {
        let (mut c, key) = (c.clone(), key.clone());
        async move { try_encrypt(&mut c, &key, b"again").await.is_ok() }
    })
    .await;
    // Every stalled call came back and its session is idle again: nothing leaked.
    let busy = format!(r#"hsm_kms_session_pool_in_use{{custom_key_store_id="{store}"}}"#);
    wait_for("idle sessions", Duration::from_secs(20), || {
        let v = metric(&h.metrics(), &busy);
        async move { v == Some(0.0) }
    })
    .await;
    let m = h.metrics();
    let calls = metric(
        &m,
        r#"hsm_kms_hsm_call_duration_seconds_count{function="C_Encrypt"}"#,
    )
    .unwrap();
    let ok = metric(
        &m,
        r#"hsm_kms_request_duration_seconds_count{operation="Encrypt",outcome="ok"}"#,
    )
    .unwrap();
    // The single call, at most one per session of the 16, and the successful ones after.
    assert!(
        calls <= 1.0 + 8.0 + ok,
        "queued calls past their deadline reached the HSM: {calls} calls, {ok} ok\n{m}"
    );
    assert_eq!(
        h.health(&store).await,
        SERVING,
        "slowness is not a device failure"
    );
    disconnect(&mut c, &store).await;
    assert_eq!(
        describe_store(&mut c, &store).await.connection_state,
        "DISCONNECTED"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_quota_throttles_without_hsm_work() {
    let h = Harness::start_with(&[ClusterSpec::good(A)], |s| {
        s.throttling.store_requests_per_second = 20;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "quota").await;
    let key = create_key(&mut c, &store).await.key_id;

    let (mut ok, mut throttled) = (0.0, 0.0);
    let started = Instant::now();
    let answers = burst(&c, &key, 100).await;
    let took = started.elapsed().as_secs_f64();
    for r in answers {
        match r {
            Ok(_) => ok += 1.0,
            Err(s) => {
                assert_eq!(aws_error(&s), "ThrottlingException", "{s:?}");
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                throttled += 1.0;
            }
        }
    }
    // A full bucket admits one second's worth (20), and refills at 20 a second while the
    // burst lasts: admitted = 20 + 20 x its duration, give or take one token.
    let most = 20.0 + 20.0 * took + 1.0;
    eprintln!(
        "100 requests in {took:.3} s: {ok} admitted (at most {most:.1}), {throttled} throttled"
    );
    assert!(ok >= 20.0, "a full bucket admits one second's worth: {ok}");
    assert!(
        ok <= most,
        "{ok} admitted in {took:.3} s; the quota allows {most:.1}"
    );
    assert_eq!(ok + throttled, 100.0);

    let m = h.metrics();
    let hsm_calls = metric(
        &m,
        r#"hsm_kms_hsm_call_duration_seconds_count{function="C_Encrypt"}"#,
    );
    assert_eq!(hsm_calls, Some(ok), "refused requests did HSM work\n{m}");
    let counted = format!(r#"hsm_kms_throttled_requests_total{{custom_key_store_id="{store}"}}"#);
    assert_eq!(metric(&m, &counted), Some(throttled), "{m}");
    let by_outcome = |outcome: &str| {
        metric(
            &m,
            &format!(
                r#"hsm_kms_request_duration_seconds_count{{operation="Encrypt",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(by_outcome("ok"), Some(ok));
    assert_eq!(by_outcome("ThrottlingException"), Some(throttled));
    let pool = format!(r#"hsm_kms_session_pool_size{{custom_key_store_id="{store}"}}"#);
    assert_eq!(metric(&m, &pool), Some(8.0), "{m}");
    assert!(m.contains("hsm_kms_orphaned_key_material_total 0"), "{m}");

    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    encrypt(&mut c, &key, b"after a pause").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hsm_inventory_reloads_at_run_time() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "inventory").await;
    let key = create_key(&mut c, &store).await.key_id;
    let ct = encrypt(&mut c, &key, b"inventory").await;
    let try_encrypt = |c: &Client| {
        let (mut c, key) = (c.clone(), key.clone());
        async move { try_encrypt(&mut c, &key, b"x").await }
    };

    // No active HSM: cryptographic operations stop and say why.
    h.reload_with(|s| {
        for hsm in &mut s.clusters[0].hsms {
            hsm.state = HsmState::Deleted;
        }
    });
    wait_for("the reload to apply", Duration::from_secs(10), || {
        let f = try_encrypt(&c);
        async move { f.await.is_err() }
    })
    .await;
    let msg = assert_err(try_encrypt(&c).await, "KMSInvalidStateException");
    assert!(msg.contains("no active HSM"), "{msg}");
    let r = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct.clone(),
            ..Default::default()
        })
        .await;
    assert_err(r, "KMSInvalidStateException");

    // One active HSM: crypto works, but creating keys and stores needs two zones.
    h.reload_with(|s| s.clusters[0].hsms[0].state = HsmState::Active);
    wait_for("the reload to apply", Duration::from_secs(10), || {
        let f = try_encrypt(&c);
        async move { f.await.is_ok() }
    })
    .await;
    assert_eq!(decrypt(&mut c, &ct).await, b"inventory");
    let r = try_create_key(&mut c, &store).await;
    assert_err(r, "CloudHsmClusterInvalidConfigurationException");
    let r = c
        .create_custom_key_store(CreateCustomKeyStoreRequest {
            custom_key_store_name: "second".into(),
            cloud_hsm_cluster_id: Some(A.into()),
            trust_anchor_certificate: Some(h.anchors[0].clone()),
            key_store_password: Some(PASSWORD.into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CloudHsmClusterInvalidConfigurationException");

    // A broken file changes nothing.
    std::fs::write(h.config_path(), "clusters = [ not toml").unwrap();
    h.sighup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        try_encrypt(&c).await.is_ok(),
        "a bad reload must keep the running inventory"
    );

    h.reload_with(|s| s.clusters[0].hsms[1].state = HsmState::Active);
    wait_for("two zones again", Duration::from_secs(10), || {
        let (mut c, store) = (c.clone(), store.clone());
        async move { try_create_key(&mut c, &store).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudhsm_mode_hsm_chosen_ivs_and_user_password_pins() {
    let cloudhsm = ClusterSpec {
        gcm_iv: GcmIvMode::Hsm,
        pin_format: PinFormat::UserPassword,
        ..ClusterSpec::faulty(A)
    };
    let service_iv = ClusterSpec {
        pin_format: PinFormat::UserPassword,
        ..ClusterSpec::faulty(B)
    };
    let h = Harness::start(&[cloudhsm, service_iv]).await;
    // The module now behaves as CloudHSM's: `kmsuser:<password>` PINs, HSM-chosen IVs.
    h.set_faults("gcm_iv = hsm\npin_format = user:password\n");
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "cloudhsm").await;
    let key = create_key(&mut c, &store).await.key_id;

    let one = encrypt(&mut c, &key, b"same plaintext").await;
    let two = encrypt(&mut c, &key, b"same plaintext").await;
    let iv = |ct: &[u8]| ct[17..29].to_vec();
    assert_ne!(iv(&one), vec![0u8; 12], "the HSM wrote its IV back");
    assert_ne!(iv(&one), iv(&two), "each encryption gets its own IV");
    assert_eq!(decrypt(&mut c, &one).await, b"same plaintext");
    assert_eq!(decrypt(&mut c, &two).await, b"same plaintext");
    let dk = c
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.clone(),
            key_spec: Some("AES_256".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decrypt(&mut c, &dk.ciphertext_blob).await, dk.plaintext);

    // A cluster left in service-IV mode against such an HSM fails loudly, never silently.
    let other = h.connected_store(&mut c, 1, "service-iv").await;
    let other_key = create_key(&mut c, &other).await.key_id;
    let r = try_encrypt(&mut c, &other_key, b"refused").await;
    assert_err(r, "KMSInternalException");

    // Ciphertexts made with HSM-chosen IVs decrypt whatever the IV mode of the day, and the
    // service-IV cluster works once the HSM takes caller IVs.
    h.set_faults("pin_format = user:password\n");
    assert_eq!(decrypt(&mut c, &one).await, b"same plaintext");
    let ct = encrypt(&mut c, &other_key, b"service iv").await;
    assert_eq!(decrypt(&mut c, &ct).await, b"service iv");
    let r = c
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: ct,
            destination_key_id: key.clone(),
            ..Default::default()
        })
        .await;
    // The destination is in HSM-IV mode but the HSM now refuses to choose: no zero IV
    // ever leaves the service.
    assert_err(r, "KMSInternalException");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_creation_past_its_deadline_leaves_nothing_behind() {
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "slow-create").await;
    let kept = create_key(&mut c, &store).await.key_id;
    // The HSM makes the key, but only after the 2 s deadline.
    h.set_faults("delay_ms = 4000\ndelay_functions = C_GenerateKey\n");
    assert_err(
        try_create_key(&mut c, &store).await,
        "DependencyTimeoutException",
    );
    h.set_faults("");
    assert_eq!(
        key_ids(&mut c).await,
        vec![kept.clone()],
        "no half-made key is listed"
    );
    let generated = r#"hsm_kms_hsm_call_duration_seconds_count{function="C_GenerateKey"}"#;
    wait_for(
        "the late C_GenerateKey to return",
        Duration::from_secs(20),
        || {
            let v = metric(&h.metrics(), generated);
            async move { v == Some(2.0) }
        },
    )
    .await;
    // The periodic sweep destroys the late object and the row with it.
    wait_for("the sweep", Duration::from_secs(30), || {
        let n = h.token_secret_keys(0);
        async move { n == 1 }
    })
    .await;
    assert_eq!(key_ids(&mut c).await, vec![kept.clone()]);
    encrypt(&mut c, &kept, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_degraded_store_can_be_disconnected_and_connected_again() {
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "give-up").await;
    let key = create_key(&mut c, &store).await.key_id;
    h.set_faults("fault = device_removed\n");
    assert_err(
        try_encrypt(&mut c, &key, b"x").await,
        "KMSInvalidStateException",
    );
    // The operator gives up on the HSM: the recovery stops with the connection.
    disconnect(&mut c, &store).await;
    assert_eq!(
        describe_store(&mut c, &store).await.connection_state,
        "DISCONNECTED"
    );
    assert_eq!(h.health(&store).await, NOT_SERVING);
    let msg = assert_err(
        try_encrypt(&mut c, &key, b"x").await,
        "KMSInvalidStateException",
    );
    assert!(msg.ends_with(" is unavailable."), "{msg}");
    // While the device is still gone, connecting fails with a connection error code.
    assert_eq!(
        connect(&mut c, &store).await,
        ("FAILED".into(), Some("NETWORK_ERRORS".into()))
    );
    assert_eq!(h.health(&store).await, NOT_SERVING);
    disconnect(&mut c, &store).await;
    h.set_faults("");
    assert_eq!(connect(&mut c, &store).await, ("CONNECTED".into(), None));
    assert_eq!(h.health(&store).await, SERVING);
    let ct = encrypt(&mut c, &key, b"back").await;
    assert_eq!(decrypt(&mut c, &ct).await, b"back");
    let m = h.metrics();
    let ok = format!(r#"hsm_kms_reconnects_total{{custom_key_store_id="{store}",outcome="ok"}}"#);
    // The series exists from the start, at zero: no automatic reconnection was made.
    assert_eq!(
        metric(&m, &ok),
        Some(0.0),
        "no automatic reconnection after the disconnect\n{m}"
    );
}

/// The PKCS#11 calls each cryptographic operation makes, as the module counts them: one
/// C_Encrypt or C_Decrypt each (on a network HSM every call is a round trip), and data keys
/// that do not each cost a C_GenerateRandom.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hsm_round_trip_per_cryptographic_operation() {
    let h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let counts_file = h.fault_control().with_file_name("pkcs11-counts");
    h.set_faults(&format!("counts_file = {}\n", counts_file.display()));
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "counted").await;
    let key = create_key(&mut c, &store).await.key_id;
    let counts = || -> HashMap<String, u64> {
        std::fs::read_to_string(&counts_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(f, n)| (f.to_string(), n.parse().unwrap()))
            .collect()
    };
    // (C_xxxInit, C_xxx) calls between two readings.
    let calls = |before: &HashMap<String, u64>, init: &str, call: &str| {
        let after = counts();
        let delta = |f: &str| after.get(f).unwrap_or(&0) - before.get(f).unwrap_or(&0);
        (delta(init), delta(call))
    };

    let before = counts();
    let ct = encrypt(&mut c, &key, b"counted").await;
    assert_eq!(
        calls(&before, "C_EncryptInit", "C_Encrypt"),
        (1, 1),
        "Encrypt"
    );

    let before = counts();
    assert_eq!(decrypt(&mut c, &ct).await, b"counted");
    assert_eq!(
        calls(&before, "C_DecryptInit", "C_Decrypt"),
        (1, 1),
        "Decrypt"
    );

    // GenerateDataKey: one C_Encrypt each; the data keys' bytes come from the token in
    // blocks, so 10 of them take at most one C_GenerateRandom.
    let before = counts();
    for _ in 0..10 {
        c.generate_data_key(GenerateDataKeyRequest {
            key_id: key.clone(),
            key_spec: Some("AES_256".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        calls(&before, "C_EncryptInit", "C_Encrypt"),
        (10, 10),
        "GenerateDataKey"
    );
    let (_, random) = calls(&before, "C_EncryptInit", "C_GenerateRandom");
    assert!(random <= 1, "{random} C_GenerateRandom for 10 data keys");
}

/// A pool too small for the load is reported with the size it needs: a modelled 2 ms HSM,
/// 2 sessions, 16 callers. By Little's law the load keeps about 16 operations waiting or
/// running, so the service should name a pool of about 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queueing_for_sessions_is_reported_with_the_pool_it_needs() {
    let options = Options {
        env: vec![("FAULTY_PKCS11_LATENCY_US", "2000".into())],
        ..Default::default()
    };
    let h = Harness::start_opts(&[ClusterSpec::faulty(A)], options, |s| {
        s.hsm.session_pool_size = 2;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "small-pool").await;
    let key = create_key(&mut c, &store).await.key_id;
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (mut c, key, stop) = (c.clone(), key.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    encrypt(&mut c, &key, b"queued").await;
                }
            })
        })
        .collect();
    // The report covers 10 s windows and is made by an operation ending after one.
    wait_for("the queueing report", Duration::from_secs(30), || async {
        h.log().contains("queueing for PKCS#11 sessions")
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let log = h.log();
    let line = log
        .lines()
        .find(|l| l.contains("queueing for PKCS#11 sessions"))
        .unwrap();
    let needed: usize = line
        .split("sessions_needed=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sessions_needed in {line}"));
    assert!((12..=20).contains(&needed), "{line}");
    assert!(line.contains("sessions=2"), "{line}");
    let sample = format!(r#"hsm_kms_session_pool_needed{{custom_key_store_id="{store}"}}"#);
    assert_eq!(metric(&h.metrics(), &sample), Some(needed as f64));
}

/// A key's token object found twice (SoftHSM2 2.6.1 did so after a reconnect): looked up
/// again, a little later, before the key is given up; what stays ambiguous is counted and
/// makes the replica unready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_found_twice_is_looked_up_again_and_shows() {
    let mut h = Harness::start(&[ClusterSpec::faulty(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "lookups").await;
    let first = create_key(&mut c, &store).await.key_id;
    let second = create_key(&mut c, &store).await.key_id;
    // A new process has no handle cached: each key's first use searches the token.
    assert!(h.stop());
    h.relaunch().await;
    let mut c = h.client().await;
    wait_for(
        "the store to be served again",
        Duration::from_secs(30),
        || {
            let h = &h;
            let store = store.clone();
            async move { h.health(&store).await == SERVING }
        },
    )
    .await;
    // Two searches in a row see the object twice; the third sees it once.
    h.set_faults("duplicate_objects = 2\n");
    encrypt(&mut c, &first, b"third time").await;
    let lookups = |reason: &str| {
        metric(
            &h.metrics(),
            &format!("hsm_kms_key_lookup_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(lookups("ambiguous"), Some(0.0));
    assert_eq!(h.admin_get("/readyz").0, 200);
    // Every search sees it twice: given up (retryable), counted, and the replica unready.
    h.set_faults("duplicate_objects = 1000\n");
    let r = try_encrypt(&mut c, &second, b"never").await;
    assert_err(r, "KMSInternalException");
    assert_eq!(lookups("ambiguous"), Some(1.0));
    let (status, why) = h.admin_get("/readyz");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("more than once"), "{why}");
    // Once the token answers sensibly, the key works again.
    h.set_faults("");
    encrypt(&mut c, &second, b"again").await;
}

/// A supervisor may signal a process the moment it announces its listeners. SIGHUP then
/// reloads and SIGTERM stops cleanly; neither may fall to the signal's default action
/// (which kills the process). Before the handlers were installed eagerly, CI saw a restart
/// right after start exit uncleanly.
#[tokio::test]
async fn signals_right_after_start_are_handled() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    for round in 0..8 {
        if round > 0 {
            h.relaunch().await;
        }
        // The attack: the signals land as early as a client can know the server is up.
        h.sighup();
        assert!(
            h.stop(),
            "round {round}: not a clean exit after SIGHUP and SIGTERM"
        );
    }
    assert!(
        !h.log().contains("panicked"),
        "a panic in the server log:\n{}",
        h.log()
    );
}
