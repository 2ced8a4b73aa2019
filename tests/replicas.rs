//! Several replicas on one PostgreSQL database (a throwaway server per test process), each
//! with its own PKCS#11 login to the same token: what one replica changes, the others'
//! next requests see.

mod common;

use std::time::Duration;

use common::*;
use hsm_kms::proto::*;

/// Waits until `c` can encrypt under `key`: a replica that just started logs in to the
/// token by itself, and SoftHSM2 shows a key made by another process a moment late. The
/// deadline only catches a hang (on a loaded CI machine, logins and a balancer's health
/// checks take seconds); the last refusal is in the message.
async fn usable(c: &mut Client, key: &str) {
    let mut last = None;
    for _ in 0..300 {
        match try_encrypt(c, key, b"probe").await {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the key never became usable through this replica: last answer {last:?}");
}

/// How many times the faulty module has seen `function` called, from its counts file.
fn pkcs11_calls(counts_file: &std::path::Path, function: &str) -> u64 {
    std::fs::read_to_string(counts_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .find(|(f, _)| *f == function)
        .map_or(0, |(_, n)| n.trim().parse().unwrap())
}

/// A replica whose PKCS#11 calls go through the faulty module with a control file of its
/// own, which also counts its calls.
struct Controlled {
    replica: Replica,
    ctl: std::path::PathBuf,
    counts: std::path::PathBuf,
}

impl Controlled {
    /// Starts replica `name` of `h`, with no faults.
    fn start(h: &Harness, name: &str) -> Controlled {
        let ctl = h.dir.path().join(format!("{name}-faults.ctl"));
        let counts = h.dir.path().join(format!("{name}-pkcs11-counts"));
        std::fs::write(&ctl, format!("counts_file = {}\n", counts.display())).unwrap();
        let replica = h.replica_with(name, |_| {}, &[("FAULTY_PKCS11_CONTROL", &ctl)]);
        Controlled {
            replica,
            ctl,
            counts,
        }
    }

    /// Replaces its faults with `faults` (the module's control syntax), still counting.
    fn set_faults(&self, faults: &str) {
        let counts = format!("counts_file = {}\n", self.counts.display());
        std::fs::write(&self.ctl, counts + faults).unwrap();
    }

    /// Waits up to 10 s for its module to count `function` (a name, or "<name> returned").
    async fn wait_for(&self, function: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pkcs11_calls(&self.counts, function) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no {function} counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Whether `check` holds within 10 seconds (polled every 100 ms).
async fn eventually<F, Fut>(check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The next Encrypt through `c` is refused with `error`: a change that takes access away is
/// in force on every replica of this build once it is acknowledged.
async fn refused_at_once(c: &mut Client, key: &str, error: &str) {
    match try_encrypt(c, key, b"x").await {
        Err(e) => assert_eq!(aws_error(&e), error, "{e:?}"),
        Ok(_) => panic!("served right after the change that forbids it was acknowledged"),
    }
}

/// Encrypts through `c` until it is refused with `error` (an older replica acknowledges
/// without waiting for the others); the deadline only catches a change never seen.
async fn refused_eventually(c: &mut Client, key: &str, error: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_encrypt(c, key, b"x").await {
            Err(e) if aws_error(&e) == error => return,
            Err(e) => panic!("{e:?}"),
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "still served 10 s after the change"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_is_seen_by_the_next_request_to_another() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicaaaaaa")], |s| {
        use_database(s, database);
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "shared").await;
    let key = create_key(&mut a, &store).await;

    assert_eq!(h.admin_get("/healthz").0, 200);
    assert_eq!(h.admin_get("/readyz"), (200, "ready\n".into()));

    let b = h.replica("b");
    let mut bc = b.client().await;
    // The store is CONNECTED for both, and B knows the key A made.
    assert_eq!(
        describe_store(&mut bc, &store).await.connection_state,
        "CONNECTED"
    );
    usable(&mut bc, &key.key_id).await;
    let ct = encrypt(&mut a, &key.key_id, b"made by a").await;
    let out = bc
        .decrypt(DecryptRequest {
            ciphertext_blob: ct,
            ..Default::default()
        })
        .await
        .expect("B decrypts what A encrypted")
        .into_inner();
    assert_eq!(out.plaintext, b"made by a");
    // Key usage is shared: B's Decrypt is the key's last use for A too, once B has written
    // it (every second).
    let last_use = |c: &Client| {
        let (mut c, key_id) = (c.clone(), key.key_id.clone());
        async move {
            c.get_key_last_usage(GetKeyLastUsageRequest { key_id })
                .await
                .ok()
                .and_then(|r| r.into_inner().key_last_usage)
                .and_then(|u| u.operation)
        }
    };
    assert!(
        eventually(|| async { last_use(&a).await.as_deref() == Some("Decrypt") }).await,
        "A does not see B's use: {:?}",
        last_use(&a).await
    );

    // Disabled through B: A refuses the next request (the answer waits until every live
    // replica has the change in force).
    bc.disable_key(DisableKeyRequest {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    refused_at_once(&mut a, &key.key_id, "DisabledException").await;

    // Aliases, tags and names are one namespace: taken through A, refused through B.
    a.create_alias(CreateAliasRequest {
        alias_name: "alias/shared".into(),
        target_key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    let e = bc
        .create_alias(CreateAliasRequest {
            alias_name: "alias/shared".into(),
            target_key_id: key.key_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(aws_error(&e), "AlreadyExistsException", "{e:?}");

    // Disconnected through B: A logs out by itself (its health follows within seconds), and
    // connected again through B, A logs in again without a request of its own.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    disconnect(&mut bc, &store).await;
    refused_at_once(&mut a, &key.key_id, "KMSInvalidStateException").await;
    assert_eq!(
        describe_store(&mut a, &store).await.connection_state,
        "DISCONNECTED"
    );
    assert!(
        eventually(|| async { h.health(&store).await != serving }).await,
        "A stayed logged in"
    );
    assert_eq!(connect(&mut bc, &store).await, ("CONNECTED".into(), None));
    assert!(
        eventually(|| async { h.health(&store).await == serving }).await,
        "A did not log in"
    );

    // Each replica writes its own audit trail.
    assert!(b.stop(), "replica B did not exit cleanly");
    let b_trail = std::fs::read_to_string(h.dir.path().join("b-audit.jsonl")).unwrap();
    assert!(b_trail.contains("\"operation\":\"DisableKey\""));
    let a_trail = std::fs::read_to_string(&h.settings.audit.file).unwrap();
    assert!(!a_trail.contains("\"operation\":\"DisableKey\""));
}

/// Each replica's chain names it, and its head is recorded in the database every few
/// seconds: lines cut off the end of any replica's trail show in `audit verify --config`,
/// after a clean stop and after a crash alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_at_the_end_of_any_replicas_trail_shows() {
    let database = postgres_database().await;
    let mut h = Harness::start_with(&[ClusterSpec::good("cluster-replicaheads")], |s| {
        use_database(s, database);
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "heads").await;
    let key = create_key(&mut a, &store).await.key_id;
    let b = h.replica("b");
    let mut bc = b.client().await;
    usable(&mut bc, &key).await;
    for _ in 0..3 {
        encrypt(&mut bc, &key, b"b").await;
        encrypt(&mut a, &key, b"a").await;
    }
    let b_audit = b.audit.clone();
    assert!(b.stop(), "replica B did not exit cleanly");
    // A crashes a while after its last request: its head was recorded by then.
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.kill();
    let a_audit = h.settings.audit.file.clone();
    let (a_config, b_config) = (h.config_path(), h.dir.path().join("b.toml"));
    for (config, file, name) in [(&a_config, &a_audit, "main"), (&b_config, &b_audit, "b")] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.lines()
                .all(|l| l.contains(&format!("\"replica\":\"{name}\""))),
            "{text}"
        );
        let (ok, said) = audit_verify(Some(config), &[]);
        assert!(
            ok && said.contains(&format!("replica {name}, the head")),
            "{said}"
        );
        cut_last_lines(file, 1);
        let (ok, said) = audit_verify(Some(config), &[]);
        assert!(
            !ok && said.contains(&format!("replica {name}'s chain")) && said.contains("cut off"),
            "{said}"
        );
    }
    // One replica's file is not taken for another's.
    let (ok, said) = audit_verify(Some(&b_config), std::slice::from_ref(&a_audit));
    assert!(!ok && said.contains("names replica main, not b"), "{said}");
}

/// What the sweepers of `three_sweepers_one_frozen_past_its_lease` remove.
#[derive(Clone, Copy, PartialEq)]
enum Removal {
    /// Keys whose scheduled deletion is due.
    Due,
    /// Keys whose creation was cut short: rows still `Creating`, with their material made.
    Abandoned,
}

/// 300 keys fall due before three sweeping replicas; one is frozen (SIGSTOP) in the middle
/// of a destroy, holding its claim, until its lease has run out. The others take its key
/// over, and when it wakes it does not destroy it again: the faulty module, one count file
/// per process, sees exactly one C_DestroyObject per key, and the token ends with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sweepers_one_frozen_past_its_lease_destroy_each_key_once() {
    three_sweepers_one_frozen_past_its_lease(Removal::Due).await;
}

/// The same for 300 half-made keys (CreateKey cut short after the token made the key, as
/// by a replica's crash): every replica's sweep finds them, and each key's material is
/// still destroyed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sweepers_one_frozen_past_its_lease_remove_each_half_made_key_once() {
    three_sweepers_one_frozen_past_its_lease(Removal::Abandoned).await;
}

async fn three_sweepers_one_frozen_past_its_lease(removal: Removal) {
    const KEYS: usize = 300;
    let database = postgres_database().await;
    let url = database.url.clone();
    let h = Harness::start_with(&[ClusterSpec::faulty("cluster-replicasweep")], |s| {
        use_database(s, database);
        // The sweepers do the work, not the server that makes the keys.
        s.lifecycle.deletion_check_interval_seconds = 86_400;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "sweep").await;
    let mut keys = Vec::new();
    for _ in 0..KEYS {
        keys.push(create_key(&mut c, &store).await.key_id);
    }
    let db = database_client(&url).await;
    // The sweepers live 8 days ahead: a key scheduled for 7 days is due for them at once
    // (and never for the first server, which schedules), and every Creating row is old.
    let files = |name: &str| {
        let ctl = h.dir.path().join(format!("{name}-faults.ctl"));
        let counts = h.dir.path().join(format!("{name}-pkcs11-counts"));
        std::fs::write(&ctl, format!("counts_file = {}\n", counts.display())).unwrap();
        (ctl, counts)
    };
    let sweepers: Vec<_> = ["s1", "s2", "frozen"]
        .into_iter()
        .map(|name| {
            let (ctl, counts) = files(name);
            let replica = h.replica_with(
                name,
                |s| {
                    s.lifecycle.clock_offset_seconds = 8 * 86_400;
                    s.lifecycle.deletion_check_interval_seconds = 1;
                },
                &[("FAULTY_PKCS11_CONTROL", &ctl)],
            );
            (replica, ctl, counts)
        })
        .collect();
    // The one to freeze finds objects slowly, so that it is caught mid-destroy.
    let (frozen, frozen_ctl, frozen_counts) = &sweepers[2];
    std::fs::write(
        frozen_ctl,
        format!(
            "counts_file = {}\ndelay_ms = 1000\ndelay_functions = C_FindObjectsInit\n",
            frozen_counts.display()
        ),
    )
    .unwrap();
    let calls = pkcs11_calls;
    let finds_before = calls(frozen_counts, "C_FindObjectsInit");
    match removal {
        Removal::Due => {
            for key in &keys {
                c.schedule_key_deletion(ScheduleKeyDeletionRequest {
                    key_id: key.clone(),
                    pending_window_in_days: Some(7),
                })
                .await
                .unwrap();
            }
        }
        Removal::Abandoned => {
            // What CreateKeys leave when their replica dies after C_GenerateKey.
            let n = db
                .execute("UPDATE keys SET key_state = 'Creating'", &[])
                .await
                .unwrap();
            assert_eq!(n, KEYS as u64);
        }
    }
    // Freeze it as soon as it is inside a destroy (the count comes before the delay).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while calls(frozen_counts, "C_FindObjectsInit") == finds_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper never began a destroy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = frozen.pid() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Its lease is 30 s (max(30 s, 4 x the HSM call deadline)); thaw it well after.
    tokio::time::sleep(Duration::from_secs(36)).await;
    let rows = || async {
        db.query_one("SELECT COUNT(*) FROM keys", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut left = i64::MAX;
    for _ in 0..100 {
        left = rows().await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(left, 0, "keys left after the others took over");
    // Let the thawed one finish what it was doing, and sweep again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let destroys: Vec<u64> = sweepers
        .iter()
        .map(|(_, _, counts)| calls(counts, "C_DestroyObject"))
        .collect();
    eprintln!("C_DestroyObject per sweeper (s1, s2, frozen): {destroys:?}");
    assert_eq!(destroys.iter().sum::<u64>(), KEYS as u64, "{destroys:?}");
    assert!(
        destroys[0] > 0 && destroys[1] > 0,
        "a sweeper did no work: {destroys:?}"
    );
    assert_eq!(h.token_secret_keys(0), 0, "key material left on the token");
    for (r, _, _) in sweepers {
        assert!(r.stop(), "a sweeper did not exit cleanly");
    }
}

/// A replica killed (SIGKILL) while its CreateKey waits on the HSM: once before the token
/// made the key, once after it made it but before the answer came. Neither CreateKey was
/// acknowledged, neither key is ever visible, and once any CreateKey could still be working
/// on them (twice the HSM call deadline) a replica's sweep removes both rows and destroys
/// the material made: the token and the database end with the acknowledged keys.
///
/// The sweep is a replica started after the kills. A SoftHSM2 2.6.1 process that was
/// already running has, once in CI, failed to find the object another process had made
/// (the sweep then removed the row and left the material); a process started later reads
/// the token afresh (see `Harness::replica_with` for how such a process loses sight of new
/// objects). A network HSM shows every client the same objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_create_key_leaves_no_key_and_no_material() {
    let database = postgres_database().await;
    let url = database.url.clone();
    let h = Harness::start_with(&[ClusterSpec::faulty("cluster-replicakilled")], |s| {
        use_database(s, database);
        s.hsm.call_timeout_ms = 1_000;
        // Only the sweeper started below sweeps (each process sweeps once as it starts).
        s.lifecycle.deletion_check_interval_seconds = 86_400;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "killed").await;
    for _ in 0..3 {
        create_key(&mut c, &store).await;
    }
    for (name, after) in [("before", false), ("after", true)] {
        let b = Controlled::start(&h, name);
        let mut bc = b.replica.client().await;
        // B logs in by itself on its first request.
        assert_eq!(
            describe_store(&mut bc, &store).await.connection_state,
            "CONNECTED"
        );
        b.set_faults(&format!(
            "delay_ms = 30000\ndelay_functions = C_GenerateKey\ndelay_after = {after}\n"
        ));
        let creating = {
            let (mut bc, store) = (bc.clone(), store.clone());
            tokio::spawn(async move { try_create_key(&mut bc, &store).await })
        };
        b.wait_for("C_GenerateKey").await;
        // When the stall comes after the real call, kill only once that call has returned
        // (a fixed pause was too short on a loaded machine, and the key's object file
        // appears before the token has written the key into it).
        if after {
            b.wait_for("C_GenerateKey returned").await;
        }
        let b = b.replica;
        assert_eq!(
            unsafe { libc::kill(b.pid() as libc::pid_t, libc::SIGKILL) },
            0
        );
        assert!(
            creating.await.unwrap().is_err(),
            "a CreateKey was acknowledged"
        );
        drop(b);
    }
    let db = database_client(&url).await;
    let rows = || async {
        db.query_one("SELECT COUNT(*) FROM keys", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // The killed CreateKeys' rows wait, invisible, for the sweep; the second one's
    // material was made.
    assert!(
        rows().await > 3,
        "the half-made rows are gone before the sweep"
    );
    assert_eq!(
        h.token_secret_keys(0),
        4,
        "the material made before the kill"
    );
    let listed = c
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 3, "a half-made key is visible");
    let sweeper = h.replica_with(
        "sweeper",
        |s| s.lifecycle.deletion_check_interval_seconds = 1,
        &[],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rows().await != 3 || h.token_secret_keys(0) != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "rows {}, token keys {}",
            rows().await,
            h.token_secret_keys(0)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(sweeper.stop(), "the sweeper did not exit cleanly");
}

/// A replica that recovers from an HSM device error sweeps only half-made keys older than
/// the creation cutoff: another replica's CreateKey, waiting on the HSM at that moment,
/// finishes, and its key works everywhere. (Recovery used to remove every `Creating` row of
/// the store, other replicas' creations in flight included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_recovering_from_a_device_error_leaves_another_replicas_create_key_alone() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::faulty("cluster-replicarecover")], |s| {
        use_database(s, database);
        s.hsm.call_timeout_ms = 5_000;
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "recover").await;
    let key = create_key(&mut a, &store).await.key_id;
    let b = Controlled::start(&h, "b");
    let mut bc = b.replica.client().await;
    // B's C_GenerateKey stalls 3 s, well within its 5 s deadline.
    b.set_faults("delay_ms = 3000\ndelay_functions = C_GenerateKey\n");
    let creating = {
        let (mut bc, store) = (bc.clone(), store.clone());
        tokio::spawn(async move { try_create_key(&mut bc, &store).await })
    };
    b.wait_for("C_GenerateKey").await;
    // A meets a device error, and logs in again while B's CreateKey waits on the HSM.
    h.set_faults("fault = device_error\nfunctions = C_Encrypt\ncount = 1\n");
    assert!(try_encrypt(&mut a, &key, b"x").await.is_err());
    h.set_faults("");
    assert!(
        eventually(|| {
            let mut a = a.clone();
            let key = key.clone();
            async move { try_encrypt(&mut a, &key, b"x").await.is_ok() }
        })
        .await,
        "A did not recover"
    );
    let made = creating
        .await
        .unwrap()
        .expect("B's CreateKey failed: A's recovery removed it")
        .into_inner()
        .key_metadata
        .unwrap()
        .key_id;
    for c in [&mut a, &mut bc] {
        encrypt(c, &made, b"made while A recovered").await;
    }
}

/// A replica killed in the middle of ConnectCustomKeyStore leaves the store CONNECTING. The
/// surviving replica leaves that alone while it could still be a live connect (twice the
/// login and call deadlines), then finishes it: the store ends CONNECTED, served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_left_by_a_dead_replica_is_finished_by_another() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::faulty("cluster-replicaorphan")], |s| {
        use_database(s, database);
        s.hsm.login_timeout_ms = 1_000;
        s.hsm.call_timeout_ms = 1_000;
    })
    .await;
    let mut a = h.client().await;
    let store = h.create_store(&mut a, 0, "orphaned", PASSWORD).await;
    let ctl = h.dir.path().join("b-faults.ctl");
    std::fs::write(&ctl, "delay_ms = 30000\ndelay_functions = C_Login\n").unwrap();
    let b = h.replica_with("b", |_| {}, &[("FAULTY_PKCS11_CONTROL", &ctl)]);
    let mut bc = b.client().await;
    bc.connect_custom_key_store(ConnectCustomKeyStoreRequest {
        custom_key_store_id: store.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        unsafe { libc::kill(b.pid() as libc::pid_t, libc::SIGKILL) },
        0
    );
    drop(b);
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        describe_store(&mut a, &store).await.connection_state,
        "CONNECTING",
        "a connect that could still be live was taken over"
    );
    let (state, _) = wait_settled(&mut a, &store).await;
    let mut waited = killed.elapsed();
    while describe_store(&mut a, &store).await.connection_state != "CONNECTED" {
        assert!(
            waited < Duration::from_secs(30),
            "still {state} after {waited:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        waited = killed.elapsed();
    }
    eprintln!("the abandoned connect was finished {waited:?} after the kill");
    let key = create_key(&mut a, &store).await;
    encrypt(&mut a, &key.key_id, b"after the takeover").await;
}

/// A connection to the database at `url` on which a trigger of the test's own records
/// every key state change the database makes, with its key (in `test_transitions`).
async fn record_transitions(url: &str) -> tokio_postgres::Client {
    let db = database_client(url).await;
    db.batch_execute(
        "CREATE TABLE test_transitions (old TEXT, new TEXT, key_id TEXT);
         CREATE FUNCTION test_record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO test_transitions VALUES (OLD.key_state, NEW.key_state, NEW.id);
             RETURN NULL;
         END $$;
         CREATE TRIGGER test_record AFTER UPDATE OF key_state ON keys FOR EACH ROW
             WHEN (OLD.key_state IS DISTINCT FROM NEW.key_state)
             EXECUTE FUNCTION test_record();",
    )
    .await
    .unwrap();
    db
}

/// A connection of the test's own to the database at `url`.
async fn database_client(url: &str) -> tokio_postgres::Client {
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    db
}

/// Asserts that every recorded state change is one AWS's key state machine allows;
/// returns them as (old, new, how many).
async fn only_allowed_transitions(db: &tokio_postgres::Client) -> Vec<(String, String, i64)> {
    let seen: Vec<(String, String, i64)> = db
        .query(
            "SELECT old, new, COUNT(*) FROM test_transitions GROUP BY old, new ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let allowed = [
        ("Creating", "Enabled"),
        // A sweep claims a half-made key.
        ("Creating", "Deleting"),
        ("Enabled", "Disabled"),
        ("Disabled", "Enabled"),
        ("Enabled", "PendingDeletion"),
        ("Disabled", "PendingDeletion"),
        ("PendingDeletion", "Disabled"),
    ];
    for (old, new, n) in &seen {
        assert!(
            allowed.contains(&(old.as_str(), new.as_str())),
            "{n} forbidden transitions {old} -> {new}"
        );
    }
    seen
}

/// Enable, Disable, ScheduleKeyDeletion and CancelKeyDeletion race on a few keys through
/// three replicas. A trigger of the test's own records every key state change the database
/// makes; each must be one the AWS state machine allows (the issue measured 494 forbidden
/// ones, e.g. PendingDeletion -> Enabled, with read-then-write changes). Afterwards every
/// replica describes every key as the database holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_state_changes_through_three_replicas_make_no_forbidden_transition() {
    let database = postgres_database().await;
    let url = database.url.clone();
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicaraces")], |s| {
        use_database(s, database);
    })
    .await;
    let db = record_transitions(&url).await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "races").await;
    let mut keys = Vec::new();
    for _ in 0..6 {
        keys.push(create_key(&mut a, &store).await.key_id);
    }
    let (b, c) = (h.replica("b"), h.replica("c"));
    let clients = vec![a.clone(), b.client().await, c.client().await];
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..9u64 {
        let (mut client, keys) = (clients[(w % 3) as usize].clone(), keys.clone());
        tasks.spawn(async move {
            let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let (mut acked, mut refused, mut other) = (0u32, 0u32, Vec::new());
            for _ in 0..120 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key_id = keys[(x % keys.len() as u64) as usize].clone();
                let answer = match (x >> 8) % 4 {
                    0 => client
                        .enable_key(EnableKeyRequest { key_id })
                        .await
                        .map(drop),
                    1 => client
                        .disable_key(DisableKeyRequest { key_id })
                        .await
                        .map(drop),
                    2 => client
                        .schedule_key_deletion(ScheduleKeyDeletionRequest {
                            key_id,
                            pending_window_in_days: Some(7),
                        })
                        .await
                        .map(drop),
                    _ => client
                        .cancel_key_deletion(CancelKeyDeletionRequest { key_id })
                        .await
                        .map(drop),
                };
                match answer {
                    Ok(()) => acked += 1,
                    // The key was in a state the change does not start from: the only
                    // refusal a race between allowed changes may give.
                    Err(e) if aws_error(&e) == "KMSInvalidStateException" => refused += 1,
                    Err(e) => other.push(format!("{}: {}", aws_error(&e), e.message())),
                }
            }
            (acked, refused, other)
        });
    }
    let (mut acked, mut refused, mut other) = (0, 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (a, r, o) = r.unwrap();
        acked += a;
        refused += r;
        other.extend(o);
    }
    assert!(other.is_empty(), "answers no race explains: {other:?}");
    assert_eq!(acked + refused, 1080);
    let seen = only_allowed_transitions(&db).await;
    eprintln!("{acked} of 1080 changes acknowledged; transitions: {seen:?}");
    assert!(
        seen.iter().filter(|(o, _, _)| o != "Creating").count() >= 4,
        "too few kinds of change to tell: {seen:?}"
    );
    // Every replica comes to agree with the database (the deadline only catches a replica
    // that never does).
    for key in &keys {
        let state: String = db
            .query_one("SELECT key_state FROM keys WHERE id = $1", &[key])
            .await
            .unwrap()
            .get(0);
        for client in &clients {
            let mut described = String::new();
            for _ in 0..100 {
                described = describe_key(&mut client.clone(), key).await.key_state;
                if described == state {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(described, state, "{key}");
        }
    }
    drop((b, c));
}

/// A rolling upgrade: replicas of the build under test (`HSM_KMS_TEST_BINARY` names an
/// older one; unset, the same build) and of this build serve side by side. The newer one
/// migrates the schema while the older runs; each sees the other's changes, the older one's
/// writes reaching the newer one's cache through the database's triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_and_a_newer_replica_serve_side_by_side() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicaupgrade")], |s| {
        use_database(s, database);
    })
    .await;
    let mut old = h.client().await;
    let store = h.connected_store(&mut old, 0, "upgrade").await;
    let key = create_key(&mut old, &store).await.key_id;
    let this_build = std::path::PathBuf::from(env!("CARGO_BIN_EXE_hsm-kms"));
    let new = h.replica_of(&this_build, "new");
    let mut nc = new.client().await;
    usable(&mut nc, &key).await;
    let made_by_new = create_key(&mut nc, &store).await.key_id;
    usable(&mut old, &made_by_new).await;
    let ct = encrypt(&mut old, &key, b"old to new").await;
    let out = nc
        .decrypt(DecryptRequest {
            ciphertext_blob: ct,
            ..Default::default()
        })
        .await
        .expect("the newer replica decrypts what the older encrypted")
        .into_inner();
    assert_eq!(out.plaintext, b"old to new");
    old.disable_key(DisableKeyRequest {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    refused_eventually(&mut nc, &key, "DisabledException").await;
    nc.enable_key(EnableKeyRequest {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    encrypt(&mut old, &key, b"enabled by the new one").await;
    assert!(new.stop(), "the newer replica did not stop cleanly");
}

/// The sealing key is the service's, not a replica's: a replica with another key refuses to
/// start and says why, and with a database no replica makes up a key of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_sealing_key_refuses_to_start() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicaseala")], |s| {
        use_database(s, database);
    })
    .await;
    let other = h.dir.path().join("other.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&other)
            .unwrap();
        std::io::Write::write_all(&mut f, &[0x5a; 32]).unwrap();
    }
    let (mut command, _) = h.replica_command("wrong-key", |s| {
        s.security.sealing_key_file = other.clone();
    });
    let out = command.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a replica with another sealing key started"
    );
    assert!(
        said.contains("not the key this metadata database"),
        "{said}"
    );

    let missing = h.dir.path().join("missing.key");
    let (mut command, _) = h.replica_command("no-key", |s| {
        s.security.sealing_key_file = missing.clone();
    });
    let out = command.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a replica made up its own sealing key"
    );
    assert!(said.contains("never created"), "{said}");
    assert!(!missing.exists());
}

/// The per-store quota is the service's: two replicas each enforce half of it (counted from
/// their heartbeats), so a burst spread over both cannot pass the rate plus what refills
/// while it runs. Each replica alone would admit a full bucket, twice the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_quota_holds_for_the_whole_service() {
    const RATE: u32 = 100;
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicaquota")], |s| {
        use_database(s, database);
        s.throttling.store_requests_per_second = RATE;
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "quota").await;
    let key = create_key(&mut a, &store).await;
    let b = h.replica("b");
    let mut bc = b.client().await;
    usable(&mut bc, &key.key_id).await;
    // Two heartbeats (one every 2 s) so that each replica counts the other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Let both buckets fill again after the set-up's requests.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for client in [a.clone(), bc.clone()] {
        for _ in 0..4 {
            let (mut c, key) = (client.clone(), key.key_id.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut throttled) = (0u32, 0u32);
                for _ in 0..50 {
                    match try_encrypt(&mut c, &key, b"burst").await {
                        Ok(_) => ok += 1,
                        Err(e) if aws_error(&e) == "ThrottlingException" => throttled += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
                (ok, throttled)
            }));
        }
    }
    let (mut ok, mut throttled) = (0u32, 0u32);
    for t in tasks {
        let (o, th) = t.await.unwrap();
        ok += o;
        throttled += th;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bound = f64::from(RATE) * (1.0 + elapsed) + 2.0;
    assert!(
        f64::from(ok) <= bound,
        "{ok} requests admitted in {elapsed:.2} s by two replicas; the service's quota \
         allows at most {bound:.0}"
    );
    assert!(throttled > 0, "a 400-request burst was never throttled");
    drop(b);
}

