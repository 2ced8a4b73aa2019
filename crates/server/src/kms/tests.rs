//! The domain on an in-memory metadata database, without files and without an HSM: the
//! rules that do not need key material (key states, limits, who may change what, deletion
//! of keys whose store is disconnected).

use std::sync::Arc;

use uuid::Uuid;

use super::access::{Access, Caller};
use super::clusters::Clusters;
use super::connections::Connections;
use super::gate::{Authorized, Gate, KeyNamed, Subject};
use super::grants::CreateGrant;
use super::sealing::Sealer;
use super::throttle::Quotas;
use super::{Kms, Parts};
use crate::iam::Identities;
use crate::metadata::sqlite::Sqlite;
use crate::metadata::{KeyRecord, KeyStoreRecord, Metadata};
use model::context::NO_CONTEXT;
use model::error::{ErrorKind, KmsResult};
use model::ids::ArnScope;
use model::op::Op;
use model::states::{ConnectionState, KeyState};

const STORE: &str = "cks-1234567890abcdef0";

fn kms() -> (Arc<Kms>, Arc<dyn Metadata>) {
    let scope = ArnScope {
        partition: "aws".into(),
        region: "us-east-1".into(),
        account_id: "111122223333".into(),
    };
    let metadata: Arc<dyn Metadata> = Arc::new(Sqlite::in_memory().unwrap());
    let kms = Kms::new(Parts {
        access: Access::new(&scope, Identities::default()).unwrap(),
        scope,
        clusters: Clusters::default(),
        metadata: Arc::clone(&metadata),
        sealer: Sealer::with_key(&[7; 32]),
        connections: Connections::new(Arc::default(), Default::default(), false),
        quotas: Quotas::per_second(0),
        clock_offset_ms: 0,
        default_keystore: None,
        audit_file: None,
    });
    (kms, metadata)
}

