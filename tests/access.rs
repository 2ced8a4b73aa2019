//! Access control against the real binary: TLS client certificates name the callers, key
//! policies, identity policies and grants decide, the audit trail records every request in
//! a hash chain, and the kmsuser password is rotated on connect.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::*;
use hsm_kms::proto::key_management_service_client::KeyManagementServiceClient;
use hsm_kms::proto::*;
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const ACCOUNT: &str = "111122223333";
const ROOT: &str = "arn:aws:iam::111122223333:root";
const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
const BOB: &str = "arn:aws:iam::111122223333:role/app";
const CAROL: &str = "arn:aws:iam::111122223333:user/carol";
const EVE: &str = "arn:aws:iam::444455556666:user/eve";

/// Starts a TLS server whose clients must present certificates of `pki`, with the given
/// identity policies and common-name mappings.
async fn tls_server(
    pki: &Pki,
    identities: Vec<(&str, &str)>,
    names: Vec<(&str, &str)>,
    clusters: &[ClusterSpec],
) -> Harness {
    tls_server_with(pki, identities, names, clusters, |_| {}).await
}

/// As `tls_server`, with `more` applied to the config last.
async fn tls_server_with(
    pki: &Pki,
    identities: Vec<(&str, &str)>,
    names: Vec<(&str, &str)>,
    clusters: &[ClusterSpec],
    more: impl FnOnce(&mut hsm_kms::config::Settings),
) -> Harness {
    Harness::start_with(clusters, move |s| {
        use_tls(s, pki);
        s.auth.identity_policies = identities
            .into_iter()
            .map(|(principal, policy)| hsm_kms::config::IdentityPolicy {
                principal: principal.into(),
                policy: policy.into(),
            })
            .collect();
        s.auth.certificate_principals = names
            .into_iter()
            .map(|(cn, principal)| hsm_kms::config::CertificatePrincipal {
                common_name: cn.into(),
                principal: principal.into(),
            })
            .collect();
        more(s);
    })
    .await
}

async fn tls_client(
    h: &Harness,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", h.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(KeyManagementServiceClient::new(channel))
}

async fn as_principal(h: &Harness, pki: &Pki, arn: &str) -> Client {
    tls_client(h, &pki.ca_pem, Some(pki.client(Some(arn), "caller")))
        .await
        .expect("TLS connection")
}

/// (what, caller, key, encryption context, expected outcome).
type Case<'a> = (
    &'a str,
    &'a Client,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a str,
);

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// "ok" or the AWS exception name.
fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => aws_error(&s),
    }
}

async fn encrypt_as(c: &mut Client, key: &str, context: &[(&str, &str)]) -> String {
    outcome(
        c.encrypt(EncryptRequest {
            key_id: key.into(),
            plaintext: b"table secret".to_vec(),
            encryption_context: ctx(context),
            ..Default::default()
        })
        .await,
    )
}

const ALICE_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Effect":"Allow","Action":["kms:Encrypt","kms:Decrypt","kms:DescribeKey","kms:GenerateDataKey*"],
   "Resource":"arn:aws:kms:us-east-1:111122223333:key/*"},
  {"Effect":"Deny","Action":"kms:ScheduleKeyDeletion","Resource":"*"}]}"#;

const CAROL_POLICY: &str = r#"{"Statement":[
  {"Effect":"Allow","Action":["kms:ListKeys","kms:ListRetirableGrants"],"Resource":"*"},
  {"Effect":"Allow","Action":"kms:Encrypt","Resource":"*",
   "Condition":{"StringEquals":{"kms:EncryptionContext:tenant":"carol"}}}]}"#;

/// A key policy: the account (root and IAM delegation), bob with conditions, an explicit
/// deny for alice, a cross-account wildcard allow for eve.
const K2_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Sid":"Root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"},
  {"Sid":"BobPayroll","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},
   "Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*",
   "Condition":{"StringEquals":{"kms:EncryptionContext:app":"payroll"}}},
  {"Sid":"BobByAlias","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},
   "Action":"kms:GenerateDataKey","Resource":"*",
   "Condition":{"StringEquals":{"kms:RequestAlias":"alias/payroll"}}},
  {"Sid":"BobKeys","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},
   "Action":"kms:ReEncrypt*","Resource":"*",
   "Condition":{"ForAllValues:StringLike":{"kms:EncryptionContextKeys":["app","team-*"]}}},
  {"Sid":"NoAliceDecrypt","Effect":"Deny","Principal":{"AWS":"arn:aws:iam::111122223333:user/alice"},
   "Action":"kms:Decrypt","Resource":"*"},
  {"Sid":"Eve","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::444455556666:user/eve"},
   "Action":"kms:Generate*","Resource":"*"}]}"#;

/// A key policy of NotPrincipal, NotAction and NotResource statements.
const K3_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Sid":"Root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"},
  {"Sid":"BobAllButDecrypt","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},
   "NotAction":"kms:Decrypt","Resource":"*"},
  {"Sid":"OnlyTheseEncrypt","Effect":"Deny",
   "NotPrincipal":{"AWS":["111122223333","arn:aws:iam::111122223333:role/app","arn:aws:iam::111122223333:user/carol"]},
   "Action":"kms:Encrypt","Resource":"*"},
  {"Sid":"CarolOnlyElsewhere","Effect":"Deny","Principal":{"AWS":"arn:aws:iam::111122223333:user/carol"},
   "Action":"kms:Encrypt","NotResource":"arn:aws:kms:*:*:key/00000000-0000-0000-0000-000000000000"}]}"#;

/// The principals and keys the policy tests share: a TLS server with alice's and carol's
/// identity policies (carol named by her certificate's common name), a connected store,
/// k1 (default policy), k2 (K2_POLICY, alias/payroll) and k3 (K3_POLICY), and a client
/// for each principal.
struct World {
    pki: Pki,
    h: Harness,
    root: Client,
    alice: Client,
    bob: Client,
    eve: Client,
    carol: Client,
    store: String,
    k1: String,
    k2: String,
    k3: String,
}

