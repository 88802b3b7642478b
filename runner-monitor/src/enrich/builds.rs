//! A job's `docker build`, open while its connection lives. The job's `POST [/vN.NN]/build`
//! request, found in its API stream (`runtime_streams.rs`), opens a build slot in the kernel
//! (`runner-monitor-ebpf/src/builds.rs`), and while it is open, containers a Docker daemon
//! makes with no start request are the build's steps. The daemon
//! streams the build's output on the request's connection until the build ends, and stops the
//! build when the client goes; the kernel sees no close. So this thread looks every second at
//! each open slot's connection (`/proc/<tgid>/fd/<fd>`, the socket's inode when it first saw
//! it) and refreshes the slot while it lives, or frees it once it is gone (the process exited,
//! or the descriptor is another file now). A slot not refreshed for `BUILD_QUIET_NS` is closed
//! by the kernel itself: a stopped agent leaves no build open for long.

use std::{collections::HashMap, sync::mpsc, time::Duration};

use runner_monitor_common::{OpenBuild, container::BUILD_SLOTS};

use crate::{clock::monotonic_ns, event::JobKey};

/// How often open builds' connections are looked at.
const PERIOD: Duration = Duration::from_secs(1);

/// The kernel's build slots (`BUILDS`), as the agent reads and writes them.
pub trait BuildSlots: Send {
    fn get(&self, slot: u32) -> Result<OpenBuild, String>;
    fn set(&mut self, slot: u32, build: OpenBuild) -> Result<(), String>;
}

impl BuildSlots for crate::sensor::handles::BuildSlotsMap {
    fn get(&self, slot: u32) -> Result<OpenBuild, String> {
        Self::get(self, slot)
    }

    fn set(&mut self, slot: u32, build: OpenBuild) -> Result<(), String> {
        Self::set(self, slot, build)
    }
}

/// What descriptor `fd` of process `tgid` is now: the inode of the socket it is, or `None`
/// (gone, or not a socket). `fd` -1 (a request sent through io_uring, no descriptor known):
/// `Some(0)` while the process lives.
pub type Probe = fn(u32, i32) -> Option<u64>;

