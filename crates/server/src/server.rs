//! Wiring: the gRPC server with health and reflection, the admin (metrics) listener,
//! configuration reload on SIGHUP, start-up resume, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::Service;
use crate::config::Settings;
use crate::kms::Kms;
use crate::proto::key_management_service_server::KeyManagementServiceServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::transport::Clients;

/// HTTP/2 flow-control windows: how much a client may send ahead on one stream and on one
/// connection before the server has read it. The largest request fits one stream window.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 512 * 1024;
/// Request headers (gRPC metadata) per request.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How often a replica compares its HSM logins with the stores' shared states.
const STATE_FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// File descriptors kept for everything but client connections: the audit and metadata
/// files, the admin listener's clients, HSM sockets, logs.
const RESERVED_DESCRIPTORS: u64 = 256;

/// `configured`, lowered to what the file descriptor limit leaves for client connections.
fn connection_cap(configured: usize) -> usize {
    let soft = crate::limits::open_files();
    let room = soft.saturating_sub(RESERVED_DESCRIPTORS).max(16) as usize;
    if configured > room {
        tracing::warn!(
            configured,
            allowed = room,
            open_files_limit = soft,
            "server.max_connections lowered to fit the open-files limit (raise LimitNOFILE)"
        );
    }
    configured.min(room)
}