async fn world() -> World {
    let pki = Pki::new("hsm-kms test CA");
    let h = tls_server(
        &pki,
        vec![(ALICE, ALICE_POLICY), (CAROL, CAROL_POLICY)],
        vec![("carol", CAROL)],
        &[ClusterSpec::good("cluster-accesstablea")],
    )
    .await;
    let mut root = as_principal(&h, &pki, ROOT).await;
    let alice = as_principal(&h, &pki, ALICE).await;
    let bob = as_principal(&h, &pki, BOB).await;
    let eve = as_principal(&h, &pki, EVE).await;
    // Carol's certificate has no URI SAN: her principal comes from the CN mapping.
    let carol = tls_client(&h, &pki.ca_pem, Some(pki.client(None, "carol")))
        .await
        .unwrap();

    let store = h.connected_store(&mut root, 0, "access").await;
    let k1 = create_key(&mut root, &store).await.arn;
    let k2 = root
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            policy: Some(K2_POLICY.into()),
            ..Default::default()
        })
        .await
        .expect("CreateKey with a policy")
        .into_inner()
        .key_metadata
        .unwrap()
        .arn;
    root.create_alias(CreateAliasRequest {
        alias_name: "alias/payroll".into(),
        target_key_id: k2.clone(),
    })
    .await
    .unwrap();

    // A key policy of the Not* elements: NotPrincipal exempts exactly whom it names,
    // NotAction allows all but what it names, NotResource applies everywhere but there.
    let k3 = root
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            policy: Some(K3_POLICY.into()),
            ..Default::default()
        })
        .await
        .expect("CreateKey with the Not* policy")
        .into_inner()
        .key_metadata
        .unwrap()
        .arn;

    World {
        pki,
        h,
        root,
        alice,
        bob,
        eve,
        carol,
        store,
        k1,
        k2,
        k3,
    }
}

