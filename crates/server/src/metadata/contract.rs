//! The contract of `Metadata`: what every implementation must do, run against each one
//! (`run(fresh)`, where `fresh` opens an empty database). Each check starts from an empty
//! database, so that an implementation's failure names the rule it broke.

use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use super::*;
use model::states::{ConnectionErrorCode, ConnectionState, KeyState, StateSet};

const E: KeyState = KeyState::Enabled;
const D: KeyState = KeyState::Disabled;
const PD: KeyState = KeyState::PendingDeletion;
const LIVE: StateSet = StateSet::of(&[E, D]);

/// Names every check of the contract once, for `callback!` to make something of each:
/// `run` calls them in turn, and each database's tests make each its own test
/// (`contract_tests!`), so that the first failure hides none of the others.
macro_rules! contract_checks {
    ($callback:ident ($($args:tt)*)) => {
        $callback! {
            ($($args)*)
            keystores_are_unique_by_name_and_cluster,
            keystore_transitions_are_conditional,
            keystore_updates_and_deletion,
            pending_passwords_are_promoted_once,
            key_changes_obey_the_accepted_states,
            invisible_keys_are_absent,
            scheduled_deletion_and_its_claim,
            abandoned_creations_are_claimed,
            tags_are_bounded_and_a_refused_change_leaves_none,
            a_key_keeps_its_newest_use,
            aliases_are_unique_and_bounded,
            grants_are_bounded_and_named_grants_are_idempotent,
            reads_after_writes_see_the_writes,
            racing_writers_cannot_pass_a_limit,
            the_first_sealing_check_value_stays,
            replicas_are_counted_from_recent_heartbeats,
            the_database_tells_the_time,
            audit_heads_never_move_back,
        }
    };
}
pub(crate) use contract_checks;

/// The tests of `contract_tests!`: one per check, on a database `$fresh` opens.
macro_rules! contract_test_each {
    (($fresh:expr) $($check:ident,)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::metadata::contract::$check($fresh).await;
            }
        )+
    };
}
pub(crate) use contract_test_each;

/// One test per check of the contract, each on a database `$fresh` (an async expression
/// that opens an empty database) opens.
macro_rules! contract_tests {
    ($fresh:expr) => {
        use $crate::metadata::contract::{contract_checks, contract_test_each};
        contract_checks!(contract_test_each($fresh));
    };
}
pub(crate) use contract_tests;

macro_rules! run_each {
    (() $($check:ident,)+) => {
        /// Runs every check, each on a database of its own.
        pub async fn run<F, Fut>(fresh: F)
        where
            F: Fn() -> Fut,
            Fut: Future<Output = Arc<dyn Metadata>>,
        {
            $($check(fresh().await).await;)+
        }
    };
}
contract_checks!(run_each());

/// A replica's recorded audit head only moves forward, so a trail cut at its end and a
/// replica restarted on it cannot make the record shorter too.
pub(crate) async fn audit_heads_never_move_back(m: Arc<dyn Metadata>) {
    let head = |replica: &str, seq: u64, ms: i64| crate::metadata::AuditHead {
        replica: replica.into(),
        seq,
        head: format!("{seq:064x}"),
        recorded_ms: ms,
    };
    assert!(m.audit_heads().await.unwrap().is_empty());
    m.record_audit_head(&head("a", 5, 1)).await.unwrap();
    m.record_audit_head(&head("b", 2, 1)).await.unwrap();
    m.record_audit_head(&head("a", 9, 2)).await.unwrap();
    m.record_audit_head(&head("a", 3, 3)).await.unwrap();
    assert_eq!(
        m.audit_heads().await.unwrap(),
        vec![head("a", 9, 2), head("b", 2, 1)]
    );
}

/// The database's clock is a wall clock (here, on the same host: within seconds of it).
pub(crate) async fn the_database_tells_the_time(m: Arc<dyn Metadata>) {
    let db = m.clock_ms().await.unwrap();
    let here = model::now_ms();
    assert!((db - here).abs() < 5_000, "database {db}, host {here}");
}