/// SIGTERM with server.drain_seconds: /readyz turns 503 at once, requests are still served
/// while load balancers notice, then the process stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_unready_and_keeps_serving_while_draining() {
    // A drain long enough that the checks below always fall within it.
    let mut h = Harness::start_with(&[ClusterSpec::good("cluster-replicadrain")], |s| {
        s.server.drain_seconds = 10;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "drain").await;
    let key = create_key(&mut c, &store).await;
    assert_eq!(h.admin_get("/readyz").0, 200);
    let started = std::time::Instant::now();
    nix_sigterm(h.pid());
    assert!(
        eventually(|| async { h.admin_get("/readyz").0 == 503 }).await,
        "/readyz stayed 200 after SIGTERM"
    );
    assert_eq!(h.admin_get("/readyz").1, "shutting down\n");
    // Still within the drain (10 s): the same connection is served.
    encrypt(&mut c, &key.key_id, b"during the drain").await;
    eprintln!("served {:?} after SIGTERM", started.elapsed());
    assert!(h.stop(), "hsm-kms did not exit cleanly after draining");
}

/// A rolling restart of two replicas under load from clients that retry a failed request
/// once on the other replica, as a client behind a load balancer does: every request
/// succeeds. Each replica is stopped with SIGTERM (drain, then close) and started again on
/// the same address, with its audit chain continuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_retried_request() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicarolling")], |s| {
        use_database(s, database);
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "rolling").await;
    let key = create_key(&mut c, &store).await.key_id;
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        })
        .collect();
    let start = |i: usize| {
        let listen = ports[i].parse().unwrap();
        h.replica_with(
            ["b", "c"][i],
            |s| {
                s.server.listen = listen;
                s.server.drain_seconds = 1;
            },
            &[],
        )
    };
    let mut replicas = vec![start(0), start(1)];
    for r in &replicas {
        usable(&mut r.client().await, &key).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (ports, key, stop) = (ports.clone(), key.clone(), stop.clone());
        load.spawn(async move {
            let clients: Vec<Client> = ports
                .iter()
                .map(|p| {
                    let ch = tonic::transport::Endpoint::from_shared(format!("http://{p}"))
                        .unwrap()
                        .connect_lazy();
                    Client::new(ch)
                })
                .collect();
            let (mut ok, mut failed, mut retried) = (0u64, Vec::new(), 0u64);
            let mut i = w % 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = try_encrypt(&mut clients[i].clone(), &key, b"rolling").await;
                let outcome = match first {
                    Ok(_) => Ok(()),
                    Err(_) => {
                        retried += 1;
                        let other = &mut clients[1 - i].clone();
                        try_encrypt(other, &key, b"rolling").await.map(drop)
                    }
                };
                match outcome {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                }
                i = 1 - i;
            }
            (ok, failed, retried)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..2 {
        let old = replicas.remove(0);
        assert!(old.stop(), "a replica did not stop cleanly");
        replicas.push(start(i));
        usable(&mut replicas[1].client().await, &key).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut retried) = (0, Vec::new(), 0);
    while let Some(r) = load.join_next().await {
        let (o, f, t) = r.unwrap();
        ok += o;
        failed.extend(f);
        retried += t;
    }
    eprintln!(
        "rolling restart: {ok} requests served, {retried} retried once, {} failed",
        failed.len()
    );
    assert!(ok > 100, "too little load to tell: {ok}");
    assert!(failed.is_empty(), "{failed:?}");
    for r in replicas {
        let audit = r.audit.clone();
        assert!(r.stop());
        let config = h.dir.path().join(format!(
            "{}.toml",
            audit
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches("-audit.jsonl")
        ));
        let (ok, said) = audit_verify(Some(&config), &[]);
        assert!(ok, "{said}");
    }
}

fn nix_sigterm(pid: u32) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Connect through two replicas at once, with kmsuser password rotation on: the store's
/// CONNECTING transition is a conditional update only one wins, so one replica rotates the
/// password and the other uses the new one; the initial password no longer works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_rotate_the_password_once() {
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicarotat")], |s| {
        use_database(s, database);
        s.security.rotate_kmsuser_password = true;
    })
    .await;
    let mut a = h.client().await;
    let store = h.create_store(&mut a, 0, "rotating", PASSWORD).await;
    let b = h.replica("b");
    let mut bc = b.client().await;
    let (ra, rb) = tokio::join!(
        a.connect_custom_key_store(ConnectCustomKeyStoreRequest {
            custom_key_store_id: store.clone(),
        }),
        bc.connect_custom_key_store(ConnectCustomKeyStoreRequest {
            custom_key_store_id: store.clone(),
        })
    );
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        wait_settled(&mut a, &store).await,
        ("CONNECTED".into(), None)
    );
    assert!(!h.pin_works(0, PASSWORD), "the password was not rotated");
    let key = create_key(&mut a, &store).await;
    usable(&mut a, &key.key_id).await;
    usable(&mut bc, &key.key_id).await;
}

