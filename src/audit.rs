//! The audit trail: one JSON line per request, allowed or denied, appended to a file.
//!
//! Each line holds `seq` (1, 2, ...), `prev` (the previous line's hash; 64 zeros for the
//! first) and ends with `"hash"`, the SHA-256 of the line's text before the hash field. A
//! removed, altered, inserted or reordered line breaks the chain, which `verify` (the
//! `hsm-kms audit verify FILE` command) finds. Cutting lines off the end leaves a valid but
//! shorter chain: compare the head `verify` prints with the one the service logs at shutdown.
//!
//! Lines never hold plaintext, data keys, passwords or ciphertexts: only who, from where,
//! which operation on which key or store, the encryption context, and the outcome.
//!
//! Requests hand their entry to a writer thread over a channel, so the request path does no
//! file I/O, formatting or hashing; the writer flushes whenever the channel is empty, lingers
//! a moment (so that under load requests need not wake it), and flushes at shutdown.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::kms::access::{Principal, Resource};
use crate::kms::ids::ArnScope;

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
    /// `allowed` (and succeeded), `denied` (AccessDeniedException) or `failed`.
    pub outcome: &'static str,
    pub error: Option<&'static str>,
}

/// The line as written and hashed (field order is the line's order).
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    request_id: String,
    principal: Option<&'a str>,
    source: Option<String>,
    operation: &'static str,
    resources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_context: Option<&'a BTreeMap<String, String>>,
    outcome: &'static str,
    error: Option<&'static str>,
    prev: &'a str,
}

/// How long the writer lingers after a batch before it sleeps on the channel: under load,
/// entries keep arriving meanwhile and requests never have to wake it.
const LINGER: Duration = Duration::from_millis(2);