/// Live replicas are those whose heartbeat is recent; one that left is not counted.
pub(crate) async fn replicas_are_counted_from_recent_heartbeats(m: Arc<dyn Metadata>) {
    assert_eq!(m.heartbeat("a", 1_000, 100).await.unwrap(), 1);
    assert_eq!(m.heartbeat("b", 1_050, 100).await.unwrap(), 2);
    assert_eq!(m.heartbeat("a", 1_100, 100).await.unwrap(), 2);
    // b's last beat is now older than the window.
    assert_eq!(m.heartbeat("a", 1_151, 100).await.unwrap(), 1);
    m.heartbeat("b", 1_160, 100).await.unwrap();
    m.leave("b").await.unwrap();
    assert_eq!(m.heartbeat("a", 1_170, 100).await.unwrap(), 1);
}

/// The sealing-key check value: the first recorded stays, whatever later starts offer.
pub(crate) async fn the_first_sealing_check_value_stays(m: Arc<dyn Metadata>) {
    assert_eq!(m.sealing_check(b"first").await.unwrap(), b"first");
    assert_eq!(m.sealing_check(b"second").await.unwrap(), b"first");
}

fn keystore(id: &str, name: &str, cluster: &str) -> KeyStoreRecord {
    KeyStoreRecord {
        id: id.into(),
        name: name.into(),
        cluster_id: cluster.into(),
        trust_anchor: "pem".into(),
        sealed_password: vec![1, 2, 3],
        connection_state: ConnectionState::Disconnected,
        connection_error_code: None,
        creation_date_ms: 7,
    }
}

fn key(store: &str, state: KeyState) -> KeyRecord {
    KeyRecord {
        id: Uuid::new_v4(),
        custom_key_store_id: store.into(),
        creation_date_ms: 10,
        description: "d".into(),
        key_state: state,
        deletion_date_ms: None,
        pending_window_days: None,
        policy: None,
    }
}

/// A database with one key store `cks-1` and a key in `state`.
pub(crate) async fn with_key(m: &dyn Metadata, state: KeyState) -> Uuid {
    if m.keystore("cks-1").await.unwrap().is_none() {
        m.insert_keystore(&keystore("cks-1", "one", "cluster-1"))
            .await
            .unwrap();
    }
    let k = key("cks-1", state);
    m.insert_key(&k, &[]).await.unwrap();
    k.id
}

fn precondition<T: std::fmt::Debug>(r: MetaResult<T>) -> Precondition {
    match r {
        Err(Failure::Precondition(p)) => p,
        other => panic!("expected a failed precondition, got {other:?}"),
    }
}

pub(crate) async fn keystores_are_unique_by_name_and_cluster(m: Arc<dyn Metadata>) {
    m.insert_keystore(&keystore("cks-1", "one", "cluster-1"))
        .await
        .unwrap();
    let taken = |u| Err(Failure::Taken(u));
    assert_eq!(
        m.insert_keystore(&keystore("cks-2", "one", "cluster-2"))
            .await,
        taken(Unique::KeyStoreName)
    );
    assert_eq!(
        m.insert_keystore(&keystore("cks-2", "two", "cluster-1"))
            .await,
        taken(Unique::KeyStoreCluster)
    );
    m.insert_keystore(&keystore("cks-2", "two", "cluster-2"))
        .await
        .unwrap();
    assert_eq!(
        m.keystore("cks-1").await.unwrap(),
        Some(keystore("cks-1", "one", "cluster-1"))
    );
    assert_eq!(
        m.keystore_by_name("two").await.unwrap().map(|r| r.id),
        Some("cks-2".to_string())
    );
    assert_eq!(m.keystore("cks-9").await.unwrap(), None);
    let ids = |v: Vec<KeyStoreRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(m.list_keystores(None, 10).await.unwrap()),
        ["cks-1", "cks-2"]
    );
    assert_eq!(ids(m.list_keystores(None, 1).await.unwrap()), ["cks-1"]);
    assert_eq!(
        ids(m.list_keystores(Some("cks-1"), 10).await.unwrap()),
        ["cks-2"]
    );
}

