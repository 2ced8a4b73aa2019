//! The service log's record of failed requests, summarised: the first failure of each
//! operation and exception in an interval is logged in full, the rest are counted and
//! reported once when the interval is over. During an HSM outage every request fails, and a
//! line per request would write gigabytes; the metrics and the audit trail keep the
//! per-request record.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How often each kind of failure is logged in full at most.
pub const INTERVAL: Duration = Duration::from_secs(10);

struct Window {
    /// When the last full line was logged.
    logged: Instant,
    /// Failures since then that were only counted.
    suppressed: u64,
}

static WINDOWS: LazyLock<Mutex<HashMap<(&'static str, &'static str), Window>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Logs a failed request, or counts it when one like it was logged within `INTERVAL`.
pub fn note(
    op: &'static str,
    error: &'static str,
    message: &str,
    request_id: &uuid::Uuid,
    source: Option<std::net::SocketAddr>,
) {
    let now = Instant::now();
    let suppressed = {
        let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        match windows.get_mut(&(op, error)) {
            Some(w) if now.duration_since(w.logged) < INTERVAL => {
                w.suppressed += 1;
                return;
            }
            Some(w) => {
                w.logged = now;
                std::mem::take(&mut w.suppressed)
            }
            None => {
                windows.insert(
                    (op, error),
                    Window {
                        logged: now,
                        suppressed: 0,
                    },
                );
                0
            }
        }
    };
    if suppressed > 0 {
        tracing::info!(
            op,
            error,
            count = suppressed,
            "more requests failed like this one (not logged one by one)"
        );
    }
    let source = source.map(|s| s.to_string());
    tracing::info!(op, error, detail = %message, %request_id, source = source.as_deref().unwrap_or("-"), "request failed");
}

/// Reports the counts of intervals that are over (called every `INTERVAL`).
pub fn flush() {
    let now = Instant::now();
    let mut done = Vec::new();
    {
        let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        windows.retain(|key, w| {
            if now.duration_since(w.logged) < INTERVAL {
                return true;
            }
            if w.suppressed > 0 {
                done.push((*key, w.suppressed));
            }
            false
        });
    }
    for ((op, error), count) in done {
        tracing::info!(
            op,
            error,
            count,
            "more requests failed (not logged one by one)"
        );
    }
}

/// Calls `flush` every `INTERVAL` until aborted.
pub fn spawn_flusher() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tick.tick().await;
            flush();
        }
    })
}
