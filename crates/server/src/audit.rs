//! The audit trail: one JSON line per request, allowed or denied, appended to a file.
//!
//! Each line holds `seq` (1, 2, ...), `prev` (the previous line's hash; 64 zeros for the
//! first) and ends with `"hash"`, the SHA-256 of the line's text before the hash field. A
//! removed, altered, inserted or reordered line breaks the chain, which `verify` (the
//! `hsm-kms audit verify FILE` command) finds. Cutting lines off the end leaves a valid but
//! shorter chain, so the service records its head in the metadata database every few seconds
//! and at shutdown (`AuditHead`, never moving back), and `verify` given those heads (`hsm-kms
//! audit verify --config`) reports a file that ends before its recorded head, or whose line
//! at that head is another. Every line names its replica (`audit.replica`): each replica
//! keeps its own chain, and the heads are recorded per replica.
//!
//! Lines never hold plaintext, data keys, passwords or ciphertexts: only who, from where,
//! which operation on which key or store, the encryption context, and the outcome.
//!
//! The trail fails closed. A request is answered only once its line has been written to the
//! file (handed to the operating system; with `audit.fsync`, also on disk): `record` returns
//! a `Receipt` that the request path awaits. Requests hand their entries to a writer thread,
//! which writes each batch that queued meanwhile with one `write`, so the cost is per batch,
//! not per request; under load it lingers 100 µs between batches, so that requests do not
//! have to wake it one by one (measured: a writer woken per request cost 15-20% of Encrypt
//! throughput; writing on the request path itself, by group commit, cost more with one
//! async worker, since the hashing then competed with the requests). When a write fails (disk full, I/O error, the file deleted), the
//! batch's bytes are cut off again, the chain stays where it was, those requests are
//! refused, and so is every request after them (`available` is false) until the writer
//! manages to write a line that says how many requests were refused meanwhile. The chain is
//! then intact across the outage.
//!
//! A crash can leave a torn last line (part of a batch's single write). `open` cuts it off,
//! keeps the cut bytes beside the file (`<file>.torn-<unix ms>`) and says so in the log;
//! `verify` reports such a tail as torn, apart from an altered line.
//!
//! SIGHUP reopens the file at its path (log rotation: move the file, then send SIGHUP); the
//! chain continues in the new file, and `verify OLD NEW` checks both in order. A file that
//! is deleted while open is noticed before the next write, which then fails (closed) until
//! SIGHUP reopens one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::metadata::AuditHead;
use model::ids::ArnScope;
use model::principal::{Principal, Resource};

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One request, as the audit trail records it. Built on the request path, so it holds
/// only what is at hand; the writer thread formats it.
#[derive(Debug)]
pub struct Entry {
    /// Unix milliseconds.
    pub time_ms: i64,
    pub request_id: uuid::Uuid,
    pub principal: Option<Arc<Principal>>,
    pub source: Option<SocketAddr>,
    pub operation: &'static str,
    pub resources: Vec<Resource>,
    pub encryption_context: Option<BTreeMap<String, String>>,
    /// The requestMetadata of an XKS proxy request.
    pub request_metadata: Option<BTreeMap<String, String>>,
    /// `allowed` (and succeeded), `denied` (AccessDeniedException) or `failed`.
    pub outcome: &'static str,
    pub error: Option<&'static str>,
    /// On a refusal before authentication: how many more such refusals from the same
    /// source were not recorded one by one since its last recorded one (`path::Refusals`).
    pub unrecorded_refusals: Option<u64>,
}

/// The line as written and hashed (field order is the line's order).
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    replica: &'a str,
    time: String,
    request_id: String,
    principal: Option<&'a str>,
    source: Option<String>,
    operation: &'static str,
    resources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_context: Option<&'a BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_metadata: Option<&'a BTreeMap<String, String>>,
    outcome: &'static str,
    error: Option<&'static str>,
    /// On the line that ends an outage: how many requests were refused because the trail
    /// could not be written.
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_unrecorded: Option<u64>,
    /// On a refusal before authentication: the same source's refusals left out since.
    #[serde(skip_serializing_if = "Option::is_none")]
    unrecorded_refusals: Option<u64>,
    prev: &'a str,
}

