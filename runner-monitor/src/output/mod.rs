//! Where findings, events and metrics go.

pub mod alerts;
pub mod delivery;
pub mod http;
pub mod jsonl;
pub mod metrics;

/// `-` is stdout; a path is opened for appending (created when missing).
pub fn open_append(target: &std::path::Path) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(if target.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)?,
        ))
    })
}
