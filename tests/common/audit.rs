//! Audit trails: reading them, verifying them with `hsm-kms audit verify`, cutting them.

use super::*;

/// Runs `hsm-kms audit verify` (with `--config`, against the recorded heads): whether the
/// chain holds, and what the command said.
pub fn audit_verify(config: Option<&Path>, files: &[PathBuf]) -> (bool, String) {
    let mut command = Command::new(server_binary());
    command.args(["audit", "verify"]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let out = command.args(files).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Cuts the last `n` lines off a file.
pub fn cut_last_lines(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > n,
        "{} has only {} lines",
        path.display(),
        lines.len()
    );
    std::fs::write(path, lines[..lines.len() - n].join("\n") + "\n").unwrap();
}

pub fn audit_lines(h: &Harness) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&h.settings.audit.file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The outcome line of a request id (not the `intent` line a state change has before it),
/// waiting for the writer to get there.
pub async fn audit_line(h: &Harness, request_id: &str) -> serde_json::Value {
    for _ in 0..100 {
        if let Some(l) = audit_lines(h)
            .into_iter()
            .find(|l| l["request_id"] == request_id && l["outcome"] != "intent")
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit line for request {request_id}");
}

/// Asserts that the `made` changes `op` made to `key`, as the database counted them, are each
/// in the audit `lines` (of one or more trails): as an `allowed` line or, where the process
/// died before writing that, as an `intent` line with no outcome line. Returns how many
/// intents had none.
pub fn assert_changes_in_trail(lines: &[serde_json::Value], key: &str, op: &str, made: i64) -> i64 {
    let finished: std::collections::HashSet<&str> = lines
        .iter()
        .filter(|l| l["outcome"] != "intent")
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    let of_key = |l: &&serde_json::Value| {
        l["operation"] == op
            && l["resources"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.ends_with(key)))
            })
    };
    let allowed = lines
        .iter()
        .filter(of_key)
        .filter(|l| l["outcome"] == "allowed")
        .count() as i64;
    let unfinished = lines
        .iter()
        .filter(of_key)
        .filter(|l| l["outcome"] == "intent")
        .filter(|l| !finished.contains(l["request_id"].as_str().unwrap_or("")))
        .count() as i64;
    assert!(
        allowed <= made && made <= allowed + unfinished,
        "{op} on {key}: the database made {made}, the trail says {allowed} allowed and \
         {unfinished} begun and not finished"
    );
    unfinished
}
