//! Forwarding rank output and the launcher's own messages, one whole line
//! per `write(2)`.
//!
//! Several processes usually share the terminal or pipe behind stderr: the
//! launcher, its ranks (through the forwarding threads here), and the
//! program that started the launcher (comm-perf's self-launch). Rust's
//! `eprintln!` and a `write_all` per piece make one system call per
//! formatted fragment, so lines from different writers interleaved
//! mid-line. Every line here is assembled first (prefix, text, newline) and
//! handed to the kernel in one `write`, which a pipe keeps whole up to
//! `PIPE_BUF` (4 KiB) and a terminal in practice always.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use comm_core::{CommError, Result};

/// Captured lines of one stream.
pub(crate) type Lines = Arc<Mutex<Vec<String>>>;

/// Where a forwarding thread sends the lines it reads.
pub(crate) enum Sink {
    /// Keep them (the launch outcome returns them).
    Capture(Lines),
    /// Our stdout, with an optional prefix.
    Stdout(Option<String>),
    /// Our stderr, with an optional prefix.
    Stderr(Option<String>),
}

/// Writes `line` (without its newline) to `out` as `prefix line\n` in one
/// write call.
pub(crate) fn write_whole_line(
    out: &mut impl Write,
    prefix: Option<&str>,
    line: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    if let Some(p) = prefix {
        scratch.extend_from_slice(p.as_bytes());
    }
    scratch.extend_from_slice(line);
    scratch.push(b'\n');
    out.write_all(scratch)?;
    out.flush()
}

/// The launcher's own message on stderr: `distrun: <msg>`, one write.
pub(crate) fn say(msg: impl std::fmt::Display) {
    let text = format!("distrun: {msg}");
    let mut scratch = Vec::with_capacity(text.len() + 1);
    let _ = write_whole_line(
        &mut std::io::stderr().lock(),
        None,
        text.as_bytes(),
        &mut scratch,
    );
}

/// Starts a thread that reads `src` line by line into `sink` and signals
/// `done` at end of stream.
pub(crate) fn spawn_reader(
    src: impl Read + Send + 'static,
    sink: Sink,
    done: mpsc::Sender<()>,
) -> Result<()> {
    thread::Builder::new()
        .name("distrun-output".into())
        .spawn(move || {
            let mut r = BufReader::new(src);
            let mut buf = Vec::with_capacity(256);
            let mut scratch = Vec::with_capacity(256);
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                match &sink {
                    Sink::Capture(lines) => {
                        if buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                        let s = String::from_utf8_lossy(&buf).into_owned();
                        if let Ok(mut g) = lines.lock() {
                            g.push(s);
                        }
                    }
                    Sink::Stdout(prefix) => {
                        let _ = write_whole_line(
                            &mut std::io::stdout().lock(),
                            prefix.as_deref(),
                            &buf,
                            &mut scratch,
                        );
                    }
                    Sink::Stderr(prefix) => {
                        let _ = write_whole_line(
                            &mut std::io::stderr().lock(),
                            prefix.as_deref(),
                            &buf,
                            &mut scratch,
                        );
                    }
                }
            }
            let _ = done.send(());
        })
        .map(|_| ())
        .map_err(|e| CommError::io("starting an output-forwarding thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts write calls.
    struct Calls(Vec<Vec<u8>>);
    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_prefixed_line_is_one_write() {
        let mut c = Calls(Vec::new());
        let mut scratch = Vec::new();
        write_whole_line(&mut c, Some("[rank 3] "), b"hello", &mut scratch).unwrap();
        write_whole_line(&mut c, None, b"", &mut scratch).unwrap();
        assert_eq!(c.0, [b"[rank 3] hello\n".to_vec(), b"\n".to_vec()]);
    }
}
