//! The service log: one event, one line. Caller-chosen text (an alias name, a key id, a
//! certificate's common name) can hold newlines and terminal escapes; the writer below
//! escapes every control character of an event except its final newline, so no caller can
//! forge a log line or drive an operator's terminal. Colours are off for the same reason
//! (the log is for journald and files).

use std::io::Write;

/// Installs the subscriber: `RUST_LOG` (default `info`), to standard error.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(|| EscapingWriter(Vec::with_capacity(256)))
        .init();
}

/// Collects one formatted event; writes it, escaped, to standard error when dropped.
pub struct EscapingWriter(Vec<u8>);

impl Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EscapingWriter {
    fn drop(&mut self) {
        let line = escape(&self.0);
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

/// `event` with every control character but a final newline written as `\n`, `\r`, `\t`
/// or `\u{..}`.
pub fn escape(event: &[u8]) -> Vec<u8> {
    let (body, newline) = match event.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (event, false),
    };
    let mut out = Vec::with_capacity(event.len() + 8);
    for c in String::from_utf8_lossy(body).chars() {
        match c {
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if c.is_control() => {
                out.extend_from_slice(format!("\\u{{{:x}}}", c as u32).as_bytes())
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    if newline {
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_but_the_line_ends() {
        let event = b"request failed alias=alias/a\nFORGED level=INFO \x1b[2J tab\there\r\n";
        let out = String::from_utf8(super::escape(event)).unwrap();
        assert_eq!(
            out,
            "request failed alias=alias/a\\nFORGED level=INFO \\u{1b}[2J tab\\there\\r\n"
        );
        assert_eq!(out.matches('\n').count(), 1);
    }
}