/// A key store in `state` and a key in it, written straight to the database.
async fn key_in(meta: &dyn Metadata, store_state: ConnectionState, state: KeyState) -> Uuid {
    if meta.keystore(STORE).await.unwrap().is_none() {
        meta.insert_keystore(&KeyStoreRecord {
            id: STORE.into(),
            name: "store".into(),
            cluster_id: "cluster-234567abcdefg".into(),
            trust_anchor: "pem".into(),
            sealed_password: vec![0; 40],
            connection_state: store_state,
            connection_error_code: None,
            creation_date_ms: 0,
        })
        .await
        .unwrap();
    }
    let id = Uuid::new_v4();
    meta.insert_key(
        &KeyRecord {
            id,
            custom_key_store_id: STORE.into(),
            creation_date_ms: 0,
            description: String::new(),
            key_state: state,
            deletion_date_ms: None,
            pending_window_days: None,
            policy: None,
        },
        &[],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn state_changes_follow_the_key_state_table() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let id = key_in(&*meta, ConnectionState::Connected, KeyState::Enabled).await;
    let key = id.to_string();
    let arn = kms.scope.key_arn(&id);

    let e = cancel(&kms, &me, &key).await.unwrap_err();
    assert_eq!(
        (e.kind, e.message),
        (
            ErrorKind::KmsInvalidState,
            format!("{arn} is not pending deletion.")
        )
    );
    let auth = on_key(&kms, &me, Op::ScheduleKeyDeletion, &key)
        .await
        .unwrap();
    let view = kms.schedule_key_deletion(&auth, Some(7)).await.unwrap();
    assert_eq!(view.key_state, KeyState::PendingDeletion);
    for e in [
        kms.set_key_enabled(&on_key(&kms, &me, Op::EnableKey, &key).await.unwrap())
            .await
            .unwrap_err(),
        kms.update_key_description(
            &on_key(&kms, &me, Op::UpdateKeyDescription, &key)
                .await
                .unwrap(),
            "d",
        )
        .await
        .unwrap_err(),
        kms.tag_resource(
            &on_key(&kms, &me, Op::TagResource, &key).await.unwrap(),
            &[("k".into(), "v".into())],
        )
        .await
        .unwrap_err(),
    ] {
        assert_eq!(
            (e.kind, e.message),
            (
                ErrorKind::KmsInvalidState,
                format!("{arn} is pending deletion.")
            )
        );
    }
    // PutKeyPolicy works in every state.
    let policy = crate::iam::document::default_policy("aws", "111122223333");
    let auth = on_key(&kms, &me, Op::PutKeyPolicy, &key).await.unwrap();
    kms.put_key_policy(&auth, None, &policy, false)
        .await
        .unwrap();
    cancel(&kms, &me, &key).await.unwrap();
    assert_eq!(
        describe(&kms, &me, &key).await.unwrap().key_state,
        KeyState::Disabled
    );
}

#[tokio::test]
async fn keys_of_a_disconnected_store_are_unavailable_and_refuse_cryptography() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let id = key_in(&*meta, ConnectionState::Disconnected, KeyState::Enabled).await;
    let key = id.to_string();
    assert_eq!(
        describe(&kms, &me, &key).await.unwrap().key_state,
        KeyState::Unavailable
    );
    let auth = on_key(&kms, &me, Op::Encrypt, &key).await.unwrap();
    let Err(e) = kms
        .encrypt(
            &auth,
            zeroize::Zeroizing::new(b"x".to_vec()),
            &Default::default(),
            None,
            false,
        )
        .await
    else {
        panic!("encrypted under a key of a disconnected store");
    };
    assert_eq!(e.kind, ErrorKind::KmsInvalidState);
    assert_eq!(
        e.message,
        format!("{} is unavailable.", kms.scope.key_arn(&id))
    );
    // [12]: the change is recorded and shows once the store is back.
    kms.set_key_enabled(&on_key(&kms, &me, Op::DisableKey, &key).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        meta.key(&id).await.unwrap().unwrap().key_state,
        KeyState::Disabled
    );
    // Grants can be made for it (the table allows CreateGrant on an unavailable key).
    let record = kms
        .new_grant(CreateGrant {
            grantee_principal: "arn:aws:iam::111122223333:role/app".into(),
            retiring_principal: None,
            operations: vec!["Decrypt".into()],
            context_subset: None,
            context_equals: None,
            name: None,
        })
        .unwrap();
    let auth = Gate::new(&me, Op::CreateGrant)
        .authorize(&kms, Subject::NewGrant(&key, &record))
        .await
        .unwrap();
    let e = kms.create_grant(&auth, record, false).await.unwrap_err();
    // ... but not for a disabled one, [1].
    assert_eq!(e.kind, ErrorKind::Disabled);
}

#[tokio::test]
async fn creating_keys_are_invisible() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let id = key_in(&*meta, ConnectionState::Connected, KeyState::Creating).await;
    let e = describe(&kms, &me, &id.to_string()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let auth = Gate::new(&me, Op::ListKeys)
        .authorize(&kms, Subject::Account)
        .await
        .unwrap();
    assert!(kms
        .list_keys(&auth, None, None)
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test]
async fn aliases_are_unique_and_follow_the_table() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let a = key_in(&*meta, ConnectionState::Connected, KeyState::Enabled).await;
    let b = key_in(
        &*meta,
        ConnectionState::Connected,
        KeyState::PendingDeletion,
    )
    .await;
    let (a, b) = (a.to_string(), b.to_string());
    alias(&kms, &me, Op::CreateAlias, "alias/app", Some(&a))
        .await
        .unwrap();
    let e = alias(&kms, &me, Op::CreateAlias, "alias/app", Some(&a))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    let e = alias(&kms, &me, Op::UpdateAlias, "alias/app", Some(&b))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.message),
        (
            ErrorKind::KmsInvalidState,
            format!(
                "{} is pending deletion.",
                kms.scope.key_arn(&b.parse().unwrap())
            )
        )
    );
    let e = alias(&kms, &me, Op::DeleteAlias, "alias/none", None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    alias(&kms, &me, Op::DeleteAlias, "alias/app", None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_store_with_keys_is_not_deleted() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    key_in(&*meta, ConnectionState::Disconnected, KeyState::Enabled).await;
    let auth = Gate::new(&me, Op::DeleteCustomKeyStore)
        .authorize(&kms, Subject::KeyStore(Some(STORE)))
        .await
        .unwrap();
    let e = kms.delete_custom_key_store(&auth, STORE).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::CustomKeyStoreHasCmks);
    let e = kms
        .delete_custom_key_store(&auth, "cks-0000000000aaaaaaa")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::CustomKeyStoreNotFound);
}