/// Key policies and identity policies, principal by operation: allows, explicit denies,
/// conditions, delegation to the account, account-level operations; and the audit trail
/// of it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_identity_policies_decide_who_may_do_what() {
    // Every field is bound: the server and its PKI live until the test ends.
    let World {
        pki: _pki,
        h,
        mut root,
        mut alice,
        mut bob,
        mut eve,
        mut carol,
        store,
        k1,
        k2,
        k3,
    } = world().await;
    let d = "AccessDeniedException";
    // Principal x operation x policy: the expected outcome of each.
    let table: Vec<Case> = vec![
        ("root, default policy", &root, &k1, &[], "ok"),
        (
            "alice, default policy + identity allow",
            &alice,
            &k1,
            &[],
            "ok",
        ),
        ("bob, default policy, no identity policy", &bob, &k1, &[], d),
        ("eve, other account, default policy", &eve, &k1, &[], d),
        (
            "carol, identity condition met",
            &carol,
            &k1,
            &[("tenant", "carol")],
            "ok",
        ),
        (
            "carol, identity condition not met",
            &carol,
            &k1,
            &[("tenant", "dave")],
            d,
        ),
        (
            "bob, key policy condition met",
            &bob,
            &k2,
            &[("app", "payroll"), ("x", "y")],
            "ok",
        ),
        (
            "bob, key policy condition not met",
            &bob,
            &k2,
            &[("app", "hr")],
            d,
        ),
        ("bob, no context", &bob, &k2, &[], d),
        ("alice, account delegation on k2", &alice, &k2, &[], "ok"),
        (
            "eve, wildcard action does not cover Encrypt",
            &eve,
            &k2,
            &[],
            d,
        ),
        ("root, named in NotPrincipal", &root, &k3, &[], "ok"),
        (
            "bob, NotAction allow, named in NotPrincipal",
            &bob,
            &k3,
            &[],
            "ok",
        ),
        (
            "alice, NotPrincipal names the account (its root), not her",
            &alice,
            &k3,
            &[],
            d,
        ),
        (
            "carol, NotResource deny applies to every other key",
            &carol,
            &k3,
            &[("tenant", "carol")],
            d,
        ),
        (
            "carol, the same on k1 (no such deny there)",
            &carol,
            &k1,
            &[("tenant", "carol")],
            "ok",
        ),
    ];
    for (case, client, key, context, want) in table {
        assert_eq!(
            encrypt_as(&mut client.clone(), key, context).await,
            want,
            "{case}"
        );
    }

    // Explicit deny in the key policy beats alice's identity allow.
    let ct = root
        .encrypt(EncryptRequest {
            key_id: k2.clone(),
            plaintext: b"salaries".to_vec(),
            encryption_context: ctx(&[("app", "payroll")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let decrypt = |c: &mut Client, context| {
        let mut c = c.clone();
        let ct = ct.clone();
        async move {
            outcome(
                c.decrypt(DecryptRequest {
                    ciphertext_blob: ct,
                    encryption_context: ctx(context),
                    ..Default::default()
                })
                .await,
            )
        }
    };
    assert_eq!(decrypt(&mut alice, &[("app", "payroll")]).await, d);
    assert_eq!(decrypt(&mut bob, &[("app", "payroll")]).await, "ok");
    // The wrong context fails on the policy condition before the cryptography.
    assert_eq!(decrypt(&mut bob, &[("app", "hr")]).await, d);

    // A wildcard action across accounts; kms:RequestAlias.
    let gdk = |c: &mut Client, key: &str| {
        let mut c = c.clone();
        let key = key.to_string();
        async move {
            outcome(
                c.generate_data_key(GenerateDataKeyRequest {
                    key_id: key,
                    key_spec: Some("AES_256".into()),
                    ..Default::default()
                })
                .await,
            )
        }
    };
    assert_eq!(gdk(&mut eve, &k2).await, "ok", "eve kms:Generate* on k2");
    assert_eq!(gdk(&mut bob, "alias/payroll").await, "ok", "bob by alias");
    assert_eq!(gdk(&mut bob, &k2).await, d, "bob by key id");

    // ForAllValues over the context keys (ReEncrypt needs From on k2 and To on k2).
    let reencrypt = |keys: &'static [(&'static str, &'static str)]| {
        let mut c = bob.clone();
        let (ct, k2) = (ct.clone(), k2.clone());
        async move {
            outcome(
                c.re_encrypt(ReEncryptRequest {
                    ciphertext_blob: ct,
                    source_encryption_context: ctx(&[("app", "payroll")]),
                    destination_key_id: k2,
                    destination_encryption_context: ctx(keys),
                    ..Default::default()
                })
                .await,
            )
        }
    };
    assert_eq!(reencrypt(&[("team-a", "1")]).await, "ok");
    assert_eq!(reencrypt(&[("team-a", "1"), ("other", "2")]).await, d);

    // Account-level operations follow identity policies alone.
    let list = |c: &mut Client| {
        let mut c = c.clone();
        async move { outcome(c.list_keys(ListKeysRequest::default()).await) }
    };
    assert_eq!(list(&mut root).await, "ok");
    assert_eq!(list(&mut carol).await, "ok");
    assert_eq!(list(&mut alice).await, d);
    assert_eq!(
        outcome(
            alice
                .create_key(CreateKeyRequest {
                    custom_key_store_id: Some(store.clone()),
                    origin: Some("AWS_CLOUDHSM".into()),
                    ..Default::default()
                })
                .await
        ),
        d
    );
    // Alice's identity policy denies ScheduleKeyDeletion outright.
    let denied = alice
        .schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: k1.clone(),
            pending_window_in_days: Some(7),
        })
        .await
        .unwrap_err();
    assert_eq!(aws_error(&denied), d);
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains(ALICE) && denied.message().contains("explicit deny"));
    let denied_id = denied
        .metadata()
        .get("x-request-id")
        .expect("a refusal carries its request id")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(describe_key(&mut root, &k1).await.key_state, "Enabled");

    // The audit trail: every request above, allowed or denied, in an intact chain.
    drop((root, alice, bob, eve, carol));
    let mut h = h;
    assert!(h.stop(), "hsm-kms did not exit cleanly");
    let audit = h.dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 40, "{} audit lines", lines.len());
    let denied_alice = lines
        .iter()
        .find(|l| l["operation"] == "ScheduleKeyDeletion" && l["outcome"] != "intent")
        .expect("the denied ScheduleKeyDeletion is audited");
    // Its intent line came first, naming the key as the request named it.
    let intent = lines
        .iter()
        .find(|l| l["request_id"] == denied_id.as_str())
        .unwrap();
    assert_eq!(intent["outcome"], "intent", "{intent}");
    assert_eq!(intent["principal"], ALICE);
    assert_eq!(denied_alice["principal"], ALICE);
    assert_eq!(denied_alice["request_id"], denied_id.as_str());
    assert_eq!(denied_alice["outcome"], "denied");
    assert_eq!(denied_alice["error"], "AccessDeniedException");
    assert_eq!(denied_alice["resources"][0], k1.as_str());
    assert!(denied_alice["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let carol_ok = lines
        .iter()
        .find(|l| {
            l["principal"] == CAROL && l["operation"] == "Encrypt" && l["outcome"] == "allowed"
        })
        .unwrap();
    assert_eq!(carol_ok["encryption_context"]["tenant"], "carol");
    // Never plaintext or data keys.
    for secret in [
        "table secret",
        "salaries",
        "dGFibGUgc2VjcmV0",
        "c2FsYXJpZXM=",
    ] {
        assert!(!text.contains(secret), "audit holds {secret}");
    }
    assert!(!text.contains("Plaintext") && !text.contains("plaintext"));
    assert_chain(&audit, true);
    tamper_and_check(&audit);
}

/// Grants: used at once, bounded by their constraints, passed on only as strictly, retired
/// by their principals, revoked by the key's, and refused on a key that cannot take one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_allow_within_their_constraints_and_go_by_retirement_or_revocation() {
    // Every field is bound: the server and its PKI live until the test ends.
    let World {
        pki: _pki,
        h: _h,
        mut root,
        mut alice,
        mut bob,
        mut eve,
        mut carol,
        store,
        k1,
        k2: _,
        k3: _,
    } = world().await;
    let d = "AccessDeniedException";
    // Grants: bob may Encrypt and Decrypt k1 when the context holds dept=IT.
    let bob_grant = |ops: [&str; 3]| CreateGrantRequest {
        key_id: k1.clone(),
        grantee_principal: BOB.into(),
        retiring_principal: Some(CAROL.into()),
        operations: ops.into_iter().map(String::from).collect(),
        constraints: Some(GrantConstraints {
            encryption_context_subset: ctx(&[("dept", "IT")]),
            ..Default::default()
        }),
        name: Some("bob-it".into()),
        ..Default::default()
    };
    let grant = root
        .create_grant(bob_grant(["Encrypt", "Decrypt", "CreateGrant"]))
        .await
        .expect("CreateGrant")
        .into_inner();
    assert_eq!(
        encrypt_as(&mut bob, &k1, &[("dept", "IT"), ("x", "y")]).await,
        "ok"
    );
    // Usable at once, with or without its token.
    let with_token = bob
        .encrypt(EncryptRequest {
            key_id: k1.clone(),
            plaintext: b"table secret".to_vec(),
            encryption_context: ctx(&[("dept", "IT")]),
            grant_tokens: vec![grant.grant_token.clone()],
            ..Default::default()
        })
        .await;
    assert_eq!(outcome(with_token), "ok");
    assert_eq!(encrypt_as(&mut bob, &k1, &[("dept", "HR")]).await, d);
    assert_eq!(encrypt_as(&mut bob, &k1, &[]).await, d);
    assert_eq!(
        outcome(
            bob.describe_key(DescribeKeyRequest {
                key_id: k1.clone(),
                grant_tokens: vec![grant.grant_token.clone()],
            })
            .await
        ),
        d,
        "DescribeKey is not a granted operation"
    );
    // Same name, same terms: the same grant.
    let again = root
        .create_grant(bob_grant(["Decrypt", "CreateGrant", "Encrypt"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.grant_id, grant.grant_id);
    // Bob may pass on part of his grant, never more, and only as strictly constrained.
    let child = |ops: Vec<&str>, subset: &[(&str, &str)]| CreateGrantRequest {
        key_id: k1.clone(),
        grantee_principal: EVE.into(),
        operations: ops.into_iter().map(String::from).collect(),
        constraints: Some(GrantConstraints {
            encryption_context_subset: ctx(subset),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        outcome(
            bob.create_grant(child(vec!["Decrypt"], &[("dept", "IT"), ("y", "z")]))
                .await
        ),
        "ok"
    );
    assert_eq!(
        outcome(
            bob.create_grant(child(vec!["DescribeKey"], &[("dept", "IT")]))
                .await
        ),
        d
    );
    assert_eq!(
        outcome(bob.create_grant(child(vec!["Decrypt"], &[])).await),
        d
    );
    // Alice has no CreateGrant permission at all.
    assert_eq!(
        outcome(
            alice
                .create_grant(child(vec!["Decrypt"], &[("dept", "IT")]))
                .await
        ),
        d
    );
    // Bad input.
    assert_eq!(
        outcome(root.create_grant(child(vec!["Sign"], &[])).await),
        "ValidationException"
    );
    assert_eq!(
        outcome(
            bob.encrypt(EncryptRequest {
                key_id: k1.clone(),
                plaintext: b"x".to_vec(),
                grant_tokens: vec!["garbage".into()],
                ..Default::default()
            })
            .await
        ),
        "InvalidGrantTokenException"
    );

    let grants = root
        .list_grants(ListGrantsRequest {
            key_id: k1.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 2);
    let mine = grants
        .iter()
        .find(|g| g.grant_id == grant.grant_id)
        .unwrap();
    assert_eq!(mine.grantee_principal, BOB);
    assert_eq!(mine.operations, ["CreateGrant", "Decrypt", "Encrypt"]);
    assert_eq!(
        outcome(
            alice
                .list_grants(ListGrantsRequest {
                    key_id: k1.clone(),
                    ..Default::default()
                })
                .await
        ),
        d
    );
    let retirable = carol
        .list_retirable_grants(ListRetirableGrantsRequest {
            retiring_principal: CAROL.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(retirable.len(), 1);
    // Only the retiring principal (or the grantee with RetireGrant, or the account) retires.
    assert_eq!(
        outcome(
            eve.retire_grant(RetireGrantRequest {
                grant_token: Some(grant.grant_token.clone()),
                ..Default::default()
            })
            .await
        ),
        d
    );
    carol
        .retire_grant(RetireGrantRequest {
            grant_token: Some(grant.grant_token.clone()),
            ..Default::default()
        })
        .await
        .expect("retiring principal retires");
    assert_eq!(
        encrypt_as(&mut bob, &k1, &[("dept", "IT")]).await,
        d,
        "retired"
    );
    // The child grant goes by revocation.
    let child_id = grants
        .iter()
        .find(|g| g.grant_id != grant.grant_id)
        .unwrap()
        .grant_id
        .clone();
    assert_eq!(
        outcome(
            alice
                .revoke_grant(RevokeGrantRequest {
                    key_id: k1.clone(),
                    grant_id: child_id.clone(),
                    dry_run: None
                })
                .await
        ),
        d
    );
    root.revoke_grant(RevokeGrantRequest {
        key_id: k1.clone(),
        grant_id: child_id.clone(),
        dry_run: None,
    })
    .await
    .unwrap();
    assert_eq!(
        outcome(
            root.revoke_grant(RevokeGrantRequest {
                key_id: k1.clone(),
                grant_id: child_id,
                dry_run: None
            })
            .await
        ),
        "NotFoundException"
    );

    // As AWS's key-state table: a Disabled key takes no new grant (DisabledException), nor
    // one pending deletion (KMSInvalidStateException).
    let k3 = create_key(&mut root, &store).await.arn;
    root.disable_key(DisableKeyRequest { key_id: k3.clone() })
        .await
        .unwrap();
    let to_eve = |key: &str| CreateGrantRequest {
        key_id: key.into(),
        grantee_principal: EVE.into(),
        operations: vec!["Decrypt".into()],
        ..Default::default()
    };
    assert_eq!(
        outcome(root.create_grant(to_eve(&k3)).await),
        "DisabledException"
    );
    root.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: k3.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    assert_eq!(
        outcome(root.create_grant(to_eve(&k3)).await),
        "KMSInvalidStateException"
    );
}

/// The policy lockout safety check, on PutKeyPolicy and CreateKey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lockout_check_keeps_a_key_policy_changeable() {
    // Every field is bound: the server and its PKI live until the test ends.
    let World {
        pki: _pki,
        h: _h,
        mut root,
        mut alice,
        mut bob,
        eve: _eve,
        carol: _carol,
        store,
        k1,
        k2: _,
        k3: _,
    } = world().await;
    let d = "AccessDeniedException";
    // The policy lockout safety check.
    let only_bob = r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},"Action":"kms:*","Resource":"*"}]}"#;
    let put = |bypass: Option<bool>, policy: &str| PutKeyPolicyRequest {
        key_id: k1.clone(),
        policy_name: Some("default".into()),
        policy: policy.into(),
        bypass_policy_lockout_safety_check: bypass,
    };
    assert_eq!(
        outcome(root.put_key_policy(put(None, only_bob)).await),
        "MalformedPolicyDocumentException"
    );
    assert_eq!(
        outcome(root.put_key_policy(put(None, "{not json")).await),
        "MalformedPolicyDocumentException"
    );
    assert_eq!(
        outcome(alice.put_key_policy(put(Some(true), only_bob)).await),
        d
    );
    root.put_key_policy(put(Some(true), only_bob))
        .await
        .expect("bypassing the check");
    assert_eq!(
        outcome(
            root.put_key_policy(put(Some(true), &default_policy()))
                .await
        ),
        d,
        "root locked itself out, as AWS warns"
    );
    assert_eq!(encrypt_as(&mut bob, &k1, &[]).await, "ok");
    assert_eq!(encrypt_as(&mut root, &k1, &[]).await, d);
    // A CreateKey policy that locks the caller out is refused unless bypassed.
    assert_eq!(
        outcome(
            root.create_key(CreateKeyRequest {
                custom_key_store_id: Some(store.clone()),
                origin: Some("AWS_CLOUDHSM".into()),
                policy: Some(only_bob.into()),
                ..Default::default()
            })
            .await
        ),
        "MalformedPolicyDocumentException"
    );
}

fn default_policy() -> String {
    format!(
        r#"{{"Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{ACCOUNT}:root"}},"Action":"kms:*","Resource":"*"}}]}}"#
    )
}

/// Runs `hsm-kms audit verify` and checks its verdict.
fn assert_chain(file: &Path, intact: bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
        .args(["audit", "verify"])
        .arg(file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.success(), intact, "{said}");
    assert!(
        said.contains(if intact {
            "chain intact"
        } else {
            "chain broken"
        }),
        "{said}"
    );
}

/// A removed, an altered and a reordered line each break the chain.
fn tamper_and_check(file: &Path) {
    let good = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let write = |ls: Vec<String>| std::fs::write(file, ls.join("\n") + "\n").unwrap();
    let all = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();

    let mut removed = all();
    removed.remove(5);
    write(removed);
    assert_chain(file, false);

    let mut altered = all();
    altered[7] = altered[7]
        .replace("\"denied\"", "\"allowed\"")
        .replace("\"failed\"", "\"allowed\"");
    altered[7] = altered[7].replace("127.0.0.1", "10.0.0.9");
    write(altered);
    assert_chain(file, false);

    let mut reordered = all();
    reordered.swap(3, 4);
    write(reordered);
    assert_chain(file, false);

    std::fs::write(file, &good).unwrap();
    assert_chain(file, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_unknown_missing_and_expired_certificates() {
    let pki = Pki::new("hsm-kms test CA");
    let h = tls_server(&pki, vec![], vec![], &[]).await;
    let ok = |c: Result<Client, tonic::transport::Error>| async move {
        let mut c = c.ok()?;
        c.list_keys(ListKeysRequest::default()).await.ok()
    };
    // A refusal for the reason given (the TLS alert the server sent, as the client saw it),
    // not any failure (a client-side PEM error, a crash); and a good client served after.
    let refused = |c: Result<Client, tonic::transport::Error>, why: &'static str| {
        let h = &h;
        let pki = &pki;
        async move {
            let mut c = c.expect("the client connects lazily; a connect error is the test's own");
            let e = c
                .list_keys(ListKeysRequest::default())
                .await
                .expect_err("served without a good certificate");
            // The alert, or, when the client was still writing as the server closed, the
            // connection's end: the server's refusal either way, never a client-side error.
            let seen = format!("{e:?}");
            let closed = [
                "BrokenPipe",
                "UnexpectedEof",
                "ConnectionReset",
                "connection closed",
            ]
            .iter()
            .any(|k| seen.contains(k));
            assert!(
                seen.contains(why) || closed,
                "refused for another reason than {why}: {seen}"
            );
            let good = tls_client(h, &pki.ca_pem, Some(pki.client(Some(ROOT), "root"))).await;
            assert!(
                ok(good).await.is_some(),
                "a good client after refusing {why}"
            );
        }
    };
    // Connections that never start their handshake, and one that stops halfway through its
    // ClientHello, do not hold up the clients behind them (handshakes run side by side).
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(
            tokio::net::TcpStream::connect(h.addr.as_str())
                .await
                .unwrap(),
        );
    }
    let mut half = tokio::net::TcpStream::connect(h.addr.as_str())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    stalled.push(half);
    // A good certificate works, and (a liveness bound, not a speed one) before the server's
    // 10 s handshake timeout could have freed a listener that waited on the stalled ones.
    let good = tokio::time::timeout(std::time::Duration::from_secs(9), async {
        ok(tls_client(&h, &pki.ca_pem, Some(pki.client(Some(ROOT), "root"))).await).await
    });
    let served = good.await;
    assert!(served
        .expect("stalled handshakes held up a good client")
        .is_some());
    // Signed by another CA.
    let other = Pki::new("someone else's CA");
    let c = tls_client(&h, &pki.ca_pem, Some(other.client(Some(ROOT), "root"))).await;
    refused(c, "UnknownCA").await;
    // No client certificate.
    refused(
        tls_client(&h, &pki.ca_pem, None).await,
        "CertificateRequired",
    )
    .await;
    // Expired.
    let c = tls_client(&h, &pki.ca_pem, Some(pki.expired_client(ROOT))).await;
    refused(c, "CertificateExpired").await;
    // Plaintext to a TLS port.
    let plaintext_works =
        match KeyManagementServiceClient::connect(format!("http://{}", h.addr)).await {
            Ok(mut c) => c.list_keys(ListKeysRequest::default()).await.is_ok(),
            Err(_) => false,
        };
    assert!(!plaintext_works);
    // A certificate of the right CA that names no principal: refused with the connection,
    // closed right after the handshake, before any stream can be opened (the server's log
    // says why).
    let c = tls_client(&h, &pki.ca_pem, Some(pki.client(None, "nobody"))).await;
    refused(c, "peer closed connection").await;
    drop(stalled);
}

/// Plaintext is refused off loopback and when the config does not ask for it.
#[test]
fn plaintext_needs_loopback_and_consent() {
    let dir = tempfile::tempdir().unwrap();
    let key = "[[auth.access_keys]]\naccess_key_id = \"AKIAPLAINTEXT0000001\"\n\
               secret_env = \"HOME\"\nprincipal = \"arn:aws:iam::111122223333:root\"\n";
    for (listen, aws, allow, more, why) in [
        ("0.0.0.0:0", "", true, "", "loopback"),
        ("127.0.0.1:0", "", false, "", "no TLS configured"),
        // The AWS protocol: plaintext HTTP under the same rule, and never without keys.
        (
            "127.0.0.1:0",
            "aws_listen = \"0.0.0.0:0\"",
            true,
            key,
            "plaintext HTTP is allowed only on a loopback",
        ),
        (
            "127.0.0.1:0",
            "aws_listen = \"127.0.0.1:0\"",
            true,
            "",
            "auth.access_keys is empty",
        ),
    ] {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"{listen}\"\n{aws}\n[auth]\nallow_plaintext_loopback = {allow}\n{more}\
                 [storage]\nsqlite_path = \"{0}/m.db\"\n[security]\nsealing_key_file = \"{0}/s.key\"\n\
                 [audit]\nfile = \"{0}/a.jsonl\"\n[admin]\nenabled = false\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_hsm-kms"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(why), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsuser_password_is_rotated_on_connect_and_survives_a_crash_midway() {
    let mut h = Harness::start_with(&[ClusterSpec::faulty("cluster-rotationabcd")], |s| {
        s.security.rotate_kmsuser_password = true;
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "rotating").await;
    let key = create_key(&mut c, &store).await.arn;
    // Only the service knows the password now.
    assert!(
        !h.pin_works(0, PASSWORD),
        "the original password still logs in"
    );
    disconnect(&mut c, &store).await;
    assert_eq!(connect(&mut c, &store).await, ("CONNECTED".into(), None));
    encrypt(&mut c, &key, b"after rotation").await;

    // A crash between the token's change and its record: C_SetPIN takes effect, then fails.
    h.set_faults("fault = general_error\nfunctions = C_SetPIN\nafter_call = true\n");
    disconnect(&mut c, &store).await;
    assert_eq!(connect(&mut c, &store).await, ("CONNECTED".into(), None));
    h.set_faults("");
    disconnect(&mut c, &store).await;
    assert_eq!(
        connect(&mut c, &store).await,
        ("CONNECTED".into(), None),
        "the pending password of the interrupted rotation logs in"
    );
    encrypt(&mut c, &key, b"after a crash midway").await;

    // And after a restart.
    drop(c);
    h.restart_with(|_| {}).await;
    let mut c = h.client().await;
    assert_eq!(wait_settled(&mut c, &store).await.0, "CONNECTED");
    encrypt(&mut c, &key, b"after restart").await;
    // The sealed passwords never reach the audit trail or the metadata in clear.
    let meta = std::fs::read(h.dir.path().join("metadata.sqlite3")).unwrap();
    assert!(!meta
        .windows(PASSWORD.len())
        .any(|w| w == PASSWORD.as_bytes()));
}

/// The attacks on who the caller is: a principal whose name ends in `:root`, NotPrincipal
/// naming the account, a bare key id or alias from another account, and grants without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_are_exact_and_grants_are_bounded() {
    let pki = Pki::new("hsm-kms test CA");
    let h = tls_server(
        &pki,
        vec![(ALICE, ALICE_POLICY)],
        vec![],
        &[ClusterSpec::good("cluster-exactaaaaaaa")],
    )
    .await;
    let mut root = as_principal(&h, &pki, ROOT).await;
    let store = h.connected_store(&mut root, 0, "exact").await;
    let key = create_key(&mut root, &store).await;
    let ciphertext = encrypt(&mut root, &key.key_id, b"root's secret").await;

    // Names that end in ":root" are not the account root: no call of theirs succeeds.
    for hostile in [
        "arn:aws:iam::111122223333:user/mallory:root",
        "arn:aws:iam::111122223333:role/app/x:root",
    ] {
        let client = tls_client(&h, &pki.ca_pem, Some(pki.client(Some(hostile), "mallory"))).await;
        let Ok(mut m) = client else { continue };
        let calls = [
            outcome(m.list_keys(ListKeysRequest::default()).await),
            outcome(
                m.decrypt(DecryptRequest {
                    ciphertext_blob: ciphertext.clone(),
                    ..Default::default()
                })
                .await,
            ),
            outcome(
                m.disable_key(DisableKeyRequest {
                    key_id: key.key_id.clone(),
                })
                .await,
            ),
            outcome(
                m.create_key(CreateKeyRequest {
                    custom_key_store_id: Some(store.clone()),
                    origin: Some("AWS_CLOUDHSM".into()),
                    ..Default::default()
                })
                .await,
            ),
        ];
        assert!(!calls.iter().any(|c| c == "ok"), "{hostile}: {calls:?}");
    }
    assert_eq!(
        describe_key(&mut root, &key.key_id).await.key_state,
        "Enabled"
    );

    // NotPrincipal naming the account exempts its root only: alice is denied.
    let mut alice = as_principal(&h, &pki, ALICE).await;
    assert_eq!(encrypt_as(&mut alice, &key.key_id, &[]).await, "ok");
    let deny_all_but_root = format!(
        r#"{{"Statement":[
          {{"Effect":"Allow","Principal":{{"AWS":"{ROOT}"}},"Action":"kms:*","Resource":"*"}},
          {{"Effect":"Deny","NotPrincipal":{{"AWS":"{ROOT}"}},"Action":"kms:*","Resource":"*"}}]}}"#
    );
    root.put_key_policy(PutKeyPolicyRequest {
        key_id: key.key_id.clone(),
        policy: deny_all_but_root,
        ..Default::default()
    })
    .await
    .expect("PutKeyPolicy");
    assert_eq!(
        encrypt_as(&mut alice, &key.key_id, &[]).await,
        "AccessDeniedException"
    );
    assert_eq!(encrypt_as(&mut root, &key.key_id, &[]).await, "ok");

    // Another account, allowed by the key policy, must name the key by its ARN.
    let cross = format!(
        r#"{{"Statement":[
          {{"Effect":"Allow","Principal":{{"AWS":"{ROOT}"}},"Action":"kms:*","Resource":"*"}},
          {{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::444455556666:root"}},"Action":"kms:Encrypt","Resource":"*"}}]}}"#
    );
    root.put_key_policy(PutKeyPolicyRequest {
        key_id: key.key_id.clone(),
        policy: cross,
        ..Default::default()
    })
    .await
    .expect("PutKeyPolicy");
    root.create_alias(CreateAliasRequest {
        alias_name: "alias/exact".into(),
        target_key_id: key.key_id.clone(),
    })
    .await
    .expect("CreateAlias");
    let mut other = as_principal(&h, &pki, "arn:aws:iam::444455556666:root").await;
    assert_eq!(
        encrypt_as(&mut other, &key.key_id, &[]).await,
        "NotFoundException"
    );
    assert_eq!(
        encrypt_as(&mut other, "alias/exact", &[]).await,
        "NotFoundException"
    );
    assert_eq!(encrypt_as(&mut other, &key.arn, &[]).await, "ok");

    // At most 500 grants per grantee on a key.
    let grant = |grantee: &str| CreateGrantRequest {
        key_id: key.key_id.clone(),
        grantee_principal: grantee.into(),
        operations: vec!["Encrypt".into()],
        ..Default::default()
    };
    for i in 0..500 {
        root.create_grant(grant(ALICE))
            .await
            .unwrap_or_else(|e| panic!("grant {i}: {e:?}"));
    }
    let over = root.create_grant(grant(ALICE)).await.unwrap_err();
    assert_eq!(aws_error(&over), "LimitExceededException", "{over:?}");
    assert_eq!(outcome(root.create_grant(grant(BOB)).await), "ok");
}

/// The encryption context is bounded (pairs and bytes), and a costly wildcard in a policy
/// cannot stall other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_contexts_are_bounded_and_wildcards_cost_little() {
    let pki = Pki::new("hsm-kms test CA");
    let h = tls_server(
        &pki,
        vec![],
        vec![],
        &[ClusterSpec::good("cluster-contextaaaaa")],
    )
    .await;
    let mut root = as_principal(&h, &pki, ROOT).await;
    let store = h.connected_store(&mut root, 0, "context").await;
    let key = create_key(&mut root, &store).await.key_id;
    // A Deny with a 24,000-character StringLike pattern, which the backtracking matcher
    // took pattern x text steps for, and one whose matches fit in a context, to see that
    // matching still matches. Together just under the 32 KiB policy limit.
    let pattern = format!("*{}b*", "a?".repeat(12_000));
    let fits = format!("*{}b*", "a?".repeat(2_000));
    let policy = format!(
        r#"{{"Statement":[
          {{"Effect":"Allow","Principal":{{"AWS":"{ROOT}"}},"Action":"kms:*","Resource":"*"}},
          {{"Effect":"Deny","Principal":"*","Action":"kms:Encrypt","Resource":"*",
            "Condition":{{"StringLike":{{"kms:EncryptionContext:v":"{pattern}"}}}}}},
          {{"Effect":"Deny","Principal":"*","Action":"kms:Encrypt","Resource":"*",
            "Condition":{{"StringLike":{{"kms:EncryptionContext:w":"{fits}"}}}}}}]}}"#
    );
    root.put_key_policy(PutKeyPolicyRequest {
        key_id: key.clone(),
        policy,
        ..Default::default()
    })
    .await
    .expect("PutKeyPolicy");
    let big = "a".repeat(1 << 20);
    let at_bound = "a".repeat(8192 - 1);
    let pairs: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Two hostile Encrypts at once, and a good client beside them.
    let hostile = |ctx: Vec<(&'static str, String)>| {
        let mut c = root.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let r = c
                .encrypt(EncryptRequest {
                    key_id: key,
                    plaintext: b"x".to_vec(),
                    encryption_context: ctx.into_iter().map(|(k, v)| (k.into(), v)).collect(),
                    ..Default::default()
                })
                .await;
            outcome(r)
        })
    };
    let h1 = hostile(vec![("v", big.clone())]);
    let h2 = hostile(vec![("v", big)]);
    let good = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        encrypt_as(&mut root.clone(), &key, &[("app", "good")]),
    )
    .await;
    assert_eq!(
        good.as_deref(),
        Ok("ok"),
        "a good client during the hostile Encrypts"
    );
    assert_eq!(h1.await.unwrap(), "ValidationException");
    assert_eq!(h2.await.unwrap(), "ValidationException");
    assert_eq!(
        encrypt_as(&mut root, &key, &many).await,
        "ValidationException"
    );
    // At the bound (8,192 bytes of keys and values) the request is evaluated and allowed.
    assert_eq!(encrypt_as(&mut root, &key, &[("v", &at_bound)]).await, "ok");
    // And the Deny still bites.
    let matching = format!("x{}b", "aZ".repeat(2000));
    assert_eq!(
        encrypt_as(&mut root, &key, &[("w", &matching)]).await,
        "AccessDeniedException"
    );
    let near_miss = format!("x{}c", "aZ".repeat(2000));
    assert_eq!(
        encrypt_as(&mut root, &key, &[("w", &near_miss)]).await,
        "ok"
    );
}

