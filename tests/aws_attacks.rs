//! The AWS protocol front against an attacker on loopback, as a tester without credentials
//! (or with an access key ID but no secret) would go at it: what such a client can make the
//! server hold (request slots, connections, audit lines), and what a signature must cover
//! and how strictly a request is read. Each test first asserts that the attack happened
//! (streams opened, bytes sent), then that the defence held.

mod common;

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kms::primitives::Blob;
use common::*;
use tokio::io::AsyncWriteExt as _;

/// How long a good client may take to be served while an attack goes on. Served without
/// the defence, it waits for the attack's body deadlines (10 s each, queued) or for ever.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

/// The open-files limit of the test process, raised to its hard limit: floods hold
/// thousands of sockets.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// ListKeys through the SDK, on a new connection, within SERVED_WITHIN.
async fn served(h: &Harness) -> Result<(), String> {
    let c = sdk(h, ROOT_KEY);
    match tokio::time::timeout(SERVED_WITHIN, c.list_keys().send()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("refused: {e:?}")),
        Err(_) => Err(format!("no answer within {SERVED_WITHIN:?}")),
    }
}

/// 100 HTTP/2 connections, each opening as many streams as the server lets it, every
/// stream sending only its headers: half unsigned, half carrying a real access key ID with
/// a made-up signature (what someone who saw a key ID but not its secret can send). None
/// of them may hold a request slot: a good client is served at once while all are open, and
/// the metrics show where the attack's requests wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_only_streams_hold_no_request_slot() {
    raise_open_files();
    let h = aws_server(&[ClusterSpec::good("cluster-awsattackaaa")]).await;
    served(&h).await.expect("before the attack");
    let unsigned = aws_headers(&h.aws, "ListKeys", b"{}", None, REGION, SystemTime::now());
    let mut with_key_id = aws_headers(
        &h.aws,
        "ListKeys",
        b"{}",
        Some(ROOT_KEY),
        REGION,
        SystemTime::now(),
    );
    // The key ID and scope are real; the signature is not (the secret is not known).
    for (n, v) in with_key_id.iter_mut() {
        if n == "authorization" {
            let (head, _) = v.split_once("Signature=").unwrap();
            *v = format!("{head}Signature={}", "0".repeat(64));
        }
    }
    let streams_per_connection = 128;
    let mut held = Vec::new();
    let mut opened = [0usize; 2];
    for i in 0..100 {
        let headers = if i % 2 == 0 { &unsigned } else { &with_key_id };
        let send = h2_connection(&h.aws).await;
        let streams = headers_only_streams(send, &h.aws, headers, streams_per_connection).await;
        opened[i % 2] += streams.len();
        held.push(streams);
    }
    eprintln!(
        "opened {} unsigned and {} key-ID streams",
        opened[0], opened[1]
    );
    // The attack happened: every connection opened its streams (the server allows 128 at
    // once per connection), far more than the 512 request slots.
    assert!(
        opened[0] >= 50 * 100,
        "unsigned streams opened: {}",
        opened[0]
    );
    assert!(
        opened[1] >= 50 * 100,
        "key-ID streams opened: {}",
        opened[1]
    );
    // A good client, on new connections, is served while every stream is held.
    for i in 0..5 {
        served(&h)
            .await
            .unwrap_or_else(|e| panic!("good client {i} during the attack: {e}"));
    }
    // The key-ID streams are being read (their bodies awaited under the body deadline), not
    // served: the metrics show where they wait.
    let mut gauges = (0.0, 0.0);
    for _ in 0..30 {
        let m = h.metrics();
        gauges = (
            metric(&m, "hsm_kms_aws_requests{stage=\"reading\"}").expect("the reading gauge"),
            metric(&m, "hsm_kms_aws_requests{stage=\"serving\"}").expect("the serving gauge"),
        );
        if gauges.0 >= 0.9 * opened[1] as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (reading, serving) = gauges;
    eprintln!("metrics during the attack: reading {reading}, serving {serving}");
    assert!(
        reading >= 0.9 * opened[1] as f64,
        "reading {reading} of {} streams",
        opened[1]
    );
    assert!(serving <= 1.0, "serving {serving}");
    // The unsigned streams were refused at once, without their bodies.
    let mut refused = 0;
    for (response, _) in held
        .iter_mut()
        .step_by(2)
        .flat_map(|c| c.iter_mut())
        .take(200)
    {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), &mut *response).await {
            assert_eq!(r.status(), 400);
            refused += 1;
        }
    }
    assert_eq!(refused, 200, "unsigned streams answered");
    drop(held);
}