/// The descriptor as `/proc` shows it.
pub fn probe_proc(tgid: u32, fd: i32) -> Option<u64> {
    if fd < 0 {
        return std::path::Path::new(&format!("/proc/{tgid}"))
            .exists()
            .then_some(0);
    }
    let link = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What the agent's main loop tells the thread.
enum Message {
    /// A build request of job `job`, sent by `tgid` on `fd` at `at_ns`.
    Open {
        job: JobKey,
        tgid: u32,
        fd: i32,
        at_ns: u64,
    },
    /// Another request on `tgid`'s `fd`: a build there is over (HTTP/1.1 sends the next request
    /// once the answer is whole), though the connection lives on (a client's pool).
    Next { tgid: u32, fd: i32 },
}

pub struct Builds {
    queue: mpsc::SyncSender<Message>,
}

impl Builds {
    /// Starts the thread that keeps `slots` true to the builds' connections.
    pub fn spawn(slots: Box<dyn BuildSlots>) -> std::io::Result<Self> {
        let (queue, messages) = mpsc::sync_channel(64);
        std::thread::Builder::new()
            .name("builds".into())
            .spawn(move || run(messages, Watcher::new(slots, probe_proc)))?;
        Ok(Self { queue })
    }

    /// Job `job`'s build request, sent by `tgid` on `fd` (-1: unknown) at `at_ns` (the
    /// kernel's clock).
    pub fn open(&self, job: JobKey, tgid: u32, fd: i32, at_ns: u64) {
        let open = Message::Open {
            job,
            tgid,
            fd,
            at_ns,
        };
        if self.queue.try_send(open).is_err() {
            tracing::warn!(job = %job, "a build request found in a job's stream was not opened");
        }
    }

    /// Another request was sent on `tgid`'s `fd`.
    pub fn next_request(&self, tgid: u32, fd: i32) {
        if self.queue.try_send(Message::Next { tgid, fd }).is_err() {
            tracing::warn!(tgid, fd, "the end of a job's build was not noted");
        }
    }
}

fn run(messages: mpsc::Receiver<Message>, mut watcher: Watcher) {
    let mut next = std::time::Instant::now();
    loop {
        match messages.recv_timeout(next.saturating_duration_since(std::time::Instant::now())) {
            Ok(Message::Open {
                job,
                tgid,
                fd,
                at_ns,
            }) => {
                watcher.open(job, tgid, fd, at_ns);
                let lag_us = monotonic_ns().saturating_sub(at_ns) / 1000;
                tracing::info!(job = %job, tgid, lag_us, "a job's build is open");
            }
            Ok(Message::Next { tgid, fd }) => watcher.close(tgid, fd, monotonic_ns()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                watcher.check(monotonic_ns());
                next = std::time::Instant::now() + PERIOD;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A slot's build as first seen, and its connection's socket then.
struct Watched {
    build: OpenBuild,
    socket: Option<u64>,
}

struct Watcher {
    slots: Box<dyn BuildSlots>,
    probe: Probe,
    watched: HashMap<u32, Watched>,
}

/// The same build (a refresh changes only `seen_ns`).
fn same(a: &OpenBuild, b: &OpenBuild) -> bool {
    (a.job, a.ts_ns, a.tgid, a.fd) == (b.job, b.ts_ns, b.tgid, b.fd)
}

impl Watcher {
    fn new(slots: Box<dyn BuildSlots>, probe: Probe) -> Self {
        Self {
            slots,
            probe,
            watched: HashMap::new(),
        }
    }

    /// Opens job `job`'s build in the slot of lowest `OpenBuild::replace_rank`.
    fn open(&mut self, job: JobKey, tgid: u32, fd: i32, now_ns: u64) {
        let mut pick = None;
        for slot in 0..BUILD_SLOTS {
            match self.slots.get(slot) {
                Ok(b) => {
                    let rank = b.replace_rank(now_ns, tgid, fd);
                    if pick.is_none_or(|(_, lowest)| rank < lowest) {
                        pick = Some((slot, rank));
                    }
                }
                Err(error) => tracing::warn!(%error, slot, "a build slot could not be read"),
            }
        }
        let Some((slot, rank)) = pick else {
            return;
        };
        if rank > 1 {
            tracing::warn!(
                job = %job,
                "more builds are open than the kernel holds: the oldest is forgotten"
            );
        }
        let build = OpenBuild {
            job: job.0,
            ts_ns: now_ns,
            seen_ns: now_ns,
            tgid,
            fd,
        };
        // The socket now, while the request is under way.
        let socket = (self.probe)(tgid, fd);
        match self.slots.set(slot, build) {
            Ok(()) => {
                self.watched.insert(slot, Watched { build, socket });
            }
            Err(error) => tracing::warn!(%error, job = %job, "a job's build could not be opened"),
        }
    }

    /// The builds open on `tgid`'s `fd` are over.
    fn close(&mut self, tgid: u32, fd: i32, now_ns: u64) {
        for slot in 0..BUILD_SLOTS {
            let Ok(build) = self.slots.get(slot) else {
                continue;
            };
            if build.open(now_ns) && (build.tgid, build.fd) == (tgid, fd) {
                if let Err(error) = self.slots.set(slot, OpenBuild::default()) {
                    tracing::warn!(%error, slot, "a build slot could not be written");
                }
                self.watched.remove(&slot);
            }
        }
    }

    /// Refreshes each open build whose connection lives; frees the others.
    fn check(&mut self, now_ns: u64) {
        for slot in 0..BUILD_SLOTS {
            let Ok(build) = self.slots.get(slot) else {
                continue;
            };
            if !build.open(now_ns) {
                self.watched.remove(&slot);
                continue;
            }
            let probe = self.probe;
            let watched = self.watched.entry(slot).or_insert_with(|| Watched {
                build,
                socket: probe(build.tgid, build.fd),
            });
            if !same(&watched.build, &build) {
                *watched = Watched {
                    build,
                    socket: probe(build.tgid, build.fd),
                };
            }
            let alive = watched.socket.is_some() && probe(build.tgid, build.fd) == watched.socket;
            let update = if alive {
                OpenBuild {
                    seen_ns: now_ns,
                    ..build
                }
            } else {
                OpenBuild::default()
            };
            // Only this thread writes the slots: the build read above is still there.
            if let Err(error) = self.slots.set(slot, update) {
                tracing::warn!(%error, slot, "a build slot could not be written");
            }
            if !alive {
                self.watched.remove(&slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<OpenBuild>>>);

    impl BuildSlots for Memory {
        fn get(&self, slot: u32) -> Result<OpenBuild, String> {
            let slots = self.0.lock().unwrap();
            Ok(slots.get(slot as usize).copied().unwrap_or_default())
        }
        fn set(&mut self, slot: u32, build: OpenBuild) -> Result<(), String> {
            let mut slots = self.0.lock().unwrap();
            slots.resize(BUILD_SLOTS as usize, OpenBuild::default());
            slots[slot as usize] = build;
            Ok(())
        }
    }

    /// Process 10's fd 3 is socket 77 until the test's clock passes 5 s; then fd 3 is socket
    /// 78 (another connection on the same number). Process 11 lives; 12 is gone.
    fn probe(tgid: u32, fd: i32) -> Option<u64> {
        let late = CLOCK.with(|c| *c.lock().unwrap()) > 5_000_000_000;
        match (tgid, fd) {
            (10, 3) if late => Some(78),
            (10, 3) => Some(77),
            (11, -1) => Some(0),
            _ => None,
        }
    }

    thread_local! {
        static CLOCK: Mutex<u64> = const { Mutex::new(0) };
    }

    fn at(now: u64) -> u64 {
        CLOCK.with(|c| *c.lock().unwrap() = now);
        now
    }

    #[test]
    fn a_build_stays_open_while_its_connection_lives_and_closes_when_it_goes() {
        let memory = Memory::default();
        let mut watcher = Watcher::new(Box::new(memory.clone()), probe);
        watcher.open(JobKey(7), 10, 3, at(1_000_000_000));
        watcher.open(JobKey(8), 11, -1, at(1_000_000_000));
        watcher.open(JobKey(9), 12, 4, at(1_000_000_000));
        // The same connection's second request keeps its slot.
        watcher.open(JobKey(7), 10, 3, at(1_500_000_000));
        let open = |now| {
            (0..BUILD_SLOTS)
                .filter_map(|s| memory.get(s).ok().filter(|b| b.open(now)).map(|b| b.job))
                .collect::<Vec<_>>()
        };
        assert_eq!(open(1_500_000_000), [7, 8, 9]);
        watcher.check(at(2_000_000_000));
        // Process 12 is gone: its build closed; the others refreshed.
        assert_eq!(open(2_000_000_000), [7, 8]);
        let later = 2_000_000_000 + runner_monitor_common::container::BUILD_QUIET_NS;
        assert_eq!(open(later), [7, 8], "refreshed at the check");
        // Descriptor 3 is another socket now: that build is over.
        watcher.check(at(6_000_000_000));
        assert_eq!(open(6_000_000_000), [8]);
        // Another request on the connection: its build is over, though it lives on.
        watcher.close(11, -1, at(6_500_000_000));
        assert_eq!(open(6_500_000_000), Vec::<u64>::new());
    }

    #[test]
    fn without_the_agent_an_open_build_closes_by_itself() {
        let memory = Memory::default();
        let mut watcher = Watcher::new(Box::new(memory.clone()), probe);
        watcher.open(JobKey(8), 11, -1, at(1_000_000_000));
        let b = memory.get(0).unwrap();
        assert!(b.open(1_000_000_000 + runner_monitor_common::container::BUILD_QUIET_NS));
        assert!(!b.open(1_000_000_001 + runner_monitor_common::container::BUILD_QUIET_NS));
    }

    #[test]
    fn a_full_table_gives_the_oldest_builds_slot_to_a_new_one() {
        let memory = Memory::default();
        let mut watcher = Watcher::new(Box::new(memory.clone()), probe);
        for i in 0..BUILD_SLOTS {
            let (job, tgid) = (100 + u64::from(i), 1000 + i);
            watcher.open(JobKey(job), tgid, 5, at(1_000 + u64::from(i)));
        }
        watcher.open(JobKey(200), 10, 3, at(2_000));
        let jobs: Vec<_> = (0..BUILD_SLOTS)
            .map(|s| memory.get(s).unwrap().job)
            .collect();
        assert_eq!(jobs[0], 200, "{jobs:?}");
        assert_eq!(jobs[1], 101, "{jobs:?}");
    }
}
