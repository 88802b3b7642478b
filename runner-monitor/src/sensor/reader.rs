//! Reading the ring buffer: woken through epoll (`AsyncFd`), drain everything that is there,
//! decode, and hand the events on through a bounded channel.
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

use super::decode::Decoder;
use crate::event::Event;

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

/// Reads `ring` until the receiver is dropped. Decoding happens here, in order.
pub async fn run(
    ring: RingBuf<MapData>,
    mut decoder: Decoder,
    events: mpsc::Sender<Event>,
    counters: Arc<ReaderCounters>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut batch = Vec::with_capacity(256);
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            counters.records.fetch_add(1, Ordering::Relaxed);
            match decoder.decode(&record) {
                Ok(event) => batch.push(event),
                Err(error) => {
                    counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "undecodable kernel record");
                }
            }
            if batch.len() == batch.capacity() {
                break;
            }
        }
        let drained = batch.len() < batch.capacity();
        if drained {
            guard.clear_ready();
        }
        drop(guard);
        for event in batch.drain(..) {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}