/// 1,100 connections that send the 33 bytes of an HTTP/2 preface and SETTINGS, and nothing
/// more, to each listener (AWS and gRPC): they made no authenticated request, so they give
/// way, and a good client is served within SERVED_WITHIN on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preface_only_connections_give_way() {
    let limit = raise_open_files();
    assert!(
        limit >= 6000,
        "open-files hard limit {limit}: the flood needs 4,400 sockets"
    );
    let h = aws_server(&[ClusterSpec::good("cluster-awsprefaceaa")]).await;
    let mut grpc = h.client().await;
    grpc.list_keys(hsm_kms::proto::ListKeysRequest::default())
        .await
        .expect("before the flood");
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    assert_eq!(preface.len(), 33);
    let mut flood = Vec::new();
    let mut sent = 0usize;
    for addr in [&h.aws, &h.addr] {
        for _ in 0..1100 {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr.as_str()).await else {
                continue;
            };
            if s.write_all(preface).await.is_ok() {
                sent += 1;
            }
            flood.push(s);
        }
    }
    // The attack happened: 2,200 connections, each with its preface sent.
    assert_eq!(sent, 2200, "prefaces sent");
    let m = h.metrics();
    let evicted = metric(&m, "hsm_kms_connections_evicted_total").unwrap_or(0.0);
    eprintln!("connections evicted so far: {evicted}");
    for i in 0..3 {
        served(&h)
            .await
            .unwrap_or_else(|e| panic!("AWS client {i} during the flood: {e}"));
        let url = format!("http://{}", h.addr);
        let call = async {
            let mut c = Client::connect(url)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            c.list_keys(hsm_kms::proto::ListKeysRequest::default())
                .await
                .map_err(|s| format!("{s:?}"))
        };
        match tokio::time::timeout(SERVED_WITHIN, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("gRPC client {i} during the flood: {e}"),
            Err(_) => panic!("gRPC client {i}: no answer within {SERVED_WITHIN:?}"),
        }
    }
    let evicted = metric(&h.metrics(), "hsm_kms_connections_evicted_total").unwrap_or(0.0);
    // At the least, the connections over each listener's cap of 1,024 had to give way.
    assert!(evicted >= 2.0 * 76.0, "{evicted} connections evicted");
    drop(flood);
}

/// 1,100 HTTP/1.1 connections to the AWS listener that send the start of a request (the
/// request line and one header) and then nothing, slowloris-style: they made no
/// authenticated request, so they give way, and a good client is served within
/// SERVED_WITHIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_http1_requests_give_way() {
    let limit = raise_open_files();
    assert!(
        limit >= 3000,
        "open-files hard limit {limit}: the flood needs 2,200 sockets"
    );
    let h = aws_server(&[ClusterSpec::good("cluster-awsslowloris")]).await;
    served(&h).await.expect("before the flood");
    let start = format!("POST / HTTP/1.1\r\nhost: {}\r\n", h.aws);
    let mut flood = Vec::new();
    let mut sent = 0usize;
    for _ in 0..1100 {
        let Ok(mut s) = tokio::net::TcpStream::connect(h.aws.as_str()).await else {
            continue;
        };
        if s.write_all(start.as_bytes()).await.is_ok() {
            sent += 1;
        }
        flood.push(s);
    }
    // The attack happened: every connection sent its partial request.
    assert_eq!(sent, 1100, "partial requests sent");
    for i in 0..3 {
        served(&h)
            .await
            .unwrap_or_else(|e| panic!("good client {i} during the flood: {e}"));
    }
    let evicted = metric(&h.metrics(), "hsm_kms_connections_evicted_total").unwrap_or(0.0);
    assert!(evicted >= 76.0, "{evicted} connections evicted");
    drop(flood);
}

