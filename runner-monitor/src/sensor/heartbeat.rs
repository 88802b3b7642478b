//! The agent's heartbeat in the settings map, for programs that outlive it.

use aya::maps::{Array, MapData};
use runner_monitor_common::setting;

/// Writes the monotonic second into `setting::AGENT_HEARTBEAT` every second, from a thread of
/// its own (a busy event loop is not a dead agent). Programs left attached after the agent's
/// process is gone see it go stale and apply `[egress] on_agent_failure`.
pub(super) struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Heartbeat {
    /// Starts it on the settings map, through a handle of its own (`Sensor::settings_handle`:
    /// a copy of the map's descriptor, since opening the map by its id needs CAP_SYS_ADMIN,
    /// which the unit does not grant).
    pub(super) fn start(own: Option<Array<MapData, u32>>) -> Option<Self> {
        let Some(mut own) = own else {
            tracing::warn!(
                "no heartbeat (the settings map could not be opened again): on_agent_failure \
                 will not apply"
            );
            return None;
        };
        let beat = |settings: &mut Array<MapData, u32>| {
            let now = (crate::clock::monotonic_ns() / 1_000_000_000) as u32;
            settings.set(setting::AGENT_HEARTBEAT, now.max(1), 0)
        };
        if let Err(error) = beat(&mut own) {
            tracing::warn!(%error, "no heartbeat: on_agent_failure will not apply");
            return None;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::park_timeout(std::time::Duration::from_secs(1));
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if let Err(error) = beat(&mut own) {
                        tracing::warn!(%error, "heartbeat not written");
                    }
                }
            })
            .ok()?;
        Some(Self { stop, thread })
    }

    /// Stops the thread and waits for it: nothing writes the heartbeat after this returns.
    pub(super) fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}