/// A started server: its addresses and the task that runs it until shutdown.
pub struct Running {
    pub kms: Arc<Kms>,
    pub addr: SocketAddr,
    /// The admin (metrics) listener, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The AWS KMS protocol listener, when configured.
    pub aws_addr: Option<SocketAddr>,
    /// The XKS proxy API listener's address, when server.xks_listen is set.
    pub xks_addr: Option<SocketAddr>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Binds, resumes stores that were connected, and serves until `shutdown` completes; then
/// in-flight requests finish and every HSM connection is closed and logged out. With
/// `config_file`, SIGHUP reloads the clusters (HSM inventory) from it.
pub async fn start(
    settings: &Settings,
    kms: Arc<Kms>,
    config_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("binding {}", settings.server.listen))?;
    let addr = listener.local_addr()?;
    let aws_listener = match settings.server.aws_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding server.aws_listen {a}"))?,
        ),
        None => None,
    };
    let aws_addr = aws_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let xks_listener = match settings.server.xks_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding server.xks_listen {a}"))?,
        ),
        None => None,
    };
    let xks_addr = xks_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    // Set when shutdown begins: /readyz says so, and load balancers stop sending.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (admin_addr, admin) = if settings.admin.enabled {
        let (addr, task) = spawn_admin(
            settings.admin.listen,
            Arc::clone(&kms),
            Arc::clone(&stopping),
        )
        .await?;
        (Some(addr), Some(task))
    } else {
        (None, None)
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<KeyManagementServiceServer<Service>>()
        .await;
    // Each store reports under its id: SERVING while CONNECTED and its HSM answers.
    kms.publish_health().await;
    tokio::spawn(feed_health(kms.health(), health.clone()));
    // grpcurl and other tools may speak either reflection version. google.rpc is registered
    // so that tools can decode the ErrorInfo in error details.
    let descriptors = [
        FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for d in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(d);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(d);
    }
    let reflection_v1 = v1.build_v1()?;
    let reflection_v1alpha = v1alpha.build_v1alpha()?;

    // The trail first: a start on a cut file is refused before anything else happens.
    let replica = settings.audit.replica.clone();
    let recorded = kms
        .audit_heads()
        .await
        .map_err(|e| anyhow::anyhow!("reading the recorded audit heads: {e}"))?
        .into_iter()
        .find(|r| r.replica == replica);
    let audit = Arc::new(crate::audit::Audit::open(
        &settings.audit.file,
        kms.scope.clone(),
        settings.audit.fsync,
        &replica,
        recorded.as_ref().map(|r| (r.seq, r.head.clone())),
    )?);
    if let Err(e) = refuse_a_short_audit_file(&audit, &settings.audit, recorded.as_ref()) {
        audit.close();
        return Err(e);
    }
    kms.resume().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let deletion = kms.spawn_deletion_task(Duration::from_secs(
        settings.lifecycle.deletion_check_interval_seconds,
    ));
    // Other replicas connect and disconnect stores: follow them (log in or out here).
    let follower = kms.spawn_state_follower(STATE_FOLLOW_INTERVAL);
    let usage = kms.spawn_usage_flusher();

    let auth = Arc::new(crate::api::auth::Authenticator::new(settings)?);
    let heads = spawn_audit_head_recorder(&kms, &audit, &replica);
    let failures = crate::api::failures::spawn_flusher();
    let (stop_xks, stopping_xks) = tokio::sync::watch::channel(false);
    let xks = match xks_listener {
        Some(listener) => Some(spawn_xks(
            settings,
            listener,
            crate::api::path::RequestPath::new(Arc::clone(&kms), Arc::clone(&audit)),
            stopping_xks,
        )?),
        None => None,
    };
    let reload = spawn_reload_on_sighup(
        Arc::clone(&kms),
        config_file,
        Arc::clone(&audit),
        xks.as_ref().map(|(front, _)| Arc::clone(front)),
    );
    let xks = xks.map(|(_, task)| task);
    let tls = if settings.tls.enabled() {
        Some(tls_config(&settings.tls, Clients::Certified).context("configuring TLS")?)
    } else {
        tracing::warn!(%addr, "plaintext gRPC without client authentication (auth.allow_plaintext_loopback)");
        None
    };
    let (stop_aws, stopping_aws) = tokio::sync::watch::channel(false);
    let aws = match aws_listener {
        Some(listener) => Some(spawn_aws(
            settings,
            listener,
            crate::api::path::RequestPath::new(Arc::clone(&kms), Arc::clone(&audit)),
            Arc::clone(&auth),
            stopping_aws,
        )?),
        None => None,
    };
    // Bounds on what a client can make the server hold before it is authenticated (see
    // deploy/hsm-kms.example.toml): streams per connection, the flow-control windows (bytes
    // buffered per stream and per connection), header size, and requests in flight over all
    // connections. A request waiting for the in-flight limit is not read, so the memory of
    // request bodies is at most max_inflight_requests x MAX_REQUEST_BYTES.
    let server = &settings.server;
    // The gRPC connections no request has proven yet (plaintext only; see `limits` below).
    let unproven: crate::transport::Unproven = Default::default();
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(server.max_concurrent_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            server.max_inflight_requests.max(1),
        ))
        .layer(crate::api::protocol::ProtocolErrorsLayer::new(
            Arc::clone(&audit),
            Arc::clone(&auth),
            Arc::clone(&unproven),
        ))
        .layer(crate::transport::body_deadline(Duration::from_secs(
            server.header_timeout_seconds.max(1),
        )))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            KeyManagementServiceServer::new(Service::new(
                Arc::clone(&kms),
                Arc::clone(&auth),
                Arc::clone(&audit),
            ))
            .max_decoding_message_size(crate::api::MAX_REQUEST_BYTES),
        );
    let kms_for_task = Arc::clone(&kms);
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = Duration::from_secs(settings.server.drain_seconds);
    let signal = async move {
        shutdown.await;
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        if !drain.is_zero() {
            tracing::info!(?drain, "unready; serving on while load balancers notice");
            tokio::time::sleep(drain).await;
        }
        let _ = stop_aws.send(true);
        let _ = stop_xks.send(true);
        let _ = stopping_tx.send(());
    };
    // A connection is pending (and gives way to new ones) until it is proven: over TLS by
    // its client certificate, in plaintext by its first KMS request.
    let limits = crate::transport::Limits {
        max_connections: connection_cap(settings.server.max_connections),
        proof: if tls.is_some() {
            crate::transport::Proof::Handshake
        } else {
            crate::transport::Proof::Request
        },
        unproven: tls.is_none().then(|| Arc::clone(&unproven)),
        ..crate::transport::Limits::of(&settings.server)
    };
    let task = tokio::spawn(async move {
        // TCP_NODELAY: without it, a request split over several writes waits on Nagle's
        // algorithm against the peer's delayed ACK (a 40 ms floor per call, measured).
        // `Coalesced`: one write per response instead of two (see `transport`).
        use crate::transport::{first_bytes, incoming, tls_handshake};
        let serve: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match tls {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                incoming(
                    listener,
                    limits,
                    tls_handshake(tokio_rustls::TlsAcceptor::from(tls), move |der| {
                        auth.principal(Some(der)).map(drop).map_err(|e| e.message)
                    }),
                ),
                signal,
            )),
            None => Box::pin(
                router
                    .serve_with_incoming_shutdown(incoming(listener, limits, first_bytes), signal),
            ),
        };
        let deadline = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        // Both listeners finish their requests (the AWS one stops with the same signal).
        let both = async move {
            let r = serve.await;
            if let Some(aws) = aws {
                let _ = aws.await;
            }
            if let Some(xks) = xks {
                let _ = xks.await;
            }
            r
        };
        tokio::select! {
            r = both => r?,
            _ = deadline => tracing::warn!(?grace, "shutdown grace period over; dropping the remaining connections"),
        }
        // The background tasks end here, and are waited for: one still running when the
        // runtime shuts down (it may be inside a blocking call when aborted) would start a
        // timer then and panic ("the runtime is being shut down").
        let background = [deletion, follower, usage, reload, failures, heads]
            .into_iter()
            .chain(admin);
        for task in background {
            task.abort();
            let _ = task.await;
        }
        tracing::info!("server stopped; closing HSM connections");
        kms_for_task.shutdown().await;
        let closed = Arc::clone(&audit);
        tokio::task::spawn_blocking(move || closed.close()).await?;
        // The last lines' head, so that a cut after a clean stop shows in `audit verify`.
        record_audit_head(&kms_for_task, &audit, &replica).await;
        Ok(())
    });
    tracing::info!(%addr, "hsm-kms listening");
    Ok(Running {
        kms,
        addr,
        admin_addr,
        aws_addr,
        xks_addr,
        task,
    })
}