/// Signed requests wait for a request slot at most header_timeout_seconds, then are
/// answered ThrottlingException: with 2 slots held by Encrypts that the HSM takes 3 s to
/// answer, a third signed request is refused after the 1 s wait, and the two are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_request_slot_has_a_deadline() {
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    let h = Harness::start_opts(
        &[ClusterSpec::faulty("cluster-awsslotwait")],
        options,
        |s| {
            s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
            s.server.max_inflight_requests = 2;
            s.server.header_timeout_seconds = 1;
            // The HSM's 3 s stall below is an answer, not a timeout.
            s.hsm.call_timeout_ms = 10_000;
            s.kms.default_custom_key_store = Some(STORE.into());
            add_access_keys(s);
        },
    )
    .await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    h.set_faults("delay_ms = 3000\ndelay_functions = C_Encrypt\n");
    let slow = |c: aws_sdk_kms::Client, key: String| async move {
        c.encrypt()
            .key_id(key)
            .plaintext(Blob::new(b"slow".to_vec()))
            .send()
            .await
    };
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(slow(c.clone(), key.clone())))
        .collect();
    // Both slots taken: the metrics say so before the third request is sent.
    let mut serving = 0.0;
    for _ in 0..100 {
        serving = metric(&h.metrics(), "hsm_kms_aws_requests{stage=\"serving\"}").unwrap_or(0.0);
        if serving >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(serving, 2.0, "the two slow requests hold both slots");
    // The SDK retries throttling on its own; one attempt shows the answer.
    let once = aws_sdk_kms::Client::from_conf(
        c.config()
            .to_builder()
            .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled())
            .build(),
    );
    let (code, message) = refusal(once.list_keys().send().await);
    assert_eq!(code, "ThrottlingException", "{message}");
    assert!(message.contains("no request slot"), "{message}");
    for r in held {
        r.await.unwrap().expect("a slow Encrypt that held a slot");
    }
    h.set_faults("");
    c.list_keys().send().await.unwrap();
}

/// The audit lines of refusals, from the server's own file.
fn refusal_lines(h: &Harness) -> Vec<serde_json::Value> {
    audit_lines(h)
        .into_iter()
        .filter(|l| l["error"] == "MissingAuthenticationTokenException")
        .collect()
}

/// Unsigned Encrypts with an 8 KiB encryption context, from one source and then from 64
/// loopback addresses: their refusals are recorded without the context, each with its
/// source, and at most at the documented rate; what is left out is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_requests_cannot_fill_the_audit_trail() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsauditflo")]).await;
    let before = std::fs::metadata(&h.settings.audit.file).unwrap().len();
    let marker = "attacker-chosen-".repeat(512);
    let body = format!(
        r#"{{"KeyId":"alias/x","Plaintext":"AA==","EncryptionContext":{{"a":"{marker}"}}}}"#
    );
    assert!(body.len() > 8 * 1024);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut refused = 0u64;
    for i in 0..1280u32 {
        // 20 from each of 64 addresses, then more from the first.
        let source = std::net::Ipv4Addr::new(127, 0, 1, (i / 20 % 64) as u8 + 1);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let mut s = socket.connect(h.aws.parse().unwrap()).await.unwrap();
        let request = format!(
            "POST / HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-amz-json-1.1\r\n\
             x-amz-target: TrentService.Encrypt\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            h.aws,
            body.len()
        );
        s.write_all(request.as_bytes()).await.unwrap();
        sent += 1;
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer)
            .await
            .unwrap();
        if String::from_utf8_lossy(&answer).contains("MissingAuthenticationTokenException") {
            refused += 1;
        }
    }
    let took = started.elapsed();
    // The attack happened: every request was sent, and refused.
    assert_eq!((sent, refused), (1280, 1280));
    // A signed request after the flood, so that the writer has caught up when we look.
    let c = sdk(&h, ROOT_KEY);
    let id = c.list_keys().send().await.unwrap();
    let _ = audit_line(
        &h,
        aws_sdk_kms::operation::RequestId::request_id(&id).unwrap(),
    )
    .await;
    let lines = refusal_lines(&h);
    let grown = std::fs::metadata(&h.settings.audit.file).unwrap().len() - before;
    eprintln!(
        "{sent} unsigned requests in {took:?}: {} refusal lines, audit file +{grown} bytes",
        lines.len()
    );
    // The documented bound: a burst of 200 lines, then 50 a second, over all sources.
    let bound = 200 + (50.0 * took.as_secs_f64()).ceil() as usize;
    assert!(
        lines.len() <= bound,
        "{} refusal lines, bound {bound}",
        lines.len()
    );
    assert!(lines.len() >= 20, "{} refusal lines", lines.len());
    for l in &lines {
        assert!(l.get("encryption_context").is_none(), "{l}");
        let source = l["source"]
            .as_str()
            .unwrap_or_else(|| panic!("no source: {l}"));
        assert!(source.starts_with("127.0.1."), "{l}");
        assert!(l["principal"].is_null(), "{l}");
    }
    assert!(
        !std::fs::read_to_string(&h.settings.audit.file)
            .unwrap()
            .contains("attacker-chosen"),
        "request content in the audit trail"
    );
    assert!(grown < 1024 * bound as u64, "audit file grew {grown} bytes");
    let unrecorded = metric(
        &h.metrics(),
        "hsm_kms_unauthenticated_refusals_unrecorded_total",
    )
    .expect("the unrecorded refusals counter");
    assert_eq!(unrecorded as usize, 1280 - lines.len());
    assert!(
        !h.log().contains("attacker-chosen"),
        "request content in the log"
    );
}