pub(crate) async fn keystore_transitions_are_conditional(m: Arc<dyn Metadata>) {
    use ConnectionState::*;
    m.insert_keystore(&keystore("cks-1", "one", "cluster-1"))
        .await
        .unwrap();
    m.transition_keystore("cks-1", &[Disconnected], Connecting, None)
        .await
        .unwrap();
    assert_eq!(
        precondition(
            m.transition_keystore("cks-1", &[Disconnected], Connecting, None)
                .await
        ),
        Precondition::ConnectionState(Connecting)
    );
    let code = Some(ConnectionErrorCode::InvalidCredentials);
    m.transition_keystore("cks-1", &[Connecting], Failed, code)
        .await
        .unwrap();
    let rec = m.keystore("cks-1").await.unwrap().unwrap();
    assert_eq!(
        (rec.connection_state, rec.connection_error_code),
        (Failed, code)
    );
    assert_eq!(
        m.transition_keystore("cks-9", &[Failed], Disconnected, None)
            .await,
        Err(Failure::NotFound)
    );
    // A transition is abandoned only once it is old enough, and only once.
    m.transition_keystore("cks-1", &[Failed], Connecting, None)
        .await
        .unwrap();
    assert!(m
        .abandon_transition("cks-1", Connecting, 60_000)
        .await
        .is_err());
    assert!(m
        .abandon_transition("cks-1", Disconnecting, 0)
        .await
        .is_err());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    m.abandon_transition("cks-1", Connecting, 5).await.unwrap();
    assert_eq!(
        m.keystore("cks-1").await.unwrap().unwrap().connection_state,
        Disconnected
    );
    assert!(m.abandon_transition("cks-1", Connecting, 5).await.is_err());
}

pub(crate) async fn keystore_updates_and_deletion(m: Arc<dyn Metadata>) {
    use ConnectionState::*;
    m.insert_keystore(&keystore("cks-1", "one", "cluster-1"))
        .await
        .unwrap();
    m.insert_keystore(&keystore("cks-2", "two", "cluster-2"))
        .await
        .unwrap();
    let rename = |n: &str| KeyStoreUpdate {
        name: Some(n.into()),
        ..Default::default()
    };
    assert_eq!(
        m.update_keystore("cks-1", &rename("two")).await,
        Err(Failure::Taken(Unique::KeyStoreName))
    );
    assert_eq!(
        m.update_keystore("cks-9", &rename("x")).await,
        Err(Failure::NotFound)
    );
    m.update_keystore(
        "cks-1",
        &KeyStoreUpdate {
            name: Some("uno".into()),
            cluster_id: Some("cluster-3".into()),
            sealed_password: Some(vec![9]),
        },
    )
    .await
    .unwrap();
    let rec = m.keystore("cks-1").await.unwrap().unwrap();
    assert_eq!(
        (
            rec.name.as_str(),
            rec.cluster_id.as_str(),
            rec.sealed_password
        ),
        ("uno", "cluster-3", vec![9])
    );
    // Deleted only in the state the caller names, and only without keys.
    let k = key("cks-1", E);
    m.insert_key(&k, &[]).await.unwrap();
    assert_eq!(
        precondition(m.delete_keystore("cks-1", Connected).await),
        Precondition::ConnectionState(Disconnected)
    );
    assert_eq!(
        precondition(m.delete_keystore("cks-1", Disconnected).await),
        Precondition::KeyStoreHasKeys(1)
    );
    m.delete_key(&k.id).await.unwrap();
    m.delete_keystore("cks-1", Disconnected).await.unwrap();
    assert_eq!(m.keystore("cks-1").await.unwrap(), None);
    assert_eq!(
        m.delete_keystore("cks-1", Disconnected).await,
        Err(Failure::NotFound)
    );
}