/// The AWS KMS protocol listener: TLS with the gRPC listener's certificate (client
/// certificates optional), or plaintext on loopback under the same rule as gRPC; the
/// same connection limits; callers named by the access keys' signatures.
fn spawn_aws(
    settings: &Settings,
    listener: TcpListener,
    path: crate::api::path::RequestPath,
    auth: Arc<crate::api::auth::Authenticator>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use crate::api::aws::{signed::Signed, sigv4, Front};
    use crate::api::MAX_REQUEST_BYTES;
    let mut keys = std::collections::HashMap::new();
    for k in &settings.auth.access_keys {
        let principal = model::principal::Principal::parse(&k.principal)
            .with_context(|| format!("{} is not an IAM principal ARN", k.principal))?;
        keys.insert(
            k.access_key_id.clone(),
            sigv4::AccessKey::new(k.secret()?, Arc::new(principal)),
        );
    }
    let verifier = sigv4::Verifier::new(sigv4::SERVICE, settings.account.region.clone(), keys);
    let signed = Signed::new(verifier, auth, &settings.server, MAX_REQUEST_BYTES);
    let router = crate::api::aws::router(Arc::new(Front::new(path, signed)));
    serve_http(
        settings,
        listener,
        router,
        Clients::MayCertify,
        "AWS KMS protocol",
        stop,
    )
}

/// Serves `router` on `listener` (named `what` in the log): TLS with the [tls] certificate
/// and client certificates as `clients` says, or plaintext (on loopback, as the settings'
/// check allows); the listeners' connection limits and HTTP bounds.
fn serve_http(
    settings: &Settings,
    listener: TcpListener,
    router: axum::Router,
    clients: Clients,
    what: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let bounds = crate::http::Bounds {
        header_timeout: Duration::from_secs(settings.server.header_timeout_seconds.max(1)),
        max_concurrent_streams: settings.server.max_concurrent_streams,
    };
    let limits = crate::transport::Limits {
        max_connections: connection_cap(settings.server.max_connections),
        ..crate::transport::Limits::of(&settings.server)
    };
    let addr = listener.local_addr()?;
    let task = if settings.tls.enabled() {
        let tls = tls_config(&settings.tls, clients).context("configuring TLS")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let incoming = crate::transport::incoming(listener, limits, move |tcp| {
            let accept = acceptor.accept(tcp);
            async move { Ok(crate::transport::Coalesced(accept.await?)) }
        });
        tokio::spawn(crate::http::serve(router, incoming, bounds, stop))
    } else {
        tracing::warn!(%addr, listener = what, "plaintext HTTP listener (auth.allow_plaintext_loopback)");
        let incoming = crate::transport::incoming(listener, limits, crate::transport::first_bytes);
        tokio::spawn(crate::http::serve(router, incoming, bounds, stop))
    };
    tracing::info!(%addr, "{what} listening");
    Ok(task)
}