/// A TLS connection to `addr` that trusts `ca_pem`, presenting `identity` if given; HTTP/1.1.
fn tls_stream(
    addr: &str,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap())
}

const ALICE_KEY: (&str, &str) = (
    "AKIAALICEALICE000001",
    "alice-secret-0123456789abcdefghijklmnop",
);

/// The AWS protocol over TLS: the gRPC listener's server certificate; no client certificate
/// needed (the access key names the caller, and policies see that principal); a presented
/// certificate must chain to the client CA and name the same principal.
#[tokio::test]
async fn aws_protocol_over_tls_names_the_signer_and_checks_a_presented_certificate() {
    let pki = Pki::new("aws test CA");
    let h = tls_server_with(&pki, vec![], vec![], &[], |s| {
        let dir = s.storage.sqlite_path.parent().unwrap().to_path_buf();
        let secret = dir.join("alice.secret");
        std::fs::write(&secret, format!("{}\n", ALICE_KEY.1)).unwrap();
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        s.auth.access_keys = vec![hsm_kms::config::AccessKeySettings {
            access_key_id: ALICE_KEY.0.into(),
            secret_file: Some(secret),
            secret_env: None,
            principal: ALICE.into(),
        }];
    })
    .await;
    let now = std::time::SystemTime::now();
    let signed = |body: &str| {
        aws_headers(
            &h.aws,
            "ListKeys",
            body.as_bytes(),
            Some(ALICE_KEY),
            "us-east-1",
            now,
        )
    };

    // The AWS SDK over HTTPS, trusting the CA: alice, who has no identity policy, is
    // refused ListKeys as AWS refuses a principal without one.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .tls_context(
            aws_smithy_http_client::tls::TlsContext::builder()
                .with_trust_store(
                    aws_smithy_http_client::tls::TrustStore::empty()
                        .with_native_roots(false)
                        .with_pem_certificate(pki.ca_pem.as_bytes()),
                )
                .build()
                .unwrap(),
        )
        .build_https();
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .endpoint_url(format!(
            "https://localhost:{}",
            h.aws.rsplit(':').next().unwrap()
        ))
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            ALICE_KEY.0,
            ALICE_KEY.1,
            None,
            None,
            "test",
        ))
        .http_client(http)
        .build();
    let sdk = aws_sdk_kms::Client::from_conf(config);
    use aws_sdk_kms::error::ProvideErrorMetadata;
    let e = sdk.list_keys().send().await.unwrap_err();
    assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
    assert!(e.message().unwrap_or_default().contains(ALICE), "{e:?}");

    // No certificate: the signature names alice.
    let (status, _, body) = http1_post(tls_stream(&h.aws, &pki.ca_pem, None), &signed("{}"), b"{}");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("AccessDeniedException"))
    );
    // A certificate naming alice, signed by alice: the same answer.
    let alice_cert = Some(pki.client(Some(ALICE), "alice"));
    let (_, _, body) = http1_post(
        tls_stream(&h.aws, &pki.ca_pem, alice_cert),
        &signed("{}"),
        b"{}",
    );
    assert!(
        body["message"].as_str().unwrap().contains("not authorized"),
        "{body}"
    );
    // A certificate naming bob with alice's signature: refused for the mismatch.
    let bob_cert = Some(pki.client(Some(BOB), "bob"));
    let (_, _, body) = http1_post(
        tls_stream(&h.aws, &pki.ca_pem, bob_cert),
        &signed("{}"),
        b"{}",
    );
    assert_eq!(body["__type"], "AccessDeniedException");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("client certificate names"),
        "{body}"
    );
    // A certificate from another CA: no TLS session, no answer.
    let other = Pki::new("another CA").client(Some(ALICE), "alice");
    let mut s = tls_stream(&h.aws, &pki.ca_pem, Some(other));
    let mut answer = Vec::new();
    let r = s
        .write_all(b"POST / HTTP/1.1\r\nconnection: close\r\n\r\n")
        .and_then(|_| s.read_to_end(&mut answer));
    assert!(
        r.is_err() || answer.is_empty(),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// An HTTP/2 connection over TLS to `addr`, trusting `ca_pem`, with no client certificate
/// (the AWS listener does not require one).
async fn tls_h2_connection(addr: &str, ca_pem: &str) -> h2::client::SendRequest<bytes::Bytes> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Over TLS without a client certificate, as the tester went at it: 40 connections, each
/// with as many header-only unsigned HTTP/2 streams as the server allows. They hold no
/// request slot: a signed request (HTTP/1.1 over TLS, on a new connection) is answered
/// within 2 s while all are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_over_tls_header_only_streams_hold_no_request_slot() {
    let pki = Pki::new("aws flood CA");
    let h = tls_server_with(&pki, vec![], vec![], &[], |s| {
        let dir = s.storage.sqlite_path.parent().unwrap().to_path_buf();
        let secret = dir.join("root.secret");
        std::fs::write(&secret, format!("{}\n", ROOT_KEY.1)).unwrap();
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        s.auth.access_keys = vec![hsm_kms::config::AccessKeySettings {
            access_key_id: ROOT_KEY.0.into(),
            secret_file: Some(secret),
            secret_env: None,
            principal: ROOT.into(),
        }];
    })
    .await;
    let signed_list_keys = || {
        let (addr, ca) = (h.aws.clone(), pki.ca_pem.clone());
        async move {
            let call = tokio::task::spawn_blocking(move || {
                let headers = aws_headers(
                    &addr,
                    "ListKeys",
                    b"{}",
                    Some(ROOT_KEY),
                    "us-east-1",
                    std::time::SystemTime::now(),
                );
                http1_post(tls_stream(&addr, &ca, None), &headers, b"{}").0
            });
            tokio::time::timeout(std::time::Duration::from_secs(2), call).await
        }
    };
    assert_eq!(signed_list_keys().await.unwrap().unwrap(), 200);
    let unsigned = aws_headers(
        &h.aws,
        "ListKeys",
        b"{}",
        None,
        "us-east-1",
        std::time::SystemTime::now(),
    );
    let mut held = Vec::new();
    for _ in 0..40 {
        let send = tls_h2_connection(&h.aws, &pki.ca_pem).await;
        held.push(headers_only_streams(send, &h.aws, &unsigned, 128).await);
    }
    let opened: usize = held.iter().map(Vec::len).sum();
    // The attack happened: 40 connections opened their streams, far more than the 512
    // request slots.
    assert!(opened >= 40 * 100, "{opened} streams opened");
    for i in 0..5 {
        let answered = signed_list_keys().await;
        assert!(
            matches!(answered, Ok(Ok(200))),
            "good client {i} during the attack ({opened} streams held): {answered:?}"
        );
    }
    drop(held);
}
