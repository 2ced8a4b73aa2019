//! Looks inside the token through PKCS#11, independently of the service: the key template,
//! and key material removed behind the service's back.
//!
//! One test function only: a process has one PKCS#11 context per module, and SoftHSM2 reads
//! SOFTHSM2_CONF once, at C_Initialize.

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use hsm_kms::proto::*;

const A: &str = "cluster-alphaclustr";

#[tokio::test]
async fn token_objects_follow_the_template_and_missing_material_is_reported() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "inspect").await;
    let key = create_key(&mut c, &store).await;
    let doomed = create_key(&mut c, &store).await;
    let ct = encrypt(&mut c, &doomed.key_id, b"orphan").await;

    // The test process's own view of the token.
    std::env::set_var("SOFTHSM2_CONF", h.softhsm2_conf());
    let p11 = Pkcs11::new(softhsm2_module()).unwrap();
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = hsm_kms::hsm::find_token(&p11, &h.cluster(0).token_label)
        .unwrap()
        .unwrap();
    let session = p11.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(PASSWORD)))
        .unwrap();

    let found = session
        .find_objects(&[Attribute::Label(key.arn.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "exactly one token object is labelled with the key ARN"
    );
    let attrs = session
        .get_attributes(
            found[0],
            &[
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Verify,
                AttributeType::Derive,
                AttributeType::Label,
                AttributeType::Id,
            ],
        )
        .unwrap();
    let expected = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::AlwaysSensitive(true),
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(key.arn.as_bytes().to_vec()),
        Attribute::Id(key.key_id.as_bytes().to_vec()),
    ];
    assert_eq!(attrs, expected);
    // The key value cannot be read out.
    let value = session
        .get_attributes(found[0], &[AttributeType::Value])
        .unwrap();
    assert!(
        value.is_empty(),
        "CKA_VALUE of a sensitive key must not be readable"
    );

    // Remove one key's material behind the service's back.
    let victim = session
        .find_objects(&[Attribute::Label(doomed.arn.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(victim.len(), 1);
    session.destroy_object(victim[0]).unwrap();
    drop(session);

    // The service notices at once (its cached handle goes stale), and again after a restart
    // (no cached handle): that key reports its missing material, the other keeps working.
    for restart in [false, true] {
        if restart {
            h.restart_with(|_| {}).await;
        }
        let mut c = h.client().await;
        assert_eq!(
            wait_settled(&mut c, &store).await,
            ("CONNECTED".into(), None)
        );
        let msg = assert_err(
            c.decrypt(DecryptRequest {
                ciphertext_blob: ct.clone(),
                ..Default::default()
            })
            .await,
            "KMSInvalidStateException",
        );
        assert!(
            msg.contains(&doomed.arn) && msg.contains("key material"),
            "{msg}"
        );
        let r = c
            .encrypt(EncryptRequest {
                key_id: doomed.key_id.clone(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await;
        assert_err(r, "KMSInvalidStateException");
        let ct2 = encrypt(&mut c, &key.key_id, b"still fine").await;
        let out = c
            .decrypt(DecryptRequest {
                ciphertext_blob: ct2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.plaintext, b"still fine");
        // The key's metadata is untouched: AWS keeps the key state when backing material goes.
        assert_eq!(
            describe_key(&mut c, &doomed.key_id).await.key_state,
            "Enabled"
        );
    }

    // A crash mid-creation leaves a row in `Creating`, with or without its token object.
    // Simulate both (the service stopped), then restart: the login removes the rows and
    // destroys the orphaned material, and neither key is ever visible.
    let with_material = uuid::Uuid::new_v4();
    let without_material = uuid::Uuid::new_v4();
    let arn = |id: &uuid::Uuid| format!("arn:aws:kms:us-east-1:111122223333:key/{id}");
    let db = h.settings.storage.sqlite_path.clone();
    let session = p11.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(PASSWORD)))
        .unwrap();
    h.restart_with(|_| {
        let conn = rusqlite::Connection::open(&db).unwrap();
        for id in [with_material, without_material] {
            conn.execute(
                "INSERT INTO keys (id, custom_key_store_id, creation_date_ms, description, key_state)
                 VALUES (?1, ?2, 0, '', 'Creating')",
                rusqlite::params![id.to_string(), store],
            )
            .unwrap();
        }
        session
            .generate_key(
                &cryptoki::mechanism::Mechanism::AesKeyGen,
                &hsm_kms::hsm::key_template(&with_material, &arn(&with_material)),
            )
            .unwrap();
    })
    .await;
    let mut c = h.client().await;
    assert_eq!(
        wait_settled(&mut c, &store).await,
        ("CONNECTED".into(), None)
    );
    // The restarted process logs in to the CONNECTED store in the background, reconciling
    // before it reports the store SERVING.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for _ in 0..100 {
        if h.health(&store).await == serving {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(h.health(&store).await, serving);
    for id in [with_material, without_material] {
        assert_err(
            c.describe_key(DescribeKeyRequest {
                key_id: id.to_string(),
                ..Default::default()
            })
            .await,
            "NotFoundException",
        );
    }
    let left: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM keys WHERE key_state = 'Creating'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    let orphans = session
        .find_objects(&[Attribute::Id(with_material.to_string().into_bytes())])
        .unwrap();
    assert!(
        orphans.is_empty(),
        "the half-made key's material must be destroyed"
    );
    let listed = c
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 2, "only the two real keys are listed");
}
