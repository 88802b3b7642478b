//! The alert stream: one JSON object per finding, on stdout or appended to a file.

use std::{
    io::Write,
    path::Path,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::engine::Finding;

/// A finding as written: the finding and its wall-clock time.
#[derive(Serialize)]
pub struct Alert<'a> {
    /// RFC 3339, UTC. Absent in replay, where only the trace's monotonic time is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(flatten)]
    pub finding: &'a Finding,
}

/// Maps the kernel's CLOCK_MONOTONIC to wall-clock time.
#[derive(Clone, Copy)]
pub struct WallClock {
    /// Wall time at monotonic zero.
    epoch: SystemTime,
}

impl WallClock {
    pub fn now(monotonic_now_ns: u64) -> Self {
        Self {
            epoch: SystemTime::now() - Duration::from_nanos(monotonic_now_ns),
        }
    }

    /// For times that already are Unix nanoseconds (the fleet correlator's findings).
    pub fn unix() -> Self {
        Self {
            epoch: SystemTime::UNIX_EPOCH,
        }
    }

    pub fn format(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.epoch + Duration::from_nanos(monotonic_ns))
            .to_string()
    }
}

/// Rotate the alert file past this size, keeping this many old ones (`FILE.1` is the newest).
const ROTATE_BYTES: u64 = 64 << 20;
const ROTATE_KEEP: u32 = 5;

pub struct AlertWriter {
    out: Box<dyn Write + Send>,
    clock: Option<WallClock>,
    /// The file, when not stdout, and its size.
    file: Option<(std::path::PathBuf, u64)>,
}

impl AlertWriter {
    /// `-` is stdout; a path is opened for appending and rotated at 64 MiB (5 kept).
    pub fn open(target: &Path, clock: Option<WallClock>) -> std::io::Result<Self> {
        let file = (target.as_os_str() != "-").then(|| {
            let size = std::fs::metadata(target).map(|m| m.len()).unwrap_or(0);
            (target.to_path_buf(), size)
        });
        Ok(Self {
            out: super::open_append(target)?,
            clock,
            file,
        })
    }

    /// Alerts to `out` (no rotation): `replay` into a test, for example.
    pub fn to_writer(out: Box<dyn Write + Send>, clock: Option<WallClock>) -> Self {
        Self {
            out,
            clock,
            file: None,
        }
    }

    /// Writes one alert line; returns it (without the newline) for the other sinks.
    pub fn write(&mut self, finding: &Finding) -> std::io::Result<Vec<u8>> {
        let alert = Alert {
            time: self.clock.map(|c| c.format(finding.time_ns)),
            finding,
        };
        let line = super::jsonl::line(&alert)?;
        self.out.write_all(&line)?;
        self.out.write_all(b"\n")?;
        // Alerts are rare and urgent: each is flushed at once.
        self.out.flush()?;
        if let Some((path, size)) = &mut self.file {
            *size += line.len() as u64 + 1;
            if *size > ROTATE_BYTES {
                for n in (1..ROTATE_KEEP).rev() {
                    let _ = std::fs::rename(rotated(path, n), rotated(path, n + 1));
                }
                std::fs::rename(&*path, rotated(path, 1))?;
                self.out = super::open_append(path)?;
                *size = 0;
            }
        }
        Ok(line)
    }
}

fn rotated(path: &Path, n: u32) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    name.into()
}