/// The operation name of the line that ends an outage of the trail.
pub const RECOVERED: &str = "hsm-kms:AuditTrailRecovered";

/// How often the writer tries again while the trail cannot be written.
const RETRY: Duration = Duration::from_millis(250);

/// How long the writer waits for a batch to gather under load.
const LINGER: Duration = Duration::from_micros(100);

/// Entries the writer takes into one batch at most.
const BATCH: usize = 4096;

/// An entry and the request waiting for it to be written.
struct Pending {
    entry: Entry,
    done: tokio::sync::oneshot::Sender<bool>,
}

/// Whether a request's line was written; await it before answering the request.
pub struct Receipt(Option<tokio::sync::oneshot::Receiver<bool>>);

impl Receipt {
    /// True once the line is written; false if it could not be (the request must then be
    /// refused).
    pub async fn written(self) -> bool {
        match self.0 {
            Some(rx) => rx.await.unwrap_or(false),
            None => false,
        }
    }
}

/// What the request path and the writer share.
struct Shared {
    /// False from a failed write until the writer has written again.
    available: AtomicBool,
    /// Requests refused, unrecorded, since the last written line.
    refused: AtomicU64,
    /// Set by `reopen`; the writer reopens the path before its next write.
    reopen: AtomicBool,
    /// The last line written: its sequence number and hash.
    head: Mutex<(u64, String)>,
}

pub struct Audit {
    /// Read-locked by every request (a `Sender` is shared); taken by `close`.
    tx: RwLock<Option<mpsc::Sender<Pending>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    shared: Arc<Shared>,
}