pub struct Audit {
    /// Read-locked by every request (a `Sender` is shared); taken by `close`.
    tx: RwLock<Option<mpsc::Sender<Entry>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

impl Audit {
    /// Opens (or creates, mode 0600) the file and continues its chain; key ARNs are written
    /// in `scope`.
    pub fn open(path: &Path, scope: ArnScope) -> anyhow::Result<Audit> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the audit directory {}", dir.display()))?;
        }
        let (mut seq, mut prev) = (0u64, ZERO_HASH.to_string());
        if path.exists() {
            if let Some(last) = last_line(path)? {
                let (body, hash) = split_hash(&last).with_context(|| {
                    format!(
                        "the last line of {} has no hash; run `hsm-kms audit verify` on it",
                        path.display()
                    )
                })?;
                let v: serde_json::Value = serde_json::from_str(&body)?;
                seq = v["seq"]
                    .as_u64()
                    .context("the last audit line has no seq")?;
                prev = hash.to_string();
            }
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("opening the audit file {}", path.display()))?
        };
        let (tx, rx) = mpsc::channel::<Entry>();
        let writer = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_loop(file, rx, scope, seq, prev))?;
        Ok(Audit {
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path: path.to_path_buf(),
        })
    }

    pub fn record(&self, entry: Entry) {
        let tx = self.tx.read().unwrap_or_else(|p| p.into_inner());
        let sent = tx.as_ref().is_some_and(|t| t.send(entry).is_ok());
        if !sent {
            tracing::error!(file = %self.path.display(), "the audit trail is closed; a request went unrecorded");
        }
    }

    /// Writes out what is queued and stops the writer.
    pub fn close(&self) {
        drop(self.tx.write().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn write_loop(
    file: File,
    rx: mpsc::Receiver<Entry>,
    scope: ArnScope,
    mut seq: u64,
    mut prev: String,
) {
    let mut out = BufWriter::new(file);
    let mut append = |e: Entry, out: &mut BufWriter<File>| -> std::io::Result<()> {
        seq += 1;
        let body = serde_json::to_string(&Line {
            seq,
            time: rfc3339(e.time_ms),
            request_id: e.request_id.to_string(),
            principal: e.principal.as_deref().map(|p| p.arn.as_str()),
            source: e.source.map(|a| a.to_string()),
            operation: e.operation,
            resources: e
                .resources
                .iter()
                .map(|r| match r {
                    Resource::Key(id) => scope.key_arn(id),
                    Resource::Named(n) => n.clone(),
                })
                .collect(),
            encryption_context: e.encryption_context.as_ref(),
            outcome: e.outcome,
            error: e.error,
            prev: &prev,
        })
        .map_err(std::io::Error::other)?;
        let hash = sha256_hex(body.as_bytes());
        // `{...}` becomes `{...,"hash":"<hex>"}`.
        out.write_all(&body.as_bytes()[..body.len() - 1])?;
        writeln!(out, ",\"hash\":\"{hash}\"}}")?;
        prev = hash;
        Ok(())
    };
    let mut next = rx.recv().ok();
    while let Some(first) = next.take() {
        let mut result = append(first, &mut out);
        while result.is_ok() {
            match rx.try_recv() {
                Ok(e) => result = append(e, &mut out),
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::error!(error = %e, "writing the audit trail failed");
        }
        std::thread::sleep(LINGER);
        next = match rx.try_recv() {
            Ok(e) => Some(e),
            Err(mpsc::TryRecvError::Empty) => rx.recv().ok(),
            Err(mpsc::TryRecvError::Disconnected) => None,
        };
    }
    let _ = out.flush();
    let _ = out.get_ref().sync_all();
    tracing::info!(seq, head = %prev, "audit trail closed");
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

fn last_line(path: &Path) -> anyhow::Result<Option<String>> {
    let mut last = None;
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    Ok(last)
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub lines: u64,
    pub head: String,
}

/// Checks the whole chain of an audit file; the error names the first line that breaks it.
pub fn verify(path: &Path) -> anyhow::Result<Verified> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut prev = ZERO_HASH.to_string();
    let mut n = 0u64;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("line {line_no}: not text"))?;
        let (body, hash) = split_hash(&line)
            .with_context(|| format!("line {line_no}: no hash at the end of the line"))?;
        if sha256_hex(body.as_bytes()) != hash {
            anyhow::bail!("line {line_no}: its hash does not match its content (altered)");
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("line {line_no}: not a JSON object"))?;
        if v["prev"].as_str() != Some(prev.as_str()) {
            anyhow::bail!(
                "line {line_no}: it does not follow the line before it (a line was removed, \
                 inserted or moved)"
            );
        }
        if v["seq"].as_u64() != Some(n + 1) {
            anyhow::bail!(
                "line {line_no}: sequence number {} where {} was due",
                v["seq"],
                n + 1
            );
        }
        n += 1;
        prev = hash.to_string();
    }
    Ok(Verified {
        lines: n,
        head: prev,
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
            outcome: "allowed",
            error: None,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_348_800_123), "2026-11-22T12:00:00.123Z");
    }

    #[test]
    fn chain_continues_across_restarts_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for ops in [["Encrypt", "Decrypt"], ["CreateKey", "ListKeys"]] {
            let a = Audit::open(
                &path,
                ArnScope {
                    partition: "aws".into(),
                    region: "us-east-1".into(),
                    account_id: "111122223333".into(),
                },
            )
            .unwrap();
            for op in ops {
                a.record(entry(op));
            }
            a.close();
        }
        let good = std::fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&path).unwrap().lines, 4);
        let lines: Vec<&str> = good.lines().collect();
        let write = |ls: &[&str]| std::fs::write(&path, ls.join("\n") + "\n").unwrap();
        write(&[lines[0], lines[2], lines[3]]);
        assert!(verify(&path).is_err(), "removed line");
        write(&[lines[0], lines[2], lines[1], lines[3]]);
        assert!(verify(&path).is_err(), "reordered lines");
        let altered = lines[1].replace("Decrypt", "Encrypt");
        write(&[lines[0], &altered, lines[2], lines[3]]);
        assert!(verify(&path).is_err(), "altered line");
        write(&[lines[1], lines[2], lines[3]]);
        assert!(verify(&path).is_err(), "removed first line");
    }
}
