//! How full the event ring buffer is: the kernel's producer and consumer positions, read from
//! their own read-only mappings of the ring buffer map (the same pages libbpf and aya map).

use std::os::fd::RawFd;

pub struct RingFill {
    consumer: *mut libc::c_void,
    producer: *mut libc::c_void,
    page: usize,
    size: u64,
}

// SAFETY: the mappings are read-only shared pages the kernel updates; reading them from any
// thread is what they are for.
unsafe impl Send for RingFill {}
unsafe impl Sync for RingFill {}

impl RingFill {
    /// Maps the position pages of the ring buffer `fd` of `size` data bytes.
    pub fn new(fd: RawFd, size: u64) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |offset: usize| {
            // SAFETY: a fresh read-only shared mapping of the map's position page.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(ptr)
            }
        };
        let consumer = map(0)?;
        let producer = match map(page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmapping what was just mapped.
                unsafe { libc::munmap(consumer, page) };
                return Err(e);
            }
        };
        Ok(Self {
            consumer,
            producer,
            page,
            size,
        })
    }

    /// Share of the ring buffer holding records not read yet, 0 to 1.
    pub fn ratio(&self) -> f64 {
        // SAFETY: both pages start with the kernel's u64 position, 8-aligned.
        let (consumer, producer) = unsafe {
            (
                std::ptr::read_volatile(self.consumer.cast::<u64>()),
                std::ptr::read_volatile(self.producer.cast::<u64>()),
            )
        };
        (producer.saturating_sub(consumer) as f64 / self.size as f64).clamp(0.0, 1.0)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings once.
        unsafe {
            libc::munmap(self.consumer, self.page);
            libc::munmap(self.producer, self.page);
        }
    }
}