impl Audit {
    /// Opens (or creates, mode 0600) the file and continues its chain, cutting off a torn
    /// last line first; key ARNs are written in `scope`, and every line names `replica`.
    /// With `fsync`, each batch is also flushed to disk before its requests are answered.
    ///
    /// A file with no line yet continues the chain from `recorded` (line number and hash,
    /// the head recorded in the metadata database), as a rotated file does: the file before
    /// it was moved away (rotated without SIGHUP, then restarted). `verify OLD NEW` checks
    /// both; this file alone verifies as one that starts mid-chain.
    pub fn open(
        path: &Path,
        scope: ArnScope,
        fsync: bool,
        replica: &str,
        recorded: Option<(u64, String)>,
    ) -> anyhow::Result<Audit> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the audit directory {}", dir.display()))?;
        }
        let file = open_append(path)?;
        let (mut seq, mut prev) = recover(path, &file)?;
        if let Some((n, head)) = recorded.filter(|(n, _)| seq == 0 && *n > 0) {
            tracing::warn!(
                file = %path.display(),
                continues_from = n,
                "the audit file is new; its chain continues from the head recorded in the \
                 database (the file before it was moved away): verify it after that file"
            );
            (seq, prev) = (n, head);
        }
        let (tx, rx) = mpsc::channel::<Pending>();
        let shared = Arc::new(Shared {
            available: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            head: Mutex::new((seq, prev.clone())),
        });
        let mut writer = Writer {
            len: file.metadata()?.len(),
            file,
            path: path.to_path_buf(),
            scope,
            replica: replica.to_string(),
            seq,
            prev,
            fsync,
            shared: Arc::clone(&shared),
            failing_since: None,
            moved_reported: false,
        };
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Audit {
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(thread)),
            path: path.to_path_buf(),
            shared,
        })
    }

    /// The last line written so far: its sequence number (0: none) and hash.
    pub fn head(&self) -> (u64, String) {
        self.shared
            .head
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether requests may be served: false while the trail cannot be written.
    pub fn available(&self) -> bool {
        self.shared.available.load(Ordering::Acquire)
    }

    /// Counts a request refused because the trail was unavailable; the line that ends the
    /// outage gives the count.
    pub fn refused(&self) {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues `entry`; the receipt tells when it is written.
    pub fn record(&self, entry: Entry) -> Receipt {
        let (done, rx) = tokio::sync::oneshot::channel();
        let tx = self.tx.read().unwrap_or_else(|p| p.into_inner());
        let sent = tx
            .as_ref()
            .is_some_and(|t| t.send(Pending { entry, done }).is_ok());
        if !sent {
            tracing::error!(file = %self.path.display(), "the audit trail is closed; a request is refused");
            return Receipt(None);
        }
        Receipt(Some(rx))
    }

    /// Reopens the file at its path before the next write (SIGHUP; log rotation).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }

    /// Writes out what is queued and stops the writer.
    pub fn close(&self) {
        drop(self.tx.write().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the audit file {}", path.display()))
}

/// The chain's state at the end of `file` (seq, head hash), after cutting off a torn last
/// line: one that a crash left without its newline. A complete last line that does not
/// check out is not cut: that is for `verify` and a person to look at.
fn recover(path: &Path, file: &File) -> anyhow::Result<(u64, String)> {
    let mut text = Vec::new();
    (&*file).seek(std::io::SeekFrom::Start(0))?;
    (&*file).read_to_end(&mut text)?;
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        let torn = &text[complete..];
        let keep = path.with_extension(format!(
            "{}.torn-{}",
            path.extension().and_then(|e| e.to_str()).unwrap_or("audit"),
            model::now_ms()
        ));
        std::fs::write(&keep, torn)
            .with_context(|| format!("saving the torn tail of {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("cutting the torn tail of {}", path.display()))?;
        file.sync_all()?;
        tracing::warn!(
            file = %path.display(),
            bytes = torn.len(),
            saved_to = %keep.display(),
            "the audit file ended in a torn line (a crash during a write); cut it off and kept it aside"
        );
    }
    let Some(last) = text[..complete]
        .split(|&b| b == b'\n')
        .rev()
        .find(|l| !l.is_empty())
    else {
        return Ok((0, ZERO_HASH.to_string()));
    };
    let last = std::str::from_utf8(last).context("the last audit line is not text")?;
    let (body, hash) = split_hash(last).with_context(|| {
        format!(
            "the last line of {} has no hash; run `hsm-kms audit verify` on it",
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let seq = v["seq"]
        .as_u64()
        .context("the last audit line has no seq")?;
    Ok((seq, hash.to_string()))
}

struct Writer {
    file: File,
    /// The file's length after the last complete batch.
    len: u64,
    path: PathBuf,
    scope: ArnScope,
    replica: String,
    seq: u64,
    prev: String,
    fsync: bool,
    shared: Arc<Shared>,
    /// Unix ms of the first failure of the current outage.
    failing_since: Option<i64>,
    /// Whether the log has said that the file was moved away from its path.
    moved_reported: bool,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Pending>) {
        let mut batch: Vec<Pending> = Vec::new();
        loop {
            // While failing, wake up on our own to try again.
            let first = if self.failing_since.is_some() {
                match rx.recv_timeout(RETRY) {
                    Ok(p) => Some(p),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(p) => Some(p),
                    Err(_) => break,
                }
            };
            batch.extend(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let ok = self.write(batch.iter().map(|p| &p.entry));
            if !ok {
                let n = batch.len() as u64;
                self.shared.refused.fetch_add(n, Ordering::Relaxed);
            }
            let n = batch.len();
            for p in batch.drain(..) {
                let _ = p.done.send(ok);
            }
            // Under load (more than one entry came together), linger a moment so that the
            // next batch gathers and the requests need not wake this thread; alone, wait
            // on the channel. A thread woken per request cost 15-20% of Encrypt throughput.
            if n > 1 {
                std::thread::sleep(LINGER);
            }
        }
        // What is queued at shutdown still gets written.
        let _ = self.file.sync_all();
        tracing::info!(seq = self.seq, head = %self.prev, "audit trail closed");
    }

    /// Writes the lines of `entries` (preceded, after an outage, by the line that ends it) in
    /// one write; on failure cuts the file back and leaves the chain as it was.
    fn write<'a>(&mut self, entries: impl Iterator<Item = &'a Entry>) -> bool {
        let outcome = self.try_write(entries);
        match outcome {
            Ok(()) => {
                if self.failing_since.take().is_some() {
                    tracing::warn!(file = %self.path.display(), "the audit trail is written again; serving requests");
                }
                self.shared.available.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                self.shared.available.store(false, Ordering::Release);
                if self.failing_since.is_none() {
                    self.failing_since = Some(model::now_ms());
                    tracing::error!(
                        file = %self.path.display(),
                        error = format!("{e:#}"),
                        "the audit trail cannot be written; refusing requests until it can"
                    );
                }
                false
            }
        }
    }

    fn try_write<'a>(&mut self, entries: impl Iterator<Item = &'a Entry>) -> anyhow::Result<()> {
        if self.shared.reopen.swap(false, Ordering::AcqRel) {
            let file = open_append(&self.path)?;
            self.len = file.metadata()?.len();
            self.file = file;
            self.moved_reported = false;
            tracing::info!(file = %self.path.display(), seq = self.seq, "audit file reopened; the chain continues in it");
        }
        let meta = self.file.metadata()?;
        if meta.nlink() == 0 {
            anyhow::bail!("the audit file was deleted; send SIGHUP to start a new one");
        }
        // Moved (rotated) but not yet reopened: the lines still reach a file, so this is
        // said once, not refused.
        let at_path = std::fs::metadata(&self.path).ok();
        let same = at_path.is_some_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev());
        if !same && !self.moved_reported {
            self.moved_reported = true;
            tracing::warn!(file = %self.path.display(), "the audit file was moved or replaced; lines go on into the moved file until SIGHUP reopens the path");
        }
        // A failed write may have left part of a batch: cut it before writing on.
        if meta.len() != self.len {
            self.file.set_len(self.len)?;
        }
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        let mut text = Vec::new();
        if let Some(since) = self.failing_since {
            let refused = self.shared.refused.load(Ordering::Relaxed);
            let line = Line {
                seq: seq + 1,
                replica: &self.replica,
                time: rfc3339(model::now_ms()),
                request_id: uuid::Uuid::new_v4().to_string(),
                principal: None,
                source: None,
                operation: RECOVERED,
                resources: vec![format!("unwritable since {}", rfc3339(since))],
                encryption_context: None,
                request_metadata: None,
                outcome: "recorded",
                error: None,
                refused_unrecorded: Some(refused),
                unrecorded_refusals: None,
                prev: &prev,
            };
            prev = append_line(&mut text, &line)?;
            seq += 1;
        }
        for e in entries {
            let line = Line {
                seq: seq + 1,
                replica: &self.replica,
                time: rfc3339(e.time_ms),
                request_id: e.request_id.to_string(),
                principal: e.principal.as_deref().map(|p| p.arn.as_str()),
                source: e.source.map(|a| a.to_string()),
                operation: e.operation,
                resources: e
                    .resources
                    .iter()
                    .map(|r| match r {
                        Resource::Key(id) => self.scope.key_arn(id),
                        Resource::Named(n) => n.clone(),
                    })
                    .collect(),
                encryption_context: e.encryption_context.as_ref(),
                request_metadata: e.request_metadata.as_ref(),
                outcome: e.outcome,
                error: e.error,
                refused_unrecorded: None,
                unrecorded_refusals: e.unrecorded_refusals,
                prev: &prev,
            };
            prev = append_line(&mut text, &line)?;
            seq += 1;
        }
        if text.is_empty() {
            return Ok(());
        }
        let written = self.file.write_all(&text).and_then(|()| {
            if self.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Cut off what part of the batch got in, so that the chain stays whole.
            if let Err(cut) = self.file.set_len(self.len) {
                tracing::error!(error = %cut, "cutting a partly written audit batch failed; will retry");
            }
            return Err(e.into());
        }
        if self.failing_since.is_some() {
            self.shared.refused.store(0, Ordering::Relaxed);
        }
        self.len += text.len() as u64;
        self.seq = seq;
        *self.shared.head.lock().unwrap_or_else(|p| p.into_inner()) = (seq, prev.clone());
        self.prev = prev;
        Ok(())
    }
}

use std::os::unix::fs::MetadataExt as _;

/// Appends `line` and its hash to `out`; returns the hash.
fn append_line(out: &mut Vec<u8>, line: &Line<'_>) -> anyhow::Result<String> {
    let body = serde_json::to_string(line)?;
    let hash = sha256_hex(body.as_bytes());
    // `{...}` becomes `{...,"hash":"<hex>"}`.
    out.extend_from_slice(&body.as_bytes()[..body.len() - 1]);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// Splits `{...,"hash":"<64 hex>"}` into the hashed text `{...}` and the hash.
fn split_hash(line: &str) -> Option<(String, &str)> {
    const TAIL: usize = r#","hash":""}"#.len() + 64;
    if line.len() < TAIL + 1 || !line.is_char_boundary(line.len() - TAIL) {
        return None;
    }
    let (head, tail) = line.split_at(line.len() - TAIL);
    let hash = tail.strip_prefix(r#","hash":""#)?.strip_suffix("\"}")?;
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{head}}}"), hash))
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub lines: u64,
    pub head: String,
    /// Bytes of a torn last line (a crash during a write), not part of the chain.
    pub torn_tail: usize,
    /// The replica the last line names (lines written before replicas were named: none).
    pub replica: Option<String>,
    /// The recorded head of that replica, found on this chain.
    pub recorded: Option<AuditHead>,
}

/// Checks the chain of one audit file, or of several that continue one another (a rotated
/// file, then the one after it); the error names the first line that breaks it. A last
/// line without its newline that does not check out is a torn tail (reported in
/// `torn_tail`), not a broken chain: a crash leaves that, and the service cuts it at start.
///
/// `recorded` are the heads the service recorded in its database (`Metadata::audit_heads`):
/// a line at a recorded head must be the recorded line, and the chain must not end before
/// its replica's recorded head (lines cut off its end). The replica is the one the last
/// line names, else `expected` (the configured `audit.replica`: a file emptied of every
/// line still belongs to it). Without recorded heads, a cut at the end goes unseen.
pub fn verify(
    paths: &[PathBuf],
    expected: Option<&str>,
    recorded: &[AuditHead],
) -> anyhow::Result<Verified> {
    let mut prev = ZERO_HASH.to_string();
    let mut n = 0u64;
    let mut torn_tail = 0;
    let mut replica: Option<String> = None;
    let mut found: Option<AuditHead> = None;
    for (f, path) in paths.iter().enumerate() {
        let text = std::fs::read(path).with_context(|| format!("opening {}", path.display()))?;
        let at = |line_no: usize| format!("{} line {line_no}", path.display());
        let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let line_no = i + 1;
            let complete = raw.ends_with(b"\n");
            let line = std::str::from_utf8(raw)
                .unwrap_or("")
                .trim_end_matches('\n');
            let hashed = split_hash(line);
            let checked = hashed
                .as_ref()
                .is_some_and(|(body, hash)| sha256_hex(body.as_bytes()) == *hash);
            let (Some((body, hash)), true) = (hashed, checked) else {
                let hash_missing = split_hash(line).is_none();
                if !complete && hash_missing && f + 1 == paths.len() {
                    torn_tail = raw.len();
                    break;
                }
                if hash_missing {
                    anyhow::bail!("{}: no hash at the end of the line", at(line_no));
                }
                anyhow::bail!(
                    "{}: its hash does not match its content (altered)",
                    at(line_no)
                );
            };
            let v: serde_json::Value = serde_json::from_str(&body)
                .with_context(|| format!("{}: not a JSON object", at(line_no)))?;
            if n == 0 && v["seq"].as_u64() != Some(1) {
                anyhow::bail!(
                    "{}: the chain starts at sequence number {}: lines were cut off its start, \
                     or the file continues a rotated one (verify that one and then this one, \
                     in one command)",
                    at(line_no),
                    v["seq"]
                );
            }
            if v["prev"].as_str() != Some(prev.as_str()) {
                anyhow::bail!(
                    "{}: it does not follow the line before it (a line was removed, inserted \
                     or moved)",
                    at(line_no)
                );
            }
            if v["seq"].as_u64() != Some(n + 1) {
                anyhow::bail!(
                    "{}: sequence number {} where {} was due",
                    at(line_no),
                    v["seq"],
                    n + 1
                );
            }
            n += 1;
            prev = hash.to_string();
            let named = v["replica"].as_str();
            if named != replica.as_deref() {
                replica = named.map(str::to_string);
            }
            if let Some(r) = recorded
                .iter()
                .find(|r| Some(r.replica.as_str()) == named && r.seq == n)
            {
                if r.head != prev {
                    anyhow::bail!(
                        "{}: the database recorded another line {} for replica {} at {}: the \
                         trail was rewritten from there on",
                        at(line_no),
                        n,
                        r.replica,
                        rfc3339(r.recorded_ms)
                    );
                }
                found = Some(r.clone());
            }
        }
    }
    if let (Some(named), Some(expected)) = (&replica, expected) {
        if named != expected {
            anyhow::bail!(
                "the last line names replica {named}, not {expected} (audit.replica): is this \
                 another replica's file?"
            );
        }
    }
    let whose = replica.as_deref().or(expected);
    if let Some(r) = recorded
        .iter()
        .find(|r| Some(r.replica.as_str()) == whose && r.seq > n)
    {
        anyhow::bail!(
            "the chain ends at line {n}, but the database recorded line {} of replica {}'s \
             chain at {}: lines were cut off its end",
            r.seq,
            r.replica,
            rfc3339(r.recorded_ms)
        );
    }
    Ok(Verified {
        lines: n,
        head: prev,
        torn_tail,
        recorded: found.filter(|f| Some(&f.replica) == replica.as_ref()),
        replica,
    })
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-22T10:04:05.123Z`), always with milliseconds
/// so that lines have one shape; the calendar is prost-types'.
pub fn rfc3339(ms: i64) -> String {
    let whole = prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    }
    .to_string();
    format!(
        "{}.{:03}Z",
        whole.trim_end_matches('Z'),
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op: &'static str) -> Entry {
        Entry {
            time_ms: 0,
            request_id: uuid::Uuid::nil(),
            principal: Principal::parse("arn:aws:iam::111122223333:user/alice").map(Arc::new),
            source: None,
            operation: op,
            resources: vec![],
            encryption_context: None,
            request_metadata: None,
            outcome: "allowed",
            error: None,
            unrecorded_refusals: None,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_348_800_123), "2026-11-22T12:00:00.123Z");
    }

    fn scope() -> ArnScope {
        ArnScope {
            partition: "aws".into(),
            region: "us-east-1".into(),
            account_id: "111122223333".into(),
        }
    }

    fn record_all(a: &Audit, ops: &[&'static str]) -> Vec<bool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        ops.iter()
            .map(|op| rt.block_on(a.record(entry(op)).written()))
            .collect()
    }

    #[test]
    fn chain_continues_across_restarts_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for ops in [["Encrypt", "Decrypt"], ["CreateKey", "ListKeys"]] {
            let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
            assert_eq!(record_all(&a, &ops), [true, true]);
            a.close();
        }
        let one = || verify(std::slice::from_ref(&path), None, &[]);
        let good = std::fs::read_to_string(&path).unwrap();
        assert_eq!(one().unwrap().lines, 4);
        let lines: Vec<&str> = good.lines().collect();
        let write = |ls: &[&str]| std::fs::write(&path, ls.join("\n") + "\n").unwrap();
        write(&[lines[0], lines[2], lines[3]]);
        assert!(one().is_err(), "removed line");
        write(&[lines[0], lines[2], lines[1], lines[3]]);
        assert!(one().is_err(), "reordered lines");
        let altered = lines[1].replace("Decrypt", "Encrypt");
        write(&[lines[0], &altered, lines[2], lines[3]]);
        assert!(one().unwrap_err().to_string().contains("altered"));
        write(&[lines[1], lines[2], lines[3]]);
        assert!(one().is_err(), "removed first line");
        // An altered last line stays an alteration, even without its newline: a torn line
        // never has its whole hash.
        std::fs::write(&path, format!("{}\n{}", lines[0], altered)).unwrap();
        assert!(one().unwrap_err().to_string().contains("altered"));
    }

    #[test]
    fn a_torn_tail_is_reported_then_cut_at_start_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
        record_all(&a, &["Encrypt", "Decrypt", "ListKeys"]);
        a.close();
        let whole = std::fs::read(&path).unwrap();
        // A crash in the middle of the third line's write.
        let cut = whole.len() - 40;
        std::fs::write(&path, &whole[..cut]).unwrap();
        let v = verify(std::slice::from_ref(&path), None, &[]).unwrap();
        assert_eq!((v.lines, v.torn_tail > 0), (2, true));
        // The service starts, cuts the tail off (keeping it aside) and continues the chain.
        let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
        record_all(&a, &["CreateKey"]);
        a.close();
        let v = verify(std::slice::from_ref(&path), None, &[]).unwrap();
        assert_eq!((v.lines, v.torn_tail), (3, 0));
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            std::fs::read(kept[0].path()).unwrap(),
            whole[whole[..cut].iter().rposition(|&b| b == b'\n').unwrap() + 1..cut]
        );
    }

    /// Cutting lines off the end leaves a valid chain; the head recorded in the database
    /// shows the cut, and a line rewritten at the recorded head too.
    #[test]
    fn recorded_heads_show_a_cut_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
        record_all(&a, &["Encrypt", "Decrypt", "ListKeys", "CreateKey"]);
        let (seq, head) = a.head();
        a.close();
        assert_eq!(seq, 4);
        let recorded = [AuditHead {
            replica: "r1".into(),
            seq,
            head,
            recorded_ms: 0,
        }];
        let files = std::slice::from_ref(&path);
        let v = verify(files, Some("r1"), &recorded).unwrap();
        assert_eq!(v.replica.as_deref(), Some("r1"));
        assert_eq!(v.recorded.as_ref(), recorded.first());
        let whole = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = whole.lines().collect();
        // Cut off the last line: intact without the database's head, not with it.
        std::fs::write(&path, lines[..3].join("\n") + "\n").unwrap();
        assert_eq!(verify(files, None, &[]).unwrap().lines, 3);
        let e = verify(files, Some("r1"), &recorded).unwrap_err();
        assert!(e.to_string().contains("cut off its end"), "{e}");
        // Emptied: the file is still r1's by the configuration.
        std::fs::write(&path, "").unwrap();
        assert!(verify(files, None, &recorded).is_ok());
        assert!(verify(files, Some("r1"), &recorded).is_err());
        // Another replica's file is not taken for r1's.
        std::fs::write(&path, &whole).unwrap();
        let e = verify(files, Some("r2"), &recorded).unwrap_err();
        assert!(e.to_string().contains("names replica r1, not r2"), "{e}");
        // The recorded line replaced by another (the chain rebuilt from line 4 on).
        let other = AuditHead {
            head: "0".repeat(64),
            ..recorded[0].clone()
        };
        let e = verify(files, Some("r1"), &[other]).unwrap_err();
        assert!(e.to_string().contains("rewritten"), "{e}");
    }

    #[test]
    fn a_rotated_file_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let old = dir.path().join("audit.jsonl.1");
        let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
        record_all(&a, &["Encrypt", "Decrypt"]);
        std::fs::rename(&path, &old).unwrap();
        a.reopen();
        record_all(&a, &["ListKeys"]);
        a.close();
        assert_eq!(
            verify(&[old.clone(), path.clone()], None, &[])
                .unwrap()
                .lines,
            3
        );
        assert!(
            verify(std::slice::from_ref(&path), None, &[]).is_err(),
            "starts mid-chain"
        );
        assert!(verify(&[path, old], None, &[]).is_err(), "out of order");
    }

    #[test]
    fn a_deleted_file_fails_closed_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(&path, scope(), false, "r1", None).unwrap();
        assert_eq!(record_all(&a, &["Encrypt"]), [true]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(record_all(&a, &["Decrypt", "Decrypt"]), [false, false]);
        assert!(!a.available());
        a.refused();
        a.reopen();
        // The writer retries on its own and the trail comes back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !a.available() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(a.available());
        assert_eq!(record_all(&a, &["ListKeys"]), [true]);
        a.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["operation"], RECOVERED);
        // Two requests failed at the write, one was refused before it.
        assert_eq!(first["refused_unrecorded"], 3);
        assert_eq!(first["seq"], 2);
    }
}