/// The XKS proxy API listener: TLS with the server certificate (with xks.client_subjects,
/// mutual TLS: a client certificate of those subjects, chained to tls.client_ca_file, or no
/// handshake), or plaintext on loopback under the same rule as the other listeners; the
/// same connection, header, body and in-flight bounds as the AWS listener; callers named by
/// the XKS credentials' signatures.
fn spawn_xks(
    settings: &Settings,
    listener: TcpListener,
    path: crate::api::path::RequestPath,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Arc<crate::api::xks::Front>, tokio::task::JoinHandle<()>)> {
    use crate::api::aws::{signed::Signed, sigv4};
    use crate::api::MAX_REQUEST_BYTES;
    let (keys, prefixes) = crate::api::xks::credentials(settings)?;
    let verifier = sigv4::Verifier::xks(settings.account.region.clone(), keys);
    let auth = Arc::new(crate::api::auth::Authenticator::new(settings)?);
    let signed =
        Signed::new(verifier, auth, &settings.server, MAX_REQUEST_BYTES).certificates_by_subject();
    let front = Arc::new(crate::api::xks::Front::new(
        path, signed, prefixes, settings,
    ));
    let router = crate::api::xks::router(Arc::clone(&front));
    let clients = match settings.xks.client_subjects.is_empty() {
        true => Clients::MayCertify,
        false => Clients::Subjects(settings.xks.client_subjects.clone()),
    };
    let task = serve_http(settings, listener, router, clients, "XKS proxy API", stop)?;
    Ok((front, task))
}

/// The server certificate and key, and the CA every client certificate must chain to.
/// rustls refuses clients without a certificate, with one from another CA, or with one
/// outside its validity period, before any request is read.
fn tls_config(
    tls: &crate::config::TlsSettings,
    clients: Clients,
) -> anyhow::Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>> {
    let read = |p: &Option<PathBuf>, what: &str| -> anyhow::Result<Vec<u8>> {
        let p = p
            .as_ref()
            .with_context(|| format!("tls.{what} is not set"))?;
        std::fs::read(p).with_context(|| format!("reading tls.{what} {}", p.display()))
    };
    crate::transport::server_config(
        &read(&tls.cert_file, "cert_file")?,
        &zeroize::Zeroizing::new(read(&tls.key_file, "key_file")?),
        &read(&tls.client_ca_file, "client_ca_file")?,
        clients,
    )
}

/// The admin listener: `GET /metrics` in the Prometheus text format; `GET /healthz` (the
/// process answers) and `GET /readyz` (it can serve: see `Kms::readiness`; 503 with the
/// reason when not, and from the moment shutdown begins).
async fn spawn_admin(
    listen: SocketAddr,
    kms: Arc<Kms>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin listener {listen}"))?;
    let addr = listener.local_addr()?;
    let ready_kms = Arc::clone(&kms);
    let metrics = axum::routing::get(move || {
        let kms = Arc::clone(&kms);
        async move {
            let body = crate::metrics::get().render(&kms.keystore_snapshots().await);
            (
                // prometheus-client writes the OpenMetrics text format (`# EOF`, counters
                // as `<name>_total`): say so, as Prometheus expects.
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                body,
            )
        }
    });
    let readyz = axum::routing::get(move || {
        let (kms, stopping) = (Arc::clone(&ready_kms), Arc::clone(&stopping));
        async move {
            use axum::http::StatusCode;
            if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting down\n".to_string(),
                );
            }
            match kms.readiness().await {
                Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            }
        }
    });
    let app = axum::Router::new()
        .route("/metrics", metrics)
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", readyz);
    // A scrape is one short request: a few connections, each with seconds to send it. A
    // connection is pending until a whole request has arrived on it, so half-sent requests
    // give way to new scrapes.
    let app = app.layer(axum::middleware::from_fn(
        |axum::Extension(peer): axum::Extension<crate::http::Peer>,
         req: axum::extract::Request,
         next: axum::middleware::Next| async move {
            peer.standing.prove();
            next.run(req).await
        },
    ));
    let limits = crate::transport::Limits {
        max_connections: 64,
        max_pending: 32,
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        proof: crate::transport::Proof::Request,
        unproven: None,
    };
    let incoming =
        crate::transport::incoming(listener, limits, |tcp: tokio::net::TcpStream| async move {
            if tcp.peek(&mut [0u8; 1]).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(tcp)
        });
    let bounds = crate::http::Bounds {
        header_timeout: Duration::from_secs(5),
        max_concurrent_streams: 16,
    };
    let task = tokio::spawn(async move {
        // The listener runs until the process ends (the task is aborted at shutdown).
        let (_never, stop) = tokio::sync::watch::channel(false);
        crate::http::serve(app, incoming, bounds, stop).await;
    });
    tracing::info!(%addr, "admin listener (metrics) up");
    Ok((addr, task))
}

/// How often a replica records its audit chain head in the metadata database (and at
/// shutdown): a crash loses at most this much of the record.
const AUDIT_HEAD_INTERVAL: Duration = Duration::from_secs(2);

