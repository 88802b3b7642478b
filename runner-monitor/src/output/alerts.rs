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

    pub fn format(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.epoch + Duration::from_nanos(monotonic_ns))
            .to_string()
    }
}

pub struct AlertWriter {
    out: Box<dyn Write + Send>,
    clock: Option<WallClock>,
}

impl AlertWriter {
    /// `-` is stdout; a path is opened for appending.
    pub fn open(target: &Path, clock: Option<WallClock>) -> std::io::Result<Self> {
        Ok(Self {
            out: super::open_append(target)?,
            clock,
        })
    }

    pub fn write(&mut self, finding: &Finding) -> std::io::Result<()> {
        let alert = Alert {
            time: self.clock.map(|c| c.format(finding.time_ns)),
            finding,
        };
        serde_json::to_writer(&mut self.out, &alert)?;
        self.out.write_all(b"\n")?;
        // Alerts are rare and urgent: each is flushed at once.
        self.out.flush()
    }
}