pub(crate) async fn pending_passwords_are_promoted_once(m: Arc<dyn Metadata>) {
    m.insert_keystore(&keystore("cks-1", "one", "cluster-1"))
        .await
        .unwrap();
    assert_eq!(m.pending_password("cks-1").await.unwrap(), None);
    m.set_pending_password("cks-1", Some(&[4, 4]))
        .await
        .unwrap();
    assert_eq!(m.pending_password("cks-1").await.unwrap(), Some(vec![4, 4]));
    m.promote_pending_password("cks-1").await.unwrap();
    let rec = m.keystore("cks-1").await.unwrap().unwrap();
    assert_eq!(rec.sealed_password, [4, 4]);
    assert_eq!(m.pending_password("cks-1").await.unwrap(), None);
    // Promoting with nothing pending keeps the password.
    m.promote_pending_password("cks-1").await.unwrap();
    let rec = m.keystore("cks-1").await.unwrap().unwrap();
    assert_eq!(rec.sealed_password, [4, 4]);
    // A new password given by the caller makes a pending one stale.
    m.set_pending_password("cks-1", Some(&[5])).await.unwrap();
    m.update_keystore(
        "cks-1",
        &KeyStoreUpdate {
            sealed_password: Some(vec![6]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(m.pending_password("cks-1").await.unwrap(), None);
    assert_eq!(
        m.set_pending_password("cks-9", None).await,
        Err(Failure::NotFound)
    );
}

pub(crate) async fn key_changes_obey_the_accepted_states(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, D).await;
    assert_eq!(
        precondition(m.set_key_state(&id, StateSet::of(&[E]), PD).await),
        Precondition::KeyState(D)
    );
    m.set_key_state(&id, LIVE, E).await.unwrap();
    m.set_description(&id, LIVE, "new").await.unwrap();
    m.set_policy(&id, StateSet::of(&[E]), "{}").await.unwrap();
    let k = m.key(&id).await.unwrap().unwrap();
    assert_eq!(
        (k.key_state, k.description.as_str(), k.policy.as_deref()),
        (E, "new", Some("{}"))
    );
    assert_eq!(
        precondition(m.set_description(&id, StateSet::of(&[D]), "x").await),
        Precondition::KeyState(E)
    );
    assert_eq!(m.key(&id).await.unwrap().unwrap().description, "new");
    let absent = Uuid::new_v4();
    assert_eq!(
        m.set_key_state(&absent, LIVE, E).await,
        Err(Failure::NotFound)
    );
    assert_eq!(m.delete_key(&absent).await, Err(Failure::NotFound));
}

pub(crate) async fn invisible_keys_are_absent(m: Arc<dyn Metadata>) {
    let creating = with_key(&*m, KeyState::Creating).await;
    let enabled = with_key(&*m, E).await;
    // A change that does not accept Creating does not see the key.
    assert_eq!(
        m.set_key_state(&creating, LIVE, D).await,
        Err(Failure::NotFound)
    );
    let listed: Vec<Uuid> = m
        .list_keys(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(listed, [enabled]);
    assert_eq!(
        m.abandoned_creations("cks-1", 11).await.unwrap(),
        [creating]
    );
    assert!(m.abandoned_creations("cks-1", 10).await.unwrap().is_empty());
    // Finishing a creation names the state it expects.
    m.set_key_state(&creating, StateSet::of(&[KeyState::Creating]), E)
        .await
        .unwrap();
    assert_eq!(
        m.set_key_state(&creating, StateSet::of(&[KeyState::Creating]), E)
            .await,
        Err(Failure::Precondition(Precondition::KeyState(E)))
    );
}

pub(crate) async fn scheduled_deletion_and_its_claim(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, E).await;
    m.schedule_deletion(&id, LIVE, 1_000, 7).await.unwrap();
    let k = m.key(&id).await.unwrap().unwrap();
    assert_eq!(
        (k.key_state, k.deletion_date_ms, k.pending_window_days),
        (PD, Some(1_000), Some(7))
    );
    assert_eq!(
        precondition(m.schedule_deletion(&id, LIVE, 2_000, 7).await),
        Precondition::KeyState(PD)
    );
    assert!(m.keys_due(999, 10).await.unwrap().is_empty());
    assert_eq!(m.keys_due(1_000, 10).await.unwrap().len(), 1);
    m.cancel_deletion(&id, StateSet::of(&[PD]), D)
        .await
        .unwrap();
    let k = m.key(&id).await.unwrap().unwrap();
    assert_eq!((k.key_state, k.deletion_date_ms), (D, None));
    m.schedule_deletion(&id, LIVE, 1_000, 7).await.unwrap();
    assert_eq!(
        m.claim_removal(&id, Removal::Due, 999, "a", 100).await,
        Err(Failure::NotFound)
    );
    m.claim_removal(&id, Removal::Due, 1_000, "a", 100)
        .await
        .unwrap();
    assert_eq!(
        m.key(&id).await.unwrap().unwrap().key_state,
        KeyState::Deleting
    );
    // Being deleted, the key can no longer be cancelled, but it is still due.
    assert_eq!(
        m.cancel_deletion(&id, StateSet::of(&[PD]), D).await,
        Err(Failure::NotFound)
    );
    assert_eq!(m.keys_due(1_000, 10).await.unwrap().len(), 1);
    // The claim is a's until 1,100: b cannot take it, a renews it; once it has lapsed, b
    // takes it, and a, back from a freeze, finds it gone when it renews.
    assert_eq!(
        m.claim_removal(&id, Removal::Due, 1_050, "b", 100).await,
        Err(Failure::NotFound)
    );
    m.claim_removal(&id, Removal::Due, 1_060, "a", 100)
        .await
        .unwrap();
    assert_eq!(
        m.claim_removal(&id, Removal::Due, 1_159, "b", 100).await,
        Err(Failure::NotFound)
    );
    m.claim_removal(&id, Removal::Due, 1_160, "b", 100)
        .await
        .unwrap();
    assert_eq!(
        m.claim_removal(&id, Removal::Due, 1_161, "a", 100).await,
        Err(Failure::NotFound)
    );
    m.delete_key(&id).await.unwrap();
    assert_eq!(m.key(&id).await.unwrap(), None);
}

pub(crate) async fn abandoned_creations_are_claimed(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, KeyState::Creating).await; // created at 10
    let enabled = with_key(&*m, E).await;
    let due = with_key(&*m, E).await;
    m.schedule_deletion(&due, LIVE, 1_000, 7).await.unwrap();
    let old = |cutoff| Removal::Abandoned {
        created_before_ms: cutoff,
    };
    // A creation younger than the cutoff may still be in flight: not listed, not claimed.
    assert!(m.abandoned_creations("cks-1", 10).await.unwrap().is_empty());
    assert_eq!(
        m.claim_removal(&id, old(10), 1_000, "a", 100).await,
        Err(Failure::NotFound)
    );
    // Nor are keys that were not being created, whatever the cutoff.
    for other in [&enabled, &due] {
        assert_eq!(
            m.claim_removal(other, old(i64::MAX), 1_000, "a", 100).await,
            Err(Failure::NotFound)
        );
    }
    m.claim_removal(&id, old(11), 1_000, "a", 100)
        .await
        .unwrap();
    assert_eq!(
        m.key(&id).await.unwrap().unwrap().key_state,
        KeyState::Deleting
    );
    // Claimed, the creation can no longer be finished, and it is still listed (so that
    // another sweeper can take it over), but not as a due deletion.
    assert_eq!(
        m.set_key_state(&id, StateSet::of(&[KeyState::Creating]), E)
            .await,
        Err(Failure::NotFound)
    );
    assert_eq!(m.abandoned_creations("cks-1", 11).await.unwrap(), [id]);
    assert_eq!(
        m.claim_removal(&id, Removal::Due, i64::MAX / 2, "b", 100)
            .await,
        Err(Failure::NotFound)
    );
    // The claim is a's until 1,100; b takes it only once it has lapsed.
    assert_eq!(
        m.claim_removal(&id, old(11), 1_099, "b", 100).await,
        Err(Failure::NotFound)
    );
    m.claim_removal(&id, old(11), 1_050, "a", 100)
        .await
        .unwrap();
    m.claim_removal(&id, old(11), 1_150, "b", 100)
        .await
        .unwrap();
    assert_eq!(
        m.claim_removal(&id, old(11), 1_151, "a", 100).await,
        Err(Failure::NotFound)
    );
    // A due deletion's claim is not an abandoned creation's.
    m.claim_removal(&due, Removal::Due, 1_000, "a", 100)
        .await
        .unwrap();
    assert_eq!(
        m.claim_removal(&due, old(i64::MAX), 5_000, "b", 100).await,
        Err(Failure::NotFound)
    );
    assert_eq!(m.abandoned_creations("cks-1", 11).await.unwrap(), [id]);
    m.delete_key(&id).await.unwrap();
    assert!(m.abandoned_creations("cks-1", 11).await.unwrap().is_empty());
}

pub(crate) async fn tags_are_bounded_and_a_refused_change_leaves_none(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, E).await;
    let tags = |n: usize| -> Vec<(String, String)> {
        (0..n).map(|i| (format!("k{i:02}"), "v".into())).collect()
    };
    m.tag_key(&id, LIVE, &tags(3), 4).await.unwrap();
    // Overwriting does not count twice.
    m.tag_key(&id, LIVE, &[("k00".into(), "w".into())], 3)
        .await
        .unwrap();
    assert_eq!(
        precondition(m.tag_key(&id, LIVE, &tags(5), 4).await),
        Precondition::Limit(4)
    );
    let listed = m.list_tags(&id, None, 10).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0], ("k00".to_string(), "w".to_string()));
    assert_eq!(m.list_tags(&id, Some("k00"), 1).await.unwrap()[0].0, "k01");
    m.untag_key(&id, LIVE, &["k01".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(m.list_tags(&id, None, 10).await.unwrap().len(), 2);
    assert_eq!(
        precondition(m.untag_key(&id, StateSet::of(&[D]), &["k00".into()]).await),
        Precondition::KeyState(E)
    );
}

pub(crate) async fn a_key_keeps_its_newest_use(m: Arc<dyn Metadata>) {
    let a = with_key(&*m, E).await;
    let b = with_key(&*m, E).await;
    let (none, started) = m.key_usage(&a).await.unwrap();
    assert_eq!(none, None);
    assert!(started > 0, "tracking began at {started}");
    let at = |key: Uuid, operation: &str, used_ms: i64| KeyUsage {
        key_id: key,
        operation: operation.into(),
        used_ms,
        request_id: format!("r-{used_ms}"),
    };
    let gone = Uuid::new_v4();
    // A key that is not there is skipped, without failing the others.
    m.record_key_usage(&[
        at(a, "Encrypt", 20),
        at(b, "Decrypt", 10),
        at(gone, "Encrypt", 5),
    ])
    .await
    .unwrap();
    // Another replica's older use arrives late: the newer one stays.
    m.record_key_usage(&[at(a, "GenerateDataKey", 15), at(b, "ReEncrypt", 30)])
        .await
        .unwrap();
    assert_eq!(m.key_usage(&a).await.unwrap().0, Some(at(a, "Encrypt", 20)));
    assert_eq!(
        m.key_usage(&b).await.unwrap().0,
        Some(at(b, "ReEncrypt", 30))
    );
    assert_eq!(m.key_usage(&gone).await.unwrap().0, None);
    // The use goes with its key.
    m.delete_key(&a).await.unwrap();
    assert_eq!(m.key_usage(&a).await.unwrap().0, None);
    assert_eq!(m.key_usage(&b).await.unwrap().1, started);
}

pub(crate) async fn aliases_are_unique_and_bounded(m: Arc<dyn Metadata>) {
    let a = with_key(&*m, E).await;
    let b = with_key(&*m, D).await;
    m.create_alias("alias/one", &a, LIVE, 5, 2).await.unwrap();
    assert_eq!(
        m.create_alias("alias/one", &b, LIVE, 5, 2).await,
        Err(Failure::Taken(Unique::AliasName))
    );
    m.create_alias("alias/two", &a, LIVE, 5, 2).await.unwrap();
    assert_eq!(
        precondition(m.create_alias("alias/three", &a, LIVE, 5, 2).await),
        Precondition::Limit(2)
    );
    assert_eq!(
        precondition(
            m.create_alias("alias/three", &b, StateSet::of(&[E]), 5, 2)
                .await
        ),
        Precondition::KeyState(D)
    );
    m.update_alias("alias/one", &b, LIVE, 9, 2).await.unwrap();
    let rec = m.alias("alias/one").await.unwrap().unwrap();
    assert_eq!(
        (rec.key_id, rec.creation_date_ms, rec.last_updated_ms),
        (b, 5, 9)
    );
    assert_eq!(
        m.update_alias("alias/none", &b, LIVE, 9, 2).await,
        Err(Failure::NotFound)
    );
    let names = |v: Vec<AliasRecord>| v.into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(
        names(m.list_aliases(None, None, 10).await.unwrap()),
        ["alias/one", "alias/two"]
    );
    assert_eq!(
        names(m.list_aliases(Some(&a), None, 10).await.unwrap()),
        ["alias/two"]
    );
    assert_eq!(
        names(m.list_aliases(None, Some("alias/one"), 10).await.unwrap()),
        ["alias/two"]
    );
    m.delete_alias("alias/two").await.unwrap();
    assert_eq!(m.delete_alias("alias/two").await, Err(Failure::NotFound));
    // Aliases go with their key.
    m.delete_key(&b).await.unwrap();
    assert_eq!(m.alias("alias/one").await.unwrap(), None);
}

pub(crate) async fn grants_are_bounded_and_named_grants_are_idempotent(m: Arc<dyn Metadata>) {
    let key = with_key(&*m, E).await;
    let grant = |n: usize, grantee: &str| GrantRecord {
        grant_id: format!("{n:064x}"),
        key_id: key,
        name: None,
        grantee_principal: grantee.into(),
        retiring_principal: Some("arn:aws:iam::111122223333:role/r".into()),
        issuing_account: "arn:aws:iam::111122223333:root".into(),
        operations: vec!["Encrypt".into(), "Decrypt".into()],
        context_subset: Some([("a".to_string(), "b".to_string())].into()),
        context_equals: None,
        creation_date_ms: 0,
        token: format!("t{n}"),
    };
    let (per_key, per_grantee) = (5, 2);
    let accepted = StateSet::of(&[E]);
    let mut outcomes = Vec::new();
    for (n, who) in ["a", "a", "a", "b", "b", "c", "d"].iter().enumerate() {
        let r = m
            .insert_grant(&grant(n, who), accepted, per_key, per_grantee)
            .await;
        outcomes.push(r.map(|_| ()));
    }
    let over = |per_grantee, limit| {
        Err(Failure::Precondition(Precondition::GrantLimit {
            per_grantee,
            limit,
        }))
    };
    assert_eq!(
        outcomes,
        [
            Ok(()),
            Ok(()),
            over(true, 2),
            Ok(()),
            Ok(()),
            Ok(()),
            over(false, 5)
        ]
    );
    let all = m.key_grants(&key).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0], grant(0, "a"), "a grant reads back as written");
    assert_eq!(
        m.grant_by_token("t3").await.unwrap().map(|g| g.grant_id),
        Some(grant(3, "b").grant_id)
    );
    let retirable = m
        .retirable_grants("arn:aws:iam::111122223333:role/r", None, 2)
        .await
        .unwrap();
    assert_eq!(retirable.len(), 2);
    m.delete_grant(&key, &grant(0, "a").grant_id).await.unwrap();
    assert_eq!(
        m.delete_grant(&key, &grant(0, "a").grant_id).await,
        Err(Failure::NotFound)
    );
    // A named grant asked for again with the same terms is the same grant.
    let named = GrantRecord {
        name: Some("n".into()),
        ..grant(10, "c")
    };
    m.insert_grant(&named, accepted, 50, 50).await.unwrap();
    let again = GrantRecord {
        grant_id: "other".into(),
        token: "other".into(),
        ..named.clone()
    };
    assert_eq!(
        m.insert_grant(&again, accepted, 50, 50)
            .await
            .unwrap()
            .grant_id,
        named.grant_id
    );
    // A disabled key takes no grant when the caller accepts only Enabled.
    m.set_key_state(&key, LIVE, D).await.unwrap();
    assert_eq!(
        precondition(m.insert_grant(&grant(20, "e"), accepted, 50, 50).await),
        Precondition::KeyState(D)
    );
}

