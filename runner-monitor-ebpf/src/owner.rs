//! Who owns a socket the cgroup programs remember: the job process that connected or sent, kept
//! so that socket-buffer programs (which run in no particular task) can report for it. Used by
//! `net.rs` (DNS) and `tls.rs` (server names).

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::bpf_get_current_cgroup_id,
};
use runner_monitor_common::{COMM_LEN, EventKind, ProcessJob};

use crate::{emit::fill_job, maps::now_ns};

/// Who owns a remembered socket (one that talks to port 53, or a job's TCP socket whose first
/// segment `tls.rs` reads).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketOwner {
    job: u64,
    cgroup_id: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    uid: u32,
    process_flags: u32,
    _pad: u32,
    comm: [u8; COMM_LEN],
}

impl SocketOwner {
    /// The current task, a process of the job `process` says.
    #[inline(always)]
    pub fn current(process: &ProcessJob) -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        Self {
            job: process.job,
            // SAFETY: helper without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid: pid_tgid as u32,
            tgid: (pid_tgid >> 32) as u32,
            ppid: process.ppid,
            uid: bpf_get_current_uid_gid() as u32,
            process_flags: process.flags,
            _pad: 0,
            comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        }
    }

    /// Fills `h` (an event of `kind` sent from a socket-buffer program, which runs in no
    /// particular task) with the owner's process and job.
    #[inline(always)]
    pub fn fill_header(&self, h: &mut runner_monitor_common::EventHeader, kind: EventKind) {
        h.kind = kind as u32;
        h.ts_ns = now_ns();
        h.cgroup_id = self.cgroup_id;
        h.pid = self.pid;
        h.tgid = self.tgid;
        h.uid = self.uid;
        h.comm = self.comm;
        let process = ProcessJob {
            job: self.job,
            ppid: self.ppid,
            flags: self.process_flags,
            start_ns: 0,
        };
        fill_job(h, Some(&process));
    }

    #[inline(always)]
    pub fn job(&self) -> u64 {
        self.job
    }
}