#[tokio::test]
async fn due_keys_of_a_disconnected_store_are_deleted_and_their_material_reported_orphaned() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let id = key_in(&*meta, ConnectionState::Disconnected, KeyState::Enabled).await;
    meta.create_alias(
        "alias/gone",
        &id,
        KeyState::accepted_by(model::op::Op::CreateAlias),
        0,
        50,
    )
    .await
    .unwrap();
    meta.schedule_deletion(
        &id,
        KeyState::accepted_by(model::op::Op::ScheduleKeyDeletion),
        kms.now() - 1,
        7,
    )
    .await
    .unwrap();
    assert_eq!(kms.delete_due_keys().await, 1);
    assert_eq!(meta.key(&id).await.unwrap(), None);
    let auth = Gate::new(&me, Op::ListAliases)
        .authorize(&kms, Subject::Account)
        .await
        .unwrap();
    assert!(kms
        .list_aliases(&auth, None, None, None)
        .await
        .unwrap()
        .items
        .is_empty());
}

/// `op` on the key `key` names, through the gate as the request path runs it.
async fn on_key<'c>(kms: &Kms, me: &'c Caller, op: Op, key: &str) -> KmsResult<Authorized<'c>> {
    let named = match op {
        Op::Encrypt | Op::DescribeKey => KeyNamed::any(key, &NO_CONTEXT),
        _ => KeyNamed::id(key),
    };
    let subject = match op {
        Op::PutKeyPolicy => Subject::KeyPolicy(named, false),
        _ => Subject::Key(named),
    };
    Gate::new(me, op).authorize(kms, subject).await
}

async fn describe(kms: &Kms, me: &Caller, key: &str) -> KmsResult<super::keys::KeyView> {
    kms.describe_key(&on_key(kms, me, Op::DescribeKey, key).await?)
        .await
}

async fn cancel(kms: &Kms, me: &Caller, key: &str) -> KmsResult<Uuid> {
    kms.cancel_key_deletion(&on_key(kms, me, Op::CancelKeyDeletion, key).await?)
        .await
}

/// CreateAlias, UpdateAlias or DeleteAlias through the gate.
async fn alias(kms: &Kms, me: &Caller, op: Op, name: &str, target: Option<&str>) -> KmsResult<()> {
    let auth = Gate::new(me, op)
        .authorize(kms, Subject::Alias { name, target })
        .await?;
    match op {
        Op::CreateAlias => kms.create_alias(&auth, name).await,
        Op::UpdateAlias => kms.update_alias(&auth, name).await,
        _ => kms.delete_alias(&auth, name).await,
    }
}

/// A front that names a subject of another scope than its operation's is refused before
/// anything is read or decided, even for the account root.
#[tokio::test]
async fn a_subject_of_another_scope_is_refused() {
    let (kms, meta) = kms();
    let me = kms.service_caller();
    let id = key_in(&*meta, ConnectionState::Connected, KeyState::Enabled).await;
    for (op, subject) in [
        (Op::DisableKey, Subject::Account),
        (Op::ListKeys, Subject::Key(KeyNamed::id(&id.to_string()))),
        (Op::ConnectCustomKeyStore, Subject::Account),
    ] {
        let Err(e) = Gate::new(&me, op).authorize(&kms, subject).await else {
            panic!("{op:?} authorized on a subject of another scope");
        };
        assert_eq!(e.kind, ErrorKind::KmsInternal, "{op:?}: {}", e.message);
    }
    assert_eq!(
        meta.key(&id).await.unwrap().unwrap().key_state,
        KeyState::Enabled
    );
}