/// Implementations may cache; a read after a write through the same handle sees the write.
pub(crate) async fn reads_after_writes_see_the_writes(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, E).await;
    m.key(&id).await.unwrap();
    m.keystore("cks-1").await.unwrap();
    m.key_grants(&id).await.unwrap();
    m.set_key_state(&id, LIVE, D).await.unwrap();
    assert_eq!(m.key(&id).await.unwrap().unwrap().key_state, D);
    m.transition_keystore(
        "cks-1",
        &[ConnectionState::Disconnected],
        ConnectionState::Connecting,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        m.keystore("cks-1").await.unwrap().unwrap().connection_state,
        ConnectionState::Connecting
    );
    m.set_key_state(&id, LIVE, E).await.unwrap();
    let g = GrantRecord {
        grant_id: "g".into(),
        key_id: id,
        name: None,
        grantee_principal: "p".into(),
        retiring_principal: None,
        issuing_account: "a".into(),
        operations: vec!["Encrypt".into()],
        context_subset: None,
        context_equals: None,
        creation_date_ms: 0,
        token: "t".into(),
    };
    m.insert_grant(&g, LIVE, 10, 10).await.unwrap();
    assert_eq!(m.key_grants(&id).await.unwrap().len(), 1);
    m.delete_grant(&id, "g").await.unwrap();
    assert!(m.key_grants(&id).await.unwrap().is_empty());
}

