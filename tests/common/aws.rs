//! The AWS protocol front: a server with two access keys, the AWS SDK for Rust against it,
//! signed raw requests, and the raw HTTP/2 streams a hostile client opens.

use super::*;

/// The headers of an AWS protocol request for `target` with `body`, signed as the AWS SDKs
/// sign (aws-sigv4) with `key` for `region` at `at`; unsigned when `key` is None. `target`
/// is an operation of AWS's (`TrentService.` is put before it) or a whole target.
pub fn aws_headers(
    host: &str,
    target: &str,
    body: &[u8],
    key: Option<(&str, &str)>,
    region: &str,
    at: std::time::SystemTime,
) -> Vec<(String, String)> {
    let target = match target.contains('.') {
        true => target.to_string(),
        false => format!("TrentService.{target}"),
    };
    let headers = [
        ("host", host),
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target.as_str()),
    ];
    match key {
        Some((id, secret)) => {
            hsm_kms::api::aws::sigv4::sign_post(&headers, body, id, secret, region, at).unwrap()
        }
        None => headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    }
}

/// The X-Amz-Target of `op`: AWS's prefix, or hsm-kms's for its own operations.
pub fn target_of(op: hsm_kms::model::op::Op) -> String {
    match op.extension() {
        true => format!("HsmKms.{}", op.name()),
        false => format!("TrentService.{}", op.name()),
    }
}

/// An AWS protocol answer: HTTP status, headers (names in lower case), JSON body.
pub type AwsAnswer = (
    u16,
    std::collections::HashMap<String, String>,
    serde_json::Value,
);

/// One HTTP/1.1 `POST /` over `stream` with `headers` and `body`; the connection closes.
pub fn http1_post(
    stream: impl Read + Write,
    headers: &[(String, String)],
    body: &[u8],
) -> AwsAnswer {
    http1_request(stream, "POST", "/", headers, body)
}