/// A DescribeKey signed over host and x-amz-date only, replayed by someone on the path as
/// DisableKey: refused, and the key stays enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_target_cannot_be_replaced() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsreplayaaa")]).await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    let body = format!(r#"{{"KeyId":"{key}"}}"#);
    let mut headers = hsm_kms::api::aws::sigv4::sign_post(
        &[("host", h.aws.as_str())],
        body.as_bytes(),
        ROOT_KEY.0,
        ROOT_KEY.1,
        REGION,
        SystemTime::now(),
    )
    .unwrap();
    let auth = &headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .unwrap()
        .1;
    assert!(auth.contains("SignedHeaders=host;x-amz-date,"), "{auth}");
    headers.push(("content-type".into(), "application/x-amz-json-1.1".into()));
    let mut as_describe = headers.clone();
    as_describe.push(("x-amz-target".into(), "TrentService.DescribeKey".into()));
    for target in ["DisableKey", "ScheduleKeyDeletion"] {
        let mut replayed = headers.clone();
        replayed.push(("x-amz-target".into(), format!("TrentService.{target}")));
        let stream = std::net::TcpStream::connect(&h.aws).unwrap();
        let (status, _, answer) = http1_post(stream, &replayed, body.as_bytes());
        assert_eq!(
            (status, answer["__type"].as_str()),
            (400, Some("InvalidSignatureException")),
            "{target}: {answer}"
        );
        assert_eq!(
            answer["message"],
            "'X-Amz-Target' must be a 'SignedHeader' in the AWS Authorization."
        );
    }
    let stream = std::net::TcpStream::connect(&h.aws).unwrap();
    let (status, _, _) = http1_post(stream, &as_describe, body.as_bytes());
    assert_eq!(status, 400, "the original request is refused too");
    let meta = c
        .describe_key()
        .key_id(&key)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    assert_eq!(meta.key_state().unwrap().as_str(), "Enabled");
}

/// A signed request whose members have the wrong JSON type: the answer names the member,
/// never the value, and neither does the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_named_never_echoed() {
    let h = aws_server(&[ClusterSpec::good("cluster-awstypesaaaa")]).await;
    let now = SystemTime::now();
    let cases = [
        (
            "Encrypt",
            r#"{"KeyId":"alias/x","Plaintext":4111111111119999}"#,
            "Plaintext",
            "4111111111119999",
        ),
        (
            "CreateCustomKeyStore",
            r#"{"CustomKeyStoreName":"s","KeyStorePassword":55512345678}"#,
            "KeyStorePassword",
            "55512345678",
        ),
        ("ListKeys", r#"{"Limit":"77665544"}"#, "Limit", "77665544"),
        (
            "DescribeKey",
            r#"{"KeyId":33445566778899}"#,
            "KeyId",
            "33445566778899",
        ),
    ];
    for (target, body, member, value) in cases {
        let headers = aws_headers(&h.aws, target, body.as_bytes(), Some(ROOT_KEY), REGION, now);
        let stream = std::net::TcpStream::connect(&h.aws).unwrap();
        let (status, _, answer) = http1_post(stream, &headers, body.as_bytes());
        assert_eq!(
            (status, answer["__type"].as_str()),
            (400, Some("SerializationException")),
            "{answer}"
        );
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(&format!("'{member}'")), "{message}");
        assert!(!message.contains(value), "{message}");
        assert!(!h.log().contains(value), "{value} in the log");
    }
}