/// Writers racing on one key (several connections, for a database that has them) cannot
/// take a count past its limit: tags, aliases and grants.
pub(crate) async fn racing_writers_cannot_pass_a_limit(m: Arc<dyn Metadata>) {
    let id = with_key(&*m, E).await;
    let mut racers = Vec::new();
    for w in 0..8 {
        let m = Arc::clone(&m);
        racers.push(tokio::spawn(async move {
            let tags: Vec<(String, String)> = (0..26)
                .map(|i| (format!("w{w}-{i:02}"), "v".into()))
                .collect();
            let tagged = m.tag_key(&id, LIVE, &tags, 50).await;
            let aliased = m
                .create_alias(&format!("alias/w{w}"), &id, LIVE, 1, 3)
                .await;
            let g = GrantRecord {
                grant_id: format!("{w:064x}"),
                key_id: id,
                name: None,
                grantee_principal: "arn:aws:iam::111122223333:role/r".into(),
                retiring_principal: None,
                issuing_account: "arn:aws:iam::111122223333:root".into(),
                operations: vec!["Decrypt".into()],
                context_subset: None,
                context_equals: None,
                creation_date_ms: 0,
                token: format!("race{w}"),
            };
            let granted = m.insert_grant(&g, LIVE, 5, 5).await;
            (tagged.is_ok(), aliased.is_ok(), granted.is_ok())
        }));
    }
    let mut ok = (0, 0, 0);
    for r in racers {
        let (t, a, g) = r.await.unwrap();
        ok = (ok.0 + t as usize, ok.1 + a as usize, ok.2 + g as usize);
    }
    let tags = m.list_tags(&id, None, 1000).await.unwrap().len();
    assert!(tags <= 50, "{tags} tags on a key whose limit is 50");
    assert_eq!((ok.0, tags), (1, 26), "exactly one tagger fits");
    let aliases = m.list_aliases(Some(&id), None, 100).await.unwrap().len();
    assert_eq!((ok.1, aliases), (3, 3), "aliases: limit 3");
    let grants = m.key_grants(&id).await.unwrap().len();
    assert_eq!((ok.2, grants), (5, 5), "grants: limit 5");
}