/// Key states, as a bit set, for the history checker.
const ENABLED: u8 = 1;
const DISABLED: u8 = 2;
const PENDING: u8 = 4;

fn state_bit(name: &str) -> u8 {
    match name {
        "Enabled" => ENABLED,
        "Disabled" => DISABLED,
        "PendingDeletion" => PENDING,
        other => panic!("a key in state {other}"),
    }
}

/// What a call's answer says about the change it asked for.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    /// Acknowledged: made.
    Made,
    /// Refused as the key's state demands (KMSInvalidStateException): not made.
    Refused,
    /// The database or the connection failed under it: made or not.
    Unknown,
}

fn outcome<T>(answer: &Result<tonic::Response<T>, tonic::Status>) -> Outcome {
    let Err(e) = answer else {
        return Outcome::Made;
    };
    match aws_error(e).as_str() {
        "KMSInvalidStateException" => Outcome::Refused,
        "KMSInternalException" | "DependencyTimeoutException" => Outcome::Unknown,
        // No AWS exception at all: the connection failed.
        reason
            if reason.starts_with("no ErrorInfo")
                && matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
        {
            Outcome::Unknown
        }
        _ => panic!("an answer no restart explains: {e:?}"),
    }
}

/// One client's key and what its acknowledged history says the key must be now. Only
/// its owner changes it, one call at a time (through any replica), so the possible states
/// follow from the answers alone.
struct Owned {
    id: String,
    /// The states the key may be in (bits above).
    possible: u8,
    /// Tags acknowledged, and tags asked for without a definite answer.
    tags_made: Vec<String>,
    tags_unknown: Vec<String>,
    /// (plaintext, ciphertext) of every acknowledged Encrypt.
    sealed: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Owned {
    /// Follows a call allowed in the states `from` that changes no state.
    fn allowed_in(&mut self, from: u8, outcome: Outcome, what: &str) {
        self.follow(from, self.possible & from, outcome, what);
    }

    /// Follows a change allowed from the states `from` that leaves the key in `to`.
    fn follow(&mut self, from: u8, to: u8, outcome: Outcome, what: &str) {
        let could = self.possible & from != 0;
        match outcome {
            Outcome::Made => {
                assert!(
                    could,
                    "{what} acknowledged on {} in {:b}",
                    self.id, self.possible
                );
                self.possible = to;
            }
            Outcome::Refused => {
                assert!(
                    self.possible & !from != 0,
                    "{what} refused on {} in {:b}",
                    self.id,
                    self.possible
                );
                self.possible &= !from;
            }
            Outcome::Unknown => {
                if could {
                    self.possible |= to;
                }
            }
        }
    }
}

/// One client's keys, shared with the checker, which reads them while clients are paused.
type Ledger = std::sync::Arc<std::sync::Mutex<Vec<Owned>>>;

/// Compares every client's history with the database: each acknowledged key exists, in a
/// state its history allows, with every acknowledged tag and no tag never asked for.
/// Returns the database's keys and their states.
async fn check_history(
    db: &tokio_postgres::Client,
    ledgers: &[Ledger],
    when: &str,
) -> std::collections::BTreeMap<String, String> {
    let rows: std::collections::BTreeMap<String, String> = db
        .query("SELECT id, key_state FROM keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut tags: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in db
        .query("SELECT key_id, tag_key FROM key_tags", &[])
        .await
        .unwrap()
    {
        tags.entry(r.get(0)).or_default().push(r.get(1));
    }
    for ledger in ledgers {
        for key in ledger.lock().unwrap().iter() {
            let state = rows
                .get(&key.id)
                .unwrap_or_else(|| panic!("{when}: acknowledged key {} is gone", key.id));
            assert!(
                key.possible & state_bit(state) != 0,
                "{when}: {} is {state}; its history allows only {:03b}",
                key.id,
                key.possible
            );
            let on_key = tags.get(&key.id).cloned().unwrap_or_default();
            for tag in &key.tags_made {
                assert!(
                    on_key.contains(tag),
                    "{when}: acknowledged tag {tag} on {} is gone",
                    key.id
                );
            }
            for tag in &on_key {
                assert!(
                    key.tags_made.contains(tag) || key.tags_unknown.contains(tag),
                    "{when}: tag {tag} on {} was never asked for",
                    key.id
                );
            }
        }
    }
    rows
}

/// The history check of the issue: three replicas on one token and clients spread across
/// them make keys, change their states, tag them and encrypt under them, while the
/// database is restarted with `pg_ctl restart -m fast`, then `-m immediate`. Every answer
/// is recorded. Right after each restart (clients paused, so that no later change hides a
/// lost one) and at the end, the checker compares that history with the database; at the
/// end also with DescribeKey through every replica, with decryption of every acknowledged
/// ciphertext and with the token's objects: no acknowledged key, state change, tag or
/// ciphertext is lost, no state change the AWS state machine forbids was made, no key
/// material is orphaned, and no key was destroyed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_change_is_lost_across_database_restarts() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    const WORKERS: usize = 6;
    let server = testing::postgres::Server::start_own()
        .expect("PostgreSQL for the replica tests (scripts/setup.sh installs it)");
    let database = database_on(&server).await;
    let url = database.url.clone();
    let mut h = Harness::start_with(&[ClusterSpec::faulty("cluster-replicahistory")], |s| {
        use_database(s, database);
        // Creations cut short are swept 3 s after they began (twice this, and a second).
        s.hsm.call_timeout_ms = 1_000;
        s.lifecycle.deletion_check_interval_seconds = 1;
    })
    .await;
    record_transitions(&url).await;
    // Each replica counts its PKCS#11 calls in a file of its own.
    let counts: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| h.dir.path().join(format!("{n}-pkcs11-counts")))
        .collect();
    h.set_faults(&format!("counts_file = {}\n", counts[0].display()));
    let controls: Vec<_> = ["b", "c"]
        .iter()
        .zip(&counts[1..])
        .map(|(n, c)| {
            let ctl = h.dir.path().join(format!("{n}-faults.ctl"));
            std::fs::write(&ctl, format!("counts_file = {}\n", c.display())).unwrap();
            ctl
        })
        .collect();
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "history").await;
    // All three sweep half-made keys, each every second.
    let b = h.replica_with("b", |_| {}, &[("FAULTY_PKCS11_CONTROL", &controls[0])]);
    let c = h.replica_with("c", |_| {}, &[("FAULTY_PKCS11_CONTROL", &controls[1])]);
    let clients = vec![a.clone(), b.client().await, c.client().await];
    for client in &clients {
        assert_eq!(
            describe_store(&mut client.clone(), &store)
                .await
                .connection_state,
            "CONNECTED"
        );
    }
    let calls = |function: &str| -> u64 { counts.iter().map(|p| pkcs11_calls(p, function)).sum() };
    let token_before = h.token_secret_keys(0);
    let (generated_before, destroyed_before) = (calls("C_GenerateKey"), calls("C_DestroyObject"));

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    // Clients hold it to read for each call; the checker takes it to pause them.
    let pause = Arc::new(tokio::sync::RwLock::new(()));
    let ledgers: Vec<Ledger> = (0..WORKERS).map(|_| Ledger::default()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, ledger) in ledgers.iter().enumerate() {
        let (clients, store, stop, acked, pause, ledger) = (
            clients.clone(),
            store.clone(),
            stop.clone(),
            acked.clone(),
            pause.clone(),
            ledger.clone(),
        );
        tasks.spawn(async move {
            let mut tally = [0u64; 3];
            let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut n = 0usize;
            while !stop.load(Relaxed) {
                let _running = pause.read().await;
                n += 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Each call through the next replica: a key's history crosses all three.
                let mut client = clients[(w + n) % clients.len()].clone();
                // A key of this client's (k), and what the choice needs to know of it.
                let (keys, k, id, tagged) = {
                    let owned = ledger.lock().unwrap();
                    let k = (x >> 16) as usize % owned.len().max(1);
                    owned.get(k).map_or((0, 0, String::new(), 0), |o| {
                        let tagged = o.tags_made.len() + o.tags_unknown.len();
                        (owned.len(), k, o.id.clone(), tagged)
                    })
                };
                let choice = if keys < 2 || (keys < 6 && x % 10 == 0) {
                    0
                } else {
                    1 + (x >> 8) % 6
                };
                let follow = |from: u8, to: Option<u8>, answer: Outcome, what: &str| {
                    let mut owned = ledger.lock().unwrap();
                    match to {
                        Some(to) => owned[k].follow(from, to, answer, what),
                        None => owned[k].allowed_in(from, answer, what),
                    }
                };
                let result = match choice {
                    0 => {
                        let answer = try_create_key(&mut client, &store).await;
                        let made = outcome(&answer);
                        if let Ok(r) = answer {
                            ledger.lock().unwrap().push(Owned {
                                id: r.into_inner().key_metadata.unwrap().key_id,
                                possible: ENABLED,
                                tags_made: Vec::new(),
                                tags_unknown: Vec::new(),
                                sealed: Vec::new(),
                            });
                        }
                        made
                    }
                    1 => {
                        let r = client.enable_key(EnableKeyRequest { key_id: id }).await;
                        let answer = outcome(&r);
                        follow(ENABLED | DISABLED, Some(ENABLED), answer, "EnableKey");
                        answer
                    }
                    2 => {
                        let r = client.disable_key(DisableKeyRequest { key_id: id }).await;
                        let answer = outcome(&r);
                        follow(ENABLED | DISABLED, Some(DISABLED), answer, "DisableKey");
                        answer
                    }
                    3 => {
                        let r = client
                            .schedule_key_deletion(ScheduleKeyDeletionRequest {
                                key_id: id,
                                pending_window_in_days: Some(7),
                            })
                            .await;
                        let answer = outcome(&r);
                        follow(
                            ENABLED | DISABLED,
                            Some(PENDING),
                            answer,
                            "ScheduleKeyDeletion",
                        );
                        answer
                    }
                    4 => {
                        let r = client
                            .cancel_key_deletion(CancelKeyDeletionRequest { key_id: id })
                            .await;
                        let answer = outcome(&r);
                        follow(PENDING, Some(DISABLED), answer, "CancelKeyDeletion");
                        answer
                    }
                    5 if tagged < 40 => {
                        let tag = format!("w{w}-{n}");
                        let r = client
                            .tag_resource(TagResourceRequest {
                                key_id: id,
                                tags: vec![Tag {
                                    tag_key: tag.clone(),
                                    tag_value: "v".into(),
                                }],
                            })
                            .await;
                        let answer = outcome(&r);
                        follow(ENABLED | DISABLED, None, answer, "TagResource");
                        let mut owned = ledger.lock().unwrap();
                        match answer {
                            Outcome::Made => owned[k].tags_made.push(tag),
                            Outcome::Unknown => owned[k].tags_unknown.push(tag),
                            Outcome::Refused => {}
                        }
                        answer
                    }
                    _ => {
                        // Encrypt reads through the replica's cache, which may lag a
                        // change through another replica by the propagation bound: it is
                        // not checked against the state, only its ciphertext kept.
                        let plaintext = format!("w{w}-{n}").into_bytes();
                        match try_encrypt(&mut client, &id, &plaintext).await {
                            Ok(r) => {
                                let ct = r.into_inner().ciphertext_blob;
                                ledger.lock().unwrap()[k].sealed.push((plaintext, ct));
                                Outcome::Made
                            }
                            Err(e)
                                if matches!(
                                    aws_error(&e).as_str(),
                                    "DisabledException" | "KMSInvalidStateException"
                                ) =>
                            {
                                Outcome::Refused
                            }
                            Err(e) => outcome::<()>(&Err(e)),
                        }
                    }
                };
                tally[result as usize] += 1;
                if result == Outcome::Made {
                    acked.fetch_add(1, Relaxed);
                }
            }
            tally
        });
    }
    // Load first, then each restart with load on both sides of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut marks = vec![("before", acked.load(Relaxed))];
    for mode in ["fast", "immediate"] {
        tokio::task::block_in_place(|| server.restart(mode)).unwrap();
        {
            // Paused right after the restart: nothing acknowledged before it may be lost.
            let _paused = pause.write().await;
            let db = database_client(&url).await;
            check_history(&db, &ledgers, &format!("after -m {mode}")).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        marks.push((mode, acked.load(Relaxed)));
    }
    stop.store(true, Relaxed);
    let mut tally = [0u64; 3];
    while let Some(done) = tasks.join_next().await {
        for (all, one) in tally.iter_mut().zip(done.unwrap()) {
            *all += one;
        }
    }
    let keys: usize = ledgers.iter().map(|l| l.lock().unwrap().len()).sum();
    eprintln!(
        "answers (made, refused, unknown): {tally:?}; acknowledged by the end of each phase: \
         {marks:?}; {keys} keys"
    );
    assert!(
        marks[2].1 > marks[1].1 && marks[1].1 > marks[0].1,
        "the service did not serve again after a restart: {marks:?}"
    );

    // Creations cut short by a restart are swept; then the token holds exactly the keys
    // the database has, each once.
    let db = database_client(&url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let final_rows = loop {
        let rows = check_history(&db, &ledgers, "at the end").await;
        // Labels are key ARNs, ending in key/<id>.
        let mut labels: Vec<String> = h
            .token_key_labels(0)
            .iter()
            .map(|l| l.rsplit('/').next().unwrap().to_string())
            .collect();
        labels.sort();
        let ids: Vec<String> = rows.keys().cloned().collect();
        if labels == ids && !rows.values().any(|s| s == "Creating") {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token and database disagree: {} objects, {} rows ({} Creating)",
            labels.len(),
            rows.len(),
            rows.values().filter(|s| *s == "Creating").count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (generated, destroyed) = (
        calls("C_GenerateKey") - generated_before,
        calls("C_DestroyObject") - destroyed_before,
    );
    eprintln!("C_GenerateKey {generated}, C_DestroyObject {destroyed} during the run");
    assert_eq!(
        generated as i64 - destroyed as i64,
        final_rows.len() as i64 - token_before as i64,
        "material made and destroyed does not add up: a key destroyed twice, or orphaned"
    );
    only_allowed_transitions(&db).await;

    // Every replica comes to describe every key as the database holds it (the deadline
    // only catches one that never does), and every acknowledged ciphertext still decrypts,
    // through every replica.
    for key in ledgers
        .iter()
        .flat_map(|l| std::mem::take(&mut *l.lock().unwrap()))
    {
        let state = &final_rows[&key.id];
        for client in &clients {
            let mut described = String::new();
            for _ in 0..100 {
                described = describe_key(&mut client.clone(), &key.id).await.key_state;
                if &described == state {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(&described, state, "{}", key.id);
        }
        if state == "PendingDeletion" {
            a.cancel_key_deletion(CancelKeyDeletionRequest {
                key_id: key.id.clone(),
            })
            .await
            .unwrap();
        }
        a.enable_key(EnableKeyRequest {
            key_id: key.id.clone(),
        })
        .await
        .unwrap();
        for (i, (plaintext, ct)) in key.sealed.iter().enumerate() {
            let mut client = clients[i % clients.len()].clone();
            let mut tries = 0;
            let out = loop {
                match client
                    .decrypt(DecryptRequest {
                        ciphertext_blob: ct.clone(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => break r.into_inner().plaintext,
                    // An enabling reaches the other replicas a moment later (the deadline
                    // only catches one that never does).
                    Err(e) if aws_error(&e) == "DisabledException" && tries < 400 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Err(e) => panic!("an acknowledged ciphertext under {}: {e:?}", key.id),
                }
            };
            assert_eq!(&out, plaintext);
        }
    }

    // Every replica's chain verifies against its recorded head.
    for (name, replica) in [("b", b), ("c", c)] {
        assert!(replica.stop(), "replica {name} did not exit cleanly");
        let config = h.dir.path().join(format!("{name}.toml"));
        let (ok, said) = audit_verify(
            Some(&config),
            &[h.dir.path().join(format!("{name}-audit.jsonl"))],
        );
        assert!(ok, "{name}: {said}");
    }
    assert!(h.stop(), "replica a did not exit cleanly");
    let (ok, said) = audit_verify(Some(&h.config_path()), &[h.settings.audit.file.clone()]);
    assert!(ok, "a: {said}");
}

/// The tester's SIGKILL storm, through the shipped balancer configuration
/// (deploy/haproxy-replicas.cfg): 16 clients, each moving its own key between
/// PendingDeletion and Disabled (ScheduleKeyDeletion, CancelKeyDeletion) through HAProxy,
/// while a replica is killed every 1.5 s and started again. No answer may contradict the
/// key's history. A balancer that re-sent a request after the replica that made the change
/// died would answer a scheduled deletion "is pending deletion", and the client would be
/// told the opposite of what happened: it must re-send only what never reached a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_storm_through_the_balancer_contradicts_no_answer() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    const WORKERS: usize = 16;
    const KILLS: usize = 9;
    let server = testing::postgres::Server::start_own()
        .expect("PostgreSQL for the replica tests (scripts/setup.sh installs it)");
    let database = database_on(&server).await;
    let url = database.url.clone();
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicastorm")], |s| {
        use_database(s, database);
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "storm").await;
    let mut ledgers: Vec<Ledger> = Vec::new();
    for _ in 0..WORKERS {
        let id = create_key(&mut a, &store).await.key_id;
        ledgers.push(Arc::new(std::sync::Mutex::new(vec![Owned {
            id,
            possible: ENABLED,
            tags_made: Vec::new(),
            tags_unknown: Vec::new(),
            sealed: Vec::new(),
        }])));
    }
    let db = record_transitions(&url).await;
    // Three replicas at fixed addresses, so that a killed one comes back where HAProxy looks.
    let names = ["b", "c", "d"];
    let addrs: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = names
        .iter()
        .map(|_| {
            let port = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
            (port(free_port()), port(free_port()))
        })
        .collect();
    let start = |i: usize| {
        h.replica_with(
            names[i],
            |s| {
                s.server.listen = addrs[i].0;
                s.admin.listen = addrs[i].1;
            },
            &[],
        )
    };
    let mut replicas: Vec<Option<Replica>> = (0..3).map(|i| Some(start(i))).collect();
    let backends: Vec<Backend> = addrs
        .iter()
        .map(|(grpc, admin)| Backend {
            grpc: grpc.to_string(),
            aws: None,
            admin: admin.to_string(),
        })
        .collect();
    let balancer = Balancer::start(h.dir.path(), &backends);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", balancer.grpc))
        .unwrap()
        .connect_lazy();
    // Every replica in rotation (two good checks a second apart) before the storm.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = ledgers[0].lock().unwrap()[0].id.clone();
    usable(&mut Client::new(channel.clone()), &first).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (w, ledger) in ledgers.iter().enumerate() {
        let (mut client, stop, ledger) =
            (Client::new(channel.clone()), stop.clone(), ledger.clone());
        tasks.spawn(async move {
            // Answers: made, refused, unknown (the connection failed under the call).
            let mut tally = [0u64; 3];
            let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while !stop.load(Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (id, possible) = {
                    let owned = ledger.lock().unwrap();
                    (owned[0].id.clone(), owned[0].possible)
                };
                // What the history says is possible decides; where it cannot, chance does.
                let cancel = possible == PENDING || (possible & PENDING != 0 && x % 2 == 0);
                let answer = if cancel {
                    let r = client
                        .cancel_key_deletion(CancelKeyDeletionRequest { key_id: id })
                        .await;
                    let answer = outcome(&r);
                    let mut owned = ledger.lock().unwrap();
                    owned[0].follow(PENDING, DISABLED, answer, "CancelKeyDeletion");
                    answer
                } else {
                    let r = client
                        .schedule_key_deletion(ScheduleKeyDeletionRequest {
                            key_id: id,
                            pending_window_in_days: Some(7),
                        })
                        .await;
                    let answer = outcome(&r);
                    let mut owned = ledger.lock().unwrap();
                    owned[0].follow(ENABLED | DISABLED, PENDING, answer, "ScheduleKeyDeletion");
                    answer
                };
                tally[match answer {
                    Outcome::Made => 0,
                    Outcome::Refused => 1,
                    Outcome::Unknown => 2,
                }] += 1;
            }
            tally
        });
    }
    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let i = k % replicas.len();
        // Dropping a replica SIGKILLs it.
        drop(replicas[i].take());
        tokio::time::sleep(Duration::from_millis(300)).await;
        replicas[i] = Some(tokio::task::block_in_place(|| start(i)));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Relaxed);
    let mut tally = [0u64; 3];
    while let Some(t) = tasks.join_next().await {
        let t = t.expect("a client's history was contradicted by an answer");
        for (sum, n) in tally.iter_mut().zip(t) {
            *sum += n;
        }
    }
    eprintln!(
        "kill storm: {KILLS} kills; {} changes acknowledged, {} refused, {} with no answer",
        tally[0], tally[1], tally[2]
    );
    // The storm happened: changes were made throughout, and kills cut some calls short.
    assert!(tally[0] >= 200, "too little load to tell: {tally:?}");
    assert!(tally[2] >= 1, "no kill cut a call short: {tally:?}");
    check_history(&db, &ledgers, "after the kill storm").await;
    drop(balancer);
    for r in replicas.iter_mut() {
        drop(r.take());
    }
    // Every change the database made is in an audit trail: as its `allowed` line, or, when
    // the replica died before writing that, as the `intent` line written before it ran.
    let lines: Vec<serde_json::Value> = names
        .iter()
        .flat_map(|n| {
            let file = h.dir.path().join(format!("{n}-audit.jsonl"));
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect();
    let mut orphans = 0;
    for ledger in &ledgers {
        let key = ledger.lock().unwrap()[0].id.clone();
        for (op, to) in [
            ("ScheduleKeyDeletion", "PendingDeletion"),
            ("CancelKeyDeletion", "Disabled"),
        ] {
            let made: i64 = db
                .query_one(
                    "SELECT count(*) FROM test_transitions WHERE key_id = $1 AND new = $2",
                    &[&key, &to],
                )
                .await
                .unwrap()
                .get(0);
            orphans += assert_changes_in_trail(&lines, &key, op, made);
        }
    }
    eprintln!("kill storm: {orphans} changes begun and not finished in the audit trails");
}

/// A change that takes access away, once acknowledged through one replica, is in force on
/// every other live replica: 8 keys at a time, served from B's and C's caches a moment
/// before, are disabled (or scheduled for deletion) through A, and an Encrypt sent to B and
/// to C the moment each answer arrives is refused, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_revocation_is_in_force_on_every_replica() {
    const ROUNDS: usize = 24;
    let database = postgres_database().await;
    let h = Harness::start_with(&[ClusterSpec::good("cluster-replicarevok")], |s| {
        use_database(s, database);
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "revoke").await;
    let mut keys = Vec::new();
    for _ in 0..8 {
        keys.push(create_key(&mut a, &store).await.key_id);
    }
    let (b, c) = (h.replica("b"), h.replica("c"));
    let others = [b.client().await, c.client().await];
    // Load on B and C meanwhile (a key of its own), as a busy service has.
    let busy = create_key(&mut a, &store).await.key_id;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (mut o, busy, stop) = (others[w % 2].clone(), busy.clone(), stop.clone());
        usable(&mut o, &busy).await;
        load.spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                try_encrypt(&mut o, &busy, b"load").await.unwrap();
                n += 1;
            }
            n
        });
    }
    let mut raced = 0;
    let mut served = Vec::new();
    let mut took = Vec::new();
    for round in 0..ROUNDS {
        let schedule = round % 2 == 1;
        // Every key enabled again, and served by B and C: their caches hold it Enabled.
        for k in &keys {
            let _ = a
                .cancel_key_deletion(CancelKeyDeletionRequest { key_id: k.clone() })
                .await;
            a.enable_key(EnableKeyRequest { key_id: k.clone() })
                .await
                .unwrap();
            for o in &others {
                usable(&mut o.clone(), k).await;
            }
        }
        let mut races = tokio::task::JoinSet::new();
        for k in keys.clone() {
            let (mut a, others) = (a.clone(), others.clone());
            races.spawn(async move {
                let started = std::time::Instant::now();
                if schedule {
                    a.schedule_key_deletion(ScheduleKeyDeletionRequest {
                        key_id: k.clone(),
                        pending_window_in_days: Some(7),
                    })
                    .await
                    .map(drop)
                } else {
                    a.disable_key(DisableKeyRequest { key_id: k.clone() })
                        .await
                        .map(drop)
                }
                .unwrap();
                let took = started.elapsed();
                // The answer is in: both other replicas, at once.
                let (mut b, mut c) = (others[0].clone(), others[1].clone());
                let (rb, rc) = tokio::join!(
                    try_encrypt(&mut b, &k, b"after"),
                    try_encrypt(&mut c, &k, b"after")
                );
                let mut out = Vec::new();
                for (name, r) in [("B", rb), ("C", rc)] {
                    match r {
                        Ok(_) => out.push(Some(format!("{name} served {k}"))),
                        Err(e) => {
                            let want = if schedule {
                                "KMSInvalidStateException"
                            } else {
                                "DisabledException"
                            };
                            assert_eq!(aws_error(&e), want, "{e:?}");
                            out.push(None);
                        }
                    }
                }
                (out, took)
            });
        }
        while let Some(r) = races.join_next().await {
            let (out, t) = r.unwrap();
            raced += out.len();
            served.extend(out.into_iter().flatten());
            took.push(t);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut loaded = 0;
    while let Some(n) = load.join_next().await {
        loaded += n.unwrap();
    }
    took.sort();
    eprintln!(
        "{raced} requests raced an acknowledged revocation ({loaded} Encrypts of load \
         meanwhile), {} served; the revocation's answer took {:?} (median), {:?} (max)",
        served.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // The race happened as often as planned, on warm caches (`usable` above).
    assert_eq!(raced, ROUNDS * 8 * 2);
    assert!(served.is_empty(), "{served:?}");
}

/// A stalled database (PostgreSQL stopped with SIGSTOP, as a frozen host is): a request
/// costs the metadata call's deadline and is answered DependencyTimeoutException, which
/// SDKs retry, instead of waiting out the stall; /readyz says 503 meanwhile; and requests
/// are served again soon after the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_answers_retryable_errors_and_service_returns() {
    let server = testing::postgres::Server::start_own()
        .expect("PostgreSQL for the replica tests (scripts/setup.sh installs it)");
    let database = database_on(&server).await;
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    let h = Harness::start_opts(&[ClusterSpec::good("cluster-replicastall")], options, |s| {
        use_database(s, database);
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        add_access_keys(s);
    })
    .await;
    // The shipped balancer in front of it, both fronts.
    let balancer = Balancer::start(
        h.dir.path(),
        &[Backend {
            grpc: h.addr.clone(),
            aws: Some(h.aws.clone()),
            admin: h.admin.clone(),
        }],
    );
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "stall").await;
    let key = create_key(&mut c, &store).await.key_id;
    encrypt(&mut c, &key, b"before").await;
    let pids = server.processes();
    assert!(pids.len() >= 4, "PostgreSQL's processes: {pids:?}");
    /// Continues the stopped processes however the test ends.
    struct Stopped(Vec<i32>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            for &pid in &self.0 {
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
    }
    for &pid in &pids {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }
    let stopped = Stopped(pids);
    // A replica's cache serves for at most its fence (200 ms) after its last answered ping;
    // past that, every request needs the database.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    for op in ["Encrypt", "ListKeys"] {
        let answer = async {
            match op {
                "Encrypt" => try_encrypt(&mut c, &key, b"stalled").await.map(drop),
                _ => c.list_keys(ListKeysRequest::default()).await.map(drop),
            }
        };
        // A generous limit that only catches a request hanging for the whole stall.
        let r = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("{op} hung while the database was stalled"));
        let e = r.expect_err("served while the database was stalled");
        assert_eq!(aws_error(&e), "DependencyTimeoutException", "{op}: {e:?}");
    }
    let answered = started.elapsed();
    let (status, why) = tokio::task::block_in_place(|| h.admin_get("/readyz"));
    assert_eq!(status, 503, "{why}");
    eprintln!("stalled database: two requests answered DependencyTimeoutException in {answered:?}; /readyz: {why}");
    // Once the balancer has taken the unready replica out, it answers itself, with the same
    // retryable AWS exception on both fronts rather than a bare 503.
    let mut through = Client::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", balancer.grpc))
            .unwrap()
            .connect_lazy(),
    );
    let mut by_balancer = None;
    for _ in 0..60 {
        let e = try_encrypt(&mut through, &key, b"via the balancer")
            .await
            .expect_err("served through the balancer while the database was stalled");
        assert_eq!(aws_error(&e), "DependencyTimeoutException", "{e:?}");
        if e.message().starts_with("No hsm-kms replica can serve now") {
            by_balancer = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let e = by_balancer.expect("the balancer never answered for the unready replica");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    let headers = aws_headers(
        &balancer.aws,
        "ListKeys",
        b"{}",
        None,
        "us-east-1",
        std::time::SystemTime::now(),
    );
    let stream = std::net::TcpStream::connect(&balancer.aws).unwrap();
    let (status, _, body) = http1_post(stream, &headers, b"{}");
    assert_eq!(
        (status, body["__type"].as_str()),
        (503, Some("DependencyTimeoutException")),
        "{body}"
    );
    drop(stopped);
    let resumed = std::time::Instant::now();
    loop {
        if try_encrypt(&mut c, &key, b"after").await.is_ok() {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "not served 30 s after the database answered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = resumed.elapsed();
    loop {
        if tokio::task::block_in_place(|| h.admin_get("/readyz")).0 == 200 {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "not ready 30 s after"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "after the stall: served again in {served:?}, ready in {:?}",
        resumed.elapsed()
    );
}

/// A revoked grant, once RevokeGrant is acknowledged through one replica, allows nothing on
/// the others: for 8 keys at a time, bob, whose only access to them is a grant, encrypts
/// through B and C (so their caches hold the grants), the grants are revoked through A,
/// and bob's Encrypts sent to B and C the moment each answer arrives are refused, every
/// time, with B and C under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_grant_revocation_is_in_force_on_every_replica() {
    use aws_sdk_kms::primitives::Blob;
    const ROUNDS: usize = 16;
    const KEYS: usize = 8;
    let database = postgres_database().await;
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    let h = Harness::start_opts(&[ClusterSpec::good("cluster-replicagrant")], options, |s| {
        use_database(s, database);
        add_access_keys(s);
    })
    .await;
    let mut a = h.client().await;
    let store = h.connected_store(&mut a, 0, "grants").await;
    let mut keys = Vec::new();
    for _ in 0..KEYS {
        keys.push(create_key(&mut a, &store).await.key_id);
    }
    let aws: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let replicas: Vec<Replica> = ["b", "c"]
        .iter()
        .zip(&aws)
        .map(|(name, addr)| h.replica_with(name, |s| s.server.aws_listen = Some(*addr), &[]))
        .collect();
    let bob: Vec<aws_sdk_kms::Client> = aws
        .iter()
        .map(|addr| sdk_at(&addr.to_string(), BOB_KEY, REGION))
        .collect();
    // Load on B and C meanwhile, as a busy service has.
    let busy = create_key(&mut a, &store).await.key_id;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut o = replicas[w % 2].client().await;
        let (busy, stop) = (busy.clone(), stop.clone());
        usable(&mut o, &busy).await;
        load.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                try_encrypt(&mut o, &busy, b"load").await.unwrap();
            }
        });
    }
    let mut served = Vec::new();
    let mut raced = 0;
    for round in 0..ROUNDS {
        let mut grants = Vec::new();
        for k in &keys {
            let made = a
                .create_grant(CreateGrantRequest {
                    key_id: k.clone(),
                    grantee_principal: BOB.into(),
                    operations: vec!["Encrypt".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            grants.push(made.into_inner().grant_id);
        }
        // A grant given may reach other replicas a moment later; then bob's Encrypt works
        // through both, and their caches hold the grant.
        for k in &keys {
            for (i, c) in bob.iter().enumerate() {
                let mut tries = 0;
                while c
                    .encrypt()
                    .key_id(k)
                    .plaintext(Blob::new(b"warm".to_vec()))
                    .send()
                    .await
                    .is_err()
                {
                    tries += 1;
                    assert!(
                        tries < 200,
                        "round {round}: the grant never reached replica {i}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let mut races = tokio::task::JoinSet::new();
        for (k, grant) in keys.iter().cloned().zip(grants) {
            let (mut a, bob) = (a.clone(), bob.clone());
            races.spawn(async move {
                a.revoke_grant(RevokeGrantRequest {
                    key_id: k.clone(),
                    grant_id: grant,
                    dry_run: None,
                })
                .await
                .unwrap();
                let send = |c: &aws_sdk_kms::Client| {
                    c.encrypt()
                        .key_id(&k)
                        .plaintext(Blob::new(b"bob".to_vec()))
                        .send()
                };
                let (rb, rc) = tokio::join!(send(&bob[0]), send(&bob[1]));
                let mut out = Vec::new();
                for (name, r) in [("B", rb), ("C", rc)] {
                    match r {
                        Ok(_) => out.push(Some(format!("{name} served bob under {k}"))),
                        Err(e) => {
                            use aws_sdk_kms::error::ProvideErrorMetadata as _;
                            assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
                            out.push(None);
                        }
                    }
                }
                out
            });
        }
        while let Some(out) = races.join_next().await {
            let out = out.unwrap();
            raced += out.len();
            served.extend(out.into_iter().flatten());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }
    eprintln!(
        "{raced} requests raced an acknowledged RevokeGrant, {} served",
        served.len()
    );
    assert_eq!(raced, ROUNDS * KEYS * 2);
    assert!(served.is_empty(), "{served:?}");
    drop(replicas);
}
