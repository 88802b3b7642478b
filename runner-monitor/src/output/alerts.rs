//! The alert stream: one JSON object per finding (ours, or an OCSF Detection Finding), on stdout
//! or appended to a file.

use std::{
    io::Write,
    path::Path,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::ocsf::{self, AlertFormat};
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

    /// Unix nanoseconds of a monotonic time.
    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        (self.epoch + Duration::from_nanos(monotonic_ns))
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    /// For times that already are Unix nanoseconds (the fleet correlator's findings).
    pub fn unix() -> Self {
        Self {
            epoch: SystemTime::UNIX_EPOCH,
        }
    }

    pub fn format(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.at(monotonic_ns)).to_string()
    }

    pub fn at(&self, monotonic_ns: u64) -> SystemTime {
        self.epoch + Duration::from_nanos(monotonic_ns)
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
    format: AlertFormat,
    /// The host name OCSF findings carry (`device.hostname`, and in `finding_info.uid`).
    host: String,
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
            format: AlertFormat::Json,
            host: String::new(),
        })
    }

    /// Alerts to `out` (no rotation): `replay` into a test, for example.
    pub fn to_writer(out: Box<dyn Write + Send>, clock: Option<WallClock>) -> Self {
        Self {
            out,
            clock,
            file: None,
            format: AlertFormat::Json,
            host: String::new(),
        }
    }

    /// Writes findings as `format` (ours by default). OCSF findings carry this host's name.
    pub fn with_format(mut self, format: AlertFormat) -> Self {
        self.format = format;
        if format == AlertFormat::Ocsf {
            self.host = super::delivery::hostname();
        }
        self
    }

    /// The wall clock alerts are stamped with, if any.
    pub fn clock(&self) -> Option<WallClock> {
        self.clock
    }

    /// Writes one alert line; returns it in our JSON (without the newline) for the receivers,
    /// which spool that and render their own format.
    pub fn write(&mut self, finding: &Finding) -> std::io::Result<Vec<u8>> {
        let alert = Alert {
            time: self.clock.map(|c| c.format(finding.time_ns)),
            finding,
        };
        let native = super::jsonl::line(&alert)?;
        let line = match self.format {
            AlertFormat::Json => native.clone(),
            AlertFormat::Ocsf => {
                // Replay has no wall clock: the time the finding is written stands in.
                let time = self
                    .clock
                    .map_or_else(SystemTime::now, |c| c.at(finding.time_ns));
                let value = serde_json::to_value(&alert)?;
                super::jsonl::line(&ocsf::detection_finding(finding, &value, time, &self.host))?
            }
        };
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
        Ok(native)
    }
}

fn rotated(path: &Path, n: u32) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    name.into()
}
