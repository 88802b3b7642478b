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

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use runner_monitor_common::WAKEUP_POLL_MS;

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

/// Reads `ring` until `stop` fires or the receiver is dropped. On stop, everything still in the
/// ring buffer is read and handed on first: a clean shutdown loses nothing.
pub async fn run(
    ring: RingBuf<MapData>,
    mut decoder: Decoder,
    events: mpsc::Sender<Vec<Event>>,
    counters: Arc<ReaderCounters>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut stopping = false;
    // Producers wake the reader only when the backlog passes `WAKEUP_BYTES`; below it the reader
    // polls, which saves the traced syscall an inter-processor interrupt per event.
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(WAKEUP_POLL_MS));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