/// A start on an audit file that ends before the head recorded for this replica would hide
/// that lines were cut off it (and chain new lines onto the shortened file): refused. (A
/// file with no line continues the chain from the recorded head: see `Audit::open`.)
fn refuse_a_short_audit_file(
    audit: &crate::audit::Audit,
    settings: &crate::config::AuditSettings,
    recorded: Option<&crate::metadata::AuditHead>,
) -> anyhow::Result<()> {
    let (seq, _) = audit.head();
    if let Some(r) = recorded.filter(|r| r.seq > seq) {
        anyhow::bail!(
            "the audit file {} ends at line {seq}, but the metadata database recorded line {} \
             of replica {}'s chain at {}: lines were cut off it. Restore the file (then \
             `hsm-kms audit verify --config` checks it), or start a new chain knowingly under \
             another audit.replica name",
            settings.file.display(),
            r.seq,
            r.replica,
            crate::audit::rfc3339(r.recorded_ms)
        );
    }
    Ok(())
}

/// Records the replica's audit head every `AUDIT_HEAD_INTERVAL`, when it moved.
fn spawn_audit_head_recorder(
    kms: &Arc<Kms>,
    audit: &Arc<crate::audit::Audit>,
    replica: &str,
) -> tokio::task::JoinHandle<()> {
    let (audit, replica) = (Arc::clone(audit), replica.to_string());
    let last = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    kms.spawn_every(AUDIT_HEAD_INTERVAL, move |kms| {
        let (audit, replica, last) = (Arc::clone(&audit), replica.clone(), Arc::clone(&last));
        async move {
            let seq = audit.head().0;
            if last.load(std::sync::atomic::Ordering::Relaxed) != seq
                && record_audit_head(&kms, &audit, &replica).await
            {
                last.store(seq, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
}

/// Records the audit head now; says in the log when it cannot.
async fn record_audit_head(kms: &Kms, audit: &crate::audit::Audit, replica: &str) -> bool {
    let (seq, head) = audit.head();
    if seq == 0 {
        return true;
    }
    match kms.record_audit_head(replica, seq, head).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e.message, seq, "recording the audit chain head in the database failed; will retry");
            false
        }
    }
}

/// On SIGHUP, reopens the audit file (log rotation), and re-reads the configuration file,
/// if any, and applies its clusters (the HSM inventory among them). A file that does not
/// load changes nothing.
fn spawn_reload_on_sighup(
    kms: Arc<Kms>,
    path: Option<PathBuf>,
    audit: Arc<crate::audit::Audit>,
    xks: Option<Arc<crate::api::xks::Front>>,
) -> tokio::task::JoinHandle<()> {
    // Installed before the listeners are announced: an early SIGHUP reloads rather than
    // killing the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tokio::spawn(async move {
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload is off");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            audit.reopen();
            let Some(path) = &path else { continue };
            // The XKS credentials rotate with the rest (checked before anything changes).
            let outcome = Settings::load(path).and_then(|s| {
                if xks.is_some() {
                    crate::api::xks::credentials(&s)?;
                }
                kms.reload(&s)?;
                match &xks {
                    Some(xks) => xks.reload(&s),
                    None => Ok(()),
                }
            });
            match outcome {
                Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
                Err(e) => tracing::error!(
                    config = %path.display(),
                    error = format!("{e:#}"),
                    "reloading failed; the running configuration stays"
                ),
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a SIGTERM that arrives just after the listeners are
/// announced (a supervisor stopping a fresh process) is a clean shutdown, not the signal's
/// default action killing the process.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, signal = name, "cannot listen for the signal");
            None
        }
    };
    let interrupt = listen(SignalKind::interrupt(), "SIGINT");
    let terminate = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(interrupt) => {}
            _ = wait(terminate) => {}
        }
        tracing::info!("shutdown requested");
    }
}

/// Feeds the domain's store health to the gRPC health service, until the domain is gone.
async fn feed_health(
    mut health: tokio::sync::watch::Receiver<crate::kms::connections::Health>,
    mut reporter: tonic_health::server::HealthReporter,
) {
    let mut shown = crate::kms::connections::Health::new();
    loop {
        let now = health.borrow_and_update().clone();
        for (id, serving) in &now {
            if shown.get(id) != Some(serving) {
                let status = if *serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(id, status).await;
            }
        }
        for id in shown.keys().filter(|id| !now.contains_key(*id)) {
            reporter.clear_service_status(id).await;
        }
        shown = now;
        if health.changed().await.is_err() {
            return;
        }
    }
}
