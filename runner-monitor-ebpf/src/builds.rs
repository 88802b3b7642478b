//! A job's `docker build`: the daemon runs the build's steps in containers it makes itself, with
//! no start request from the job (the classic builder's `/docker/<id>` containers, BuildKit's
//! `.../buildkit/<id>` step cgroups), so steps 2 and 3 of `containers.rs` never link them. The
//! agent finds the job's `POST [/vN.NN]/build` request in the job's API stream (the bytes
//! `runtime_requests.rs` copies for it at the send) and opens a build slot here (job, time,
//! connection); while it is open, a container cgroup a Docker daemon makes that no job
//! requested is a step of that build (`containers.rs`). The agent is woken at once for every
//! send on a runtime connection; the daemon makes the first step's cgroup tens of milliseconds
//! later (it reads the build context, the Dockerfile and the base image first): the agent
//! opened the slot 1 to 4 ms after the request here, the daemon made the first step's cgroup
//! 82 ms or more after it (docs/containers.md). Read in the kernel at the send, as starts are, the request cost Linux
//! 6.1's verifier more than it allows on `sys_enter_write`.
//!
//! The build lasts as long as its connection: the daemon streams the build's output on it and
//! stops the build when the client goes. The kernel sees no close: the agent checks every second
//! that the connection still lives and refreshes the slot's `seen_ns`, or frees the slot
//! (`enrich/builds.rs`); a slot not refreshed for `BUILD_QUIET_NS` is closed by itself.
//!
//! The kernel cannot tell which daemon made a cgroup, nor which build a step is of: a container
//! some service outside jobs starts on a Docker daemon while a job's build is open is taken for a
//! step of it, and with builds of several jobs open a step is given to the oldest
//! (`MATCHED_BY_BUILD_CONTESTED`, which findings say). docs/containers.md, "docker build".

use aya_ebpf::{macros::map, maps::Array};
use runner_monitor_common::{
    CONTAINER_ID_LEN, OpenBuild,
    container::{BUILD_SLOTS, MATCHED_BY_BUILD, MATCHED_BY_BUILD_CONTESTED},
};

use crate::{
    container_refs::{Matched, each_slot},
    maps::now_ns,
};

/// The open builds (`OpenBuild`), written by the agent, which opens, refreshes and frees them.
#[map]
pub static BUILDS: Array<OpenBuild> = Array::with_max_entries(BUILD_SLOTS, 0);

// The slots are visited by a written-out sequence (`container_refs::each_slot`).
const _: () = assert!(BUILD_SLOTS == 8);

/// The build a container cgroup that no job requested is a step of: the oldest open one;
/// contested when another job's build is open too.
#[inline(always)]
pub fn open_build() -> Option<Matched> {
    let now = now_ns();
    let mut job = 0u64;
    let mut since = u64::MAX;
    let mut contested = false;
    macro_rules! oldest {
        ($slot:expr) => {
            if let Some(b) = BUILDS.get($slot)
                && b.open(now)
            {
                if job != 0 && b.job != job {
                    contested = true;
                }
                if b.ts_ns < since {
                    since = b.ts_ns;
                    job = b.job;
                }
            }
        };
    }
    each_slot!(oldest);
    if job == 0 {
        return None;
    }
    Some(Matched {
        job,
        how: if contested {
            MATCHED_BY_BUILD_CONTESTED
        } else {
            MATCHED_BY_BUILD
        },
        waited_ns: now.saturating_sub(since),
        reference: [0; CONTAINER_ID_LEN],
    })
}
