//! Tests' view of the agent's log: the same `tracing_subscriber::fmt` layer as `main` (plain text,
//! no colours, as journald and log files get it), written into a buffer.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Runs `f` with the agent's log format captured; returns what was logged.
pub fn capture(f: impl FnOnce()) -> String {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = out.0.lock().unwrap().clone();
    String::from_utf8(bytes).expect("the log is UTF-8")
}

/// Panics when the log holds a control character other than the newline ending each record, or
/// when a record spans more than one line.
pub fn assert_safe(log: &str, records: usize) {
    assert_eq!(
        log.lines().count(),
        records,
        "forged or missing lines:\n{log}"
    );
    assert!(
        !log.replace('\n', "").contains(char::is_control),
        "raw control character in the log: {log:?}"
    );
}
