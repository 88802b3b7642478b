//! Reading the ring buffer: polled every few milliseconds and woken through epoll (`AsyncFd`) when
//! the backlog grows, drain everything that is there, decode, and hand the events on through a
//! bounded channel, a batch at a time (one channel operation per batch, not per event).
//!
//! Back-pressure goes to the kernel: when the consumer is slow the reader waits on the channel,
//! the ring buffer fills, and the kernel counts what it cannot reserve. Nothing is dropped here
//! without being counted.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use runner_monitor_common::{
    READER_IDLE_POLLS, READER_SLEEP_POLL_MS, WAKEUP_POLL_MS, setting::READER_ASLEEP,
};

use super::decode::Decoder;
use crate::event::Event;

/// Events handed on at a time, at most.
pub const BATCH: usize = 256;

/// What the reader counted on the user side.
#[derive(Debug, Default)]
pub struct ReaderCounters {
    pub records: AtomicU64,
    pub decode_errors: AtomicU64,
}

/// Forwards kernel-side aya-log records to the agent's log.
pub fn spawn_kernel_log<T: log::Log + Send + 'static>(logger: aya_log::EbpfLogger<T>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        // Outside a runtime (e.g. `check`): kernel logs are not needed.
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd owns the logger.
        let Ok(mut fd) =
            (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
        else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Polling, or asleep: `READER_ASLEEP` in the settings map (`settings`, an own handle; `None`:
/// it always polls).
struct Pace {
    settings: Option<Array<MapData, u32>>,
    asleep: bool,
    empty_polls: u32,
}

impl Pace {
    /// The interval of the current pace.
    fn interval(&self) -> tokio::time::Interval {
        let ms = if self.asleep {
            READER_SLEEP_POLL_MS
        } else {
            WAKEUP_POLL_MS
        };
        let mut poll = tokio::time::interval(std::time::Duration::from_millis(ms));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll
    }

    fn set(&mut self, asleep: bool) -> bool {
        let Some(settings) = &mut self.settings else {
            return false;
        };
        if let Err(error) = settings.set(READER_ASLEEP, u32::from(asleep), 0) {
            tracing::warn!(%error, "the event reader's pace not written: it keeps polling");
            self.settings = None;
            return false;
        }
        self.asleep = asleep;
        true
    }

    /// After a look at the ring buffer that read `records`: whether the pace changed (a new
    /// interval, and when falling asleep, one more look: a record written while the flag
    /// changed woke nobody).
    fn after(&mut self, records: usize) -> bool {
        if records > 0 {
            self.empty_polls = 0;
            return self.asleep && self.set(false);
        }
        self.empty_polls = self.empty_polls.saturating_add(1);
        !self.asleep && self.empty_polls >= READER_IDLE_POLLS && self.set(true)
    }
}

/// Reads `ring` until `stop` fires or the receiver is dropped. On stop, everything still in the
/// ring buffer is read and handed on first: a clean shutdown loses nothing. `settings`: an own
/// handle on the settings map, where the reader says when it sleeps (`Pace`).
pub async fn run(
    ring: RingBuf<MapData>,
    mut decoder: Decoder,
    events: mpsc::Sender<Vec<Event>>,
    counters: Arc<ReaderCounters>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    settings: Option<Array<MapData, u32>>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut stopping = false;
    // Producers wake the reader only when the backlog passes `WAKEUP_BYTES`; below it the reader
    // polls, which saves the traced syscall an inter-processor interrupt per event. After
    // `READER_IDLE_POLLS` empty polls it sleeps, and the next record wakes it.
    let mut pace = Pace {
        settings,
        asleep: false,
        empty_polls: 0,
    };
    pace.set(false);
    let mut poll = pace.interval();
    // Set when the last drain stopped at a full batch: there is more to read now, and waiting
    // for a wake-up would be wrong (once the backlog is past the mark no producer crosses it
    // again, so none comes; each poll would read one batch).
    let mut more = false;
    loop {
        if !stopping
            && more
            && !matches!(
                stop.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        {
            stopping = true;
        }
        let drained = if stopping || more {
            drain(fd.get_mut(), &mut decoder, &counters, &mut batch)
        } else {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let drained = drain(guard.get_inner_mut(), &mut decoder, &counters, &mut batch);
                    if drained {
                        guard.clear_ready();
                    }
                    drained
                }
                _ = poll.tick() => drain(fd.get_mut(), &mut decoder, &counters, &mut batch),
                _ = &mut stop => {
                    stopping = true;
                    continue;
                }
            }
        };
        more = !drained;
        if pace.after(batch.len()) {
            poll = pace.interval();
            more |= pace.asleep;
        }
        if !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if events.send(full).await.is_err() {
                return Ok(());
            }
        }
        if stopping && drained {
            return Ok(());
        }
    }
}

/// Decodes records into `batch` until it is full (false) or the ring buffer is empty (true).
fn drain(
    ring: &mut RingBuf<MapData>,
    decoder: &mut Decoder,
    counters: &ReaderCounters,
    batch: &mut Vec<Event>,
) -> bool {
    while batch.len() < batch.capacity() {
        let Some(record) = ring.next() else {
            return true;
        };
        counters.records.fetch_add(1, Ordering::Relaxed);
        match decoder.decode(&record) {
            Ok(event) => batch.push(event),
            Err(error) => {
                counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "undecodable kernel record");
            }
        }
    }
    false
}