/// null stands for absent for lists and maps as for scalars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_lists_and_maps_mean_absent() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsnullsaaaa")]).await;
    let c = sdk(&h, ROOT_KEY);
    aws_connected_store(&h, &c).await;
    let now = SystemTime::now();
    let post = |target: &str, body: &str| {
        let headers = aws_headers(&h.aws, target, body.as_bytes(), Some(ROOT_KEY), REGION, now);
        let stream = std::net::TcpStream::connect(&h.aws).unwrap();
        http1_post(stream, &headers, body.as_bytes())
    };
    let (status, _, key) = post("CreateKey", r#"{"Tags":null,"Description":null}"#);
    assert_eq!(status, 200, "{key}");
    let key = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let (status, _, answer) = post(
        "Encrypt",
        &format!(
            r#"{{"KeyId":"{key}","Plaintext":"AA==","EncryptionContext":null,"GrantTokens":null}}"#
        ),
    );
    assert_eq!(status, 200, "{answer}");
    let blob = answer["CiphertextBlob"].as_str().unwrap();
    let plain = c
        .decrypt()
        .ciphertext_blob(Blob::new(base64_decode(blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.plaintext().unwrap().as_ref(), &[0u8]);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// What a lenient reader would take and a proxy on the way might read otherwise: each is
/// refused as AWS refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_are_refused() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsstrictaaa")]).await;
    let now = SystemTime::now();
    let body = br#"{"Limit":1}"#;
    let good = aws_headers(&h.aws, "ListKeys", body, Some(ROOT_KEY), REGION, now);
    let send = |headers: &[(String, String)], body: &[u8]| {
        let stream = std::net::TcpStream::connect(&h.aws).unwrap();
        http1_post(stream, headers, body)
    };
    let kind = |a: &AwsAnswer| a.2["__type"].as_str().unwrap_or("").to_string();
    assert_eq!(send(&good, body).0, 200);
    let auth = good
        .iter()
        .find(|(n, _)| n == "authorization")
        .unwrap()
        .1
        .clone();
    let replace = |name: &str, value: Option<&str>| -> Vec<(String, String)> {
        let mut h: Vec<(String, String)> =
            good.iter().filter(|(n, _)| n != name).cloned().collect();
        if let Some(v) = value {
            h.push((name.to_string(), v.to_string()));
        }
        h
    };
    // Two Authorization headers, the good one first.
    let mut two = good.clone();
    two.push(("authorization".into(), auth.replace(ROOT_KEY.0, BOB_KEY.0)));
    assert_eq!(kind(&send(&two, body)), "IncompleteSignatureException");
    // A parameter given twice.
    let twice = replace(
        "authorization",
        Some(&format!("{auth}, Signature={}", "0".repeat(64))),
    );
    assert_eq!(kind(&send(&twice, body)), "IncompleteSignatureException");
    // SignedHeaders out of order.
    let listed = auth
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let mut names: Vec<&str> = listed.split(';').collect();
    names.reverse();
    let unsorted = replace(
        "authorization",
        Some(&auth.replace(listed, &names.join(";"))),
    );
    assert_eq!(kind(&send(&unsorted, body)), "InvalidSignatureException");
    // A payload hash that is not the body's.
    let mut claimed = good.clone();
    claimed.push(("x-amz-content-sha256".into(), "ab".repeat(32)));
    assert_eq!(kind(&send(&claimed, body)), "InvalidSignatureException");
    // No Content-Type, or another one.
    assert_eq!(
        kind(&send(&replace("content-type", None), body)),
        "UnknownOperationException"
    );
    assert_eq!(
        kind(&send(
            &replace("content-type", Some("application/json")),
            body
        )),
        "UnknownOperationException"
    );
    // AWS reserves alias/aws/ in any case, answering NotAuthorizedException.
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    for name in ["alias/aws/x", "alias/AWS/x", "alias/Aws/y"] {
        let r = c
            .create_alias()
            .alias_name(name)
            .target_key_id(&key)
            .send()
            .await;
        let (code, _) = refusal(r);
        assert_eq!(code, "NotAuthorizedException", "{name}");
    }
    let aliases = c.list_aliases().send().await.unwrap();
    assert!(aliases.aliases().is_empty(), "{aliases:?}");
}