/// One HTTP/1.1 request of `method` to `path` over `stream`; the connection closes.
pub fn http1_request(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> AwsAnswer {
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    // A TLS peer may close without close_notify after the response: keep what arrived.
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    (
        status,
        headers,
        serde_json::from_str(body).unwrap_or_default(),
    )
}

pub const ROOT_KEY: (&str, &str) = (
    "AKIAROOTROOTROOT0001",
    "root-secret-0123456789abcdefghijklmnopqr",
);
pub const BOB_KEY: (&str, &str) = (
    "AKIABOBBOBBOBBOB0002",
    "bob-secret-0123456789abcdefghijklmnopqrst",
);
pub const ROOT: &str = "arn:aws:iam::111122223333:root";
pub const BOB: &str = "arn:aws:iam::111122223333:user/bob";
pub const STORE: &str = "aws-store";
pub const REGION: &str = "us-east-1";

/// The environment that carries the test access keys' secrets (`add_access_keys`).
pub fn access_key_env() -> Vec<(&'static str, String)> {
    vec![
        ("TEST_ROOT_SECRET", ROOT_KEY.1.to_string()),
        ("TEST_BOB_SECRET", BOB_KEY.1.to_string()),
    ]
}

/// The root's and bob's access keys in `s`, their secrets from `access_key_env`.
pub fn add_access_keys(s: &mut Settings) {
    for (id, var, principal) in [
        (ROOT_KEY.0, "TEST_ROOT_SECRET", ROOT),
        (BOB_KEY.0, "TEST_BOB_SECRET", BOB),
    ] {
        s.auth.access_keys.push(hsm_kms::config::AccessKeySettings {
            access_key_id: id.into(),
            secret_file: None,
            secret_env: Some(var.into()),
            principal: principal.into(),
        });
    }
}

/// A server with the AWS protocol on a free port, two access keys (the root's and bob's,
/// their secrets from the environment), and `kms.default_custom_key_store` naming STORE.
pub async fn aws_server(clusters: &[ClusterSpec]) -> Harness {
    let options = Options {
        env: access_key_env(),
        ..Default::default()
    };
    Harness::start_opts(clusters, options, |s| {
        s.server.aws_listen = Some("127.0.0.1:0".parse().unwrap());
        s.kms.default_custom_key_store = Some(STORE.into());
        add_access_keys(s);
    })
    .await
}

pub fn sdk_in(h: &Harness, key: (&str, &str), region: &str) -> aws_sdk_kms::Client {
    sdk_at(&h.aws, key, region)
}

/// The AWS SDK for the AWS protocol listener at `addr` (plaintext), signing with `key`.
pub fn sdk_at(addr: &str, key: (&str, &str), region: &str) -> aws_sdk_kms::Client {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(Credentials::new(key.0, key.1, None, None, "test"))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

pub fn sdk(h: &Harness, key: (&str, &str)) -> aws_sdk_kms::Client {
    sdk_in(h, key, REGION)
}

/// The exception name and message of a failed call.
pub fn refusal<E: ProvideErrorMetadata, R>(r: Result<R, E>) -> (String, String) {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => (
            e.code().unwrap_or("<no code>").to_string(),
            e.message().unwrap_or("").to_string(),
        ),
    }
}

/// The STORE on cluster 0, created and connected through the AWS protocol.
pub async fn aws_connected_store(h: &Harness, c: &aws_sdk_kms::Client) -> String {
    let id = c
        .create_custom_key_store()
        .custom_key_store_name(STORE)
        .cloud_hsm_cluster_id(&h.cluster(0).id)
        .trust_anchor_certificate(&h.anchors[0])
        .key_store_password(PASSWORD)
        .send()
        .await
        .unwrap()
        .custom_key_store_id
        .unwrap();
    c.connect_custom_key_store()
        .custom_key_store_id(&id)
        .send()
        .await
        .unwrap();
    for _ in 0..300 {
        let stores = c
            .describe_custom_key_stores()
            .custom_key_store_id(&id)
            .send()
            .await
            .unwrap();
        let state = stores.custom_key_stores()[0]
            .connection_state()
            .unwrap()
            .as_str()
            .to_string();
        if state == "CONNECTED" {
            return id;
        }
        assert!(state == "CONNECTING", "store state {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store did not connect");
}

/// A key in the STORE on cluster 0, made through the AWS protocol.
pub async fn aws_connected_key(h: &Harness, c: &aws_sdk_kms::Client) -> String {
    aws_connected_store(h, c).await;
    let made = c.create_key().send().await.unwrap();
    made.key_metadata.unwrap().key_id
}

/// A raw HTTP/2 connection (prior knowledge, plaintext), as a hostile client drives it.
pub async fn h2_connection(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A stream the attacker keeps open: the request half and the answer it may get.
pub type Held = (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>);

/// Opens up to `streams` streams on `send`, an HTTP/2 connection to the AWS listener at
/// `addr`, each sending the headers of a request with `headers` (and no Host: HTTP/2 names
/// it in :authority) and then nothing: no body, never the end of the request.
pub async fn headers_only_streams(
    send: h2::client::SendRequest<bytes::Bytes>,
    addr: &str,
    headers: &[(String, String)],
    streams: usize,
) -> Vec<Held> {
    let mut held = Vec::new();
    for _ in 0..streams {
        let ready = tokio::time::timeout(Duration::from_millis(500), send.clone().ready()).await;
        let Ok(Ok(mut ready)) = ready else { break };
        let mut req = http::Request::post(format!("http://{addr}/"));
        for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
            req = req.header(n.as_str(), v.as_str());
        }
        let Ok(sent) = ready.send_request(req.body(()).unwrap(), false) else {
            break;
        };
        held.push(sent);
    }
    held
}

/// The id of the custom key store named `name`, as `c` describes it.
pub async fn store_id_named(c: &aws_sdk_kms::Client, name: &str) -> String {
    c.describe_custom_key_stores()
        .custom_key_store_name(name)
        .send()
        .await
        .unwrap()
        .custom_key_stores()[0]
        .custom_key_store_id()
        .unwrap()
        .to_string()
}
