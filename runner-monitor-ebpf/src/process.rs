//! Process lifecycle and in-kernel job attribution.
//!
//! A process belongs to a job when it is in `PROCESSES`. Entries come from four places: a job
//! root recognised at exec by its new environment (a job marker variable, `env.rs`) or by its
//! executable name (`NAMES`, kind job-root-exe), a child of a job parent, a root the agent
//! registers, and fork, where the child inherits its parent's job before it ever runs. So a
//! double fork, `setsid` or re-parenting to init cannot leave the job.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_probe_read_kernel_str,
            bpf_probe_read_user_str,
        },
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use runner_monitor_common::{
    ARG_LEN, ARGV_LEN, ARGV_MAX_ARGS, DNS_NETNS_WANTED_EXEC, EXIT_CODE_KNOWN,
    EXIT_KILLED_BY_SIGNAL, EventKind, ExecEvent, ExitEvent, ForkEvent, HEADER_TRUNCATED, JOB_ENDED,
    JobEnvEvent, JobState, NAME_KIND_JOB_PARENT_COMM, NAME_KIND_JOB_ROOT_EXE, PATH_LEN,
    PROCESS_JOB_ROOT, ProcessJob, counter, setting,
};

use aya_log_ebpf::warn;

use crate::{
    args::{field, syscall_arg, syscall_ret},
    emit::{fill_header, send, send_built},
    files::read_user_path,
    maps::{
        JOBS, PRIVATE_EVENT_MAP_ENTRIES, PRIVATE_MAP_ENTRIES, PROCESSES, count, current_process,
        current_tgid, now_ns,
    },
    names::{self, NAMES, comm_key, key_of, split},
};

/// An exec event being built, with room behind `argv` so that an argument read at any offset
/// below `ARGV_LEN` stays inside the map value.
#[repr(C)]
struct ExecScratch {
    event: ExecEvent,
    // VERIFIER: the verifier bounds `offset + ARG_LEN`, not the string's real length.
    _slack: [u8; ARG_LEN],
}

#[map]
static EXEC_SCRATCH: PerCpuArray<ExecScratch> = PerCpuArray::with_max_entries(1, 0);

/// thread id -> exec arguments read at `execve` entry, sent when the exec succeeds.
#[map]
static PENDING_EXECS: HashMap<u32, ExecScratch> =
    HashMap::with_max_entries(PRIVATE_EVENT_MAP_ENTRIES, 0);

/// tgid -> status passed to `exit_group`, for the exit event.
#[map]
static EXIT_CODES: HashMap<u32, i32> = HashMap::with_max_entries(PRIVATE_MAP_ENTRIES, 0);

const CLONE_THREAD: u64 = 0x0001_0000;

/// Offsets of the fields read from `task:task_newtask`, `sched:sched_process_exec` and
/// `sched:sched_process_exit` records (after the 8-byte common header; see their `format` files).
mod offsets {
    /// task_newtask: `pid_t pid`.
    pub const NEWTASK_PID: usize = 8;
    /// task_newtask: `u64 clone_flags`.
    pub const NEWTASK_CLONE_FLAGS: usize = 32;
    /// sched_process_exec: `__data_loc char[] filename` (offset in the low 16 bits).
    pub const EXEC_FILENAME: usize = 8;
    /// sched_process_exec: `pid_t old_pid`.
    pub const EXEC_OLD_PID: usize = 16;
}

// task:task_newtask: pid_t pid; char comm[16]; u64 clone_flags; short oom_score_adj
// Runs in the parent, before the child can run.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let clone_flags: u64 = field(&ctx, offsets::NEWTASK_CLONE_FLAGS);
    if clone_flags & CLONE_THREAD != 0 {
        // Threads share the process's entry (lookups are by tgid).
        return 0;
    }
    let Some(parent) = current_process() else {
        job_parent_fork(&ctx);
        return 0;
    };
    let child: i32 = field(&ctx, offsets::NEWTASK_PID);
    let child = child as u32;
    let entry = ProcessJob {
        job: parent.job,
        ppid: current_tgid(),
        flags: 0,
        start_ns: boot_ns(),
    };
    if PROCESSES.insert(child, entry, 0).is_err() {
        count(counter::PROCESS_MAP_FULL);
        warn!(
            &ctx,
            "process map full: child {} of job process {} is untracked", child, entry.ppid
        );
    }
    crate::runtime_requests::forked(entry.ppid, child);
    send(EventKind::Fork, Some(&parent), |e: &mut ForkEvent| {
        e.child_tgid = child;
        e._pad = 0;
    });
    0
}

/// A fork by a job parent (outside any job): the child is the root of a new job.
#[inline(always)]
fn job_parent_fork(ctx: &TracePointContext) {
    // Without job-parent names configured, a fork outside a job costs one lookup.
    if crate::names::setting(runner_monitor_common::setting::JOB_PARENTS) == 0 {
        return;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return;
    };
    let key = comm_key(NAME_KIND_JOB_PARENT_COMM, &comm);
    if NAMES.get_ptr(key).is_none() {
        return;
    }
    let child: i32 = field(ctx, offsets::NEWTASK_PID);
    let child = child as u32;
    if start_job(child, current_tgid(), boot_ns()).is_none() {
        warn!(
            ctx,
            "job map or process map full: job root {} is untracked", child
        );
    }
}

/// CLOCK_BOOTTIME now: at fork, the child's start time as /proc shows it (to the tick).
#[inline(always)]
fn boot_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() }
}

/// A new job rooted at `root` (started at `start_ns`, 0 if unknown), in the kernel's maps;
/// `None` (counted) when a map is full.
#[inline(always)]
fn start_job(root: u32, ppid: u32, start_ns: u64) -> Option<ProcessJob> {
    let job = new_job_key();
    let state = JobState {
        root_tgid: root,
        flags: 0,
        started_ns: now_ns(),
        ended_ns: 0,
    };
    if JOBS.insert(job, state, 0).is_err() {
        count(counter::JOB_MAP_FULL);
        return None;
    }
    let entry = ProcessJob {
        job,
        ppid,
        flags: PROCESS_JOB_ROOT,
        start_ns,
    };
    if PROCESSES.insert(root, entry, 0).is_err() {
        let _ = JOBS.remove(job);
        count(counter::PROCESS_MAP_FULL);
        return None;
    }
    Some(entry)
}

/// Reads up to `ARGV_MAX_ARGS` arguments into `scratch.event.argv`.
#[inline(always)]
fn read_argv(scratch: &mut ExecScratch, argv: u64) {
    let event = &mut scratch.event;
    event.argc = 0;
    event.argv_len = 0;
    if argv == 0 {
        return;
    }
    let mut offset: usize = 0;
    for i in 0..ARGV_MAX_ARGS {
        // SAFETY: checked read of a user pointer.
        let Ok(ptr) = (unsafe { bpf_probe_read_user((argv as *const u64).add(i as usize)) }) else {
            break;
        };
        if ptr == 0 {
            break;
        }
        event.argc = i + 1;
        if offset >= ARGV_LEN - 1 {
            event.header.flags |= HEADER_TRUNCATED;
            continue;
        }
        // VERIFIER: masked so the verifier knows offset < ARGV_LEN; the scratch has ARG_LEN bytes
        // of slack behind argv.
        let at = offset & (ARGV_LEN - 1);
        // SAFETY: writes at most ARG_LEN bytes at argv[at], inside the scratch value.
        let n = unsafe {
            bpf_probe_read_user_str(
                event.argv.as_mut_ptr().add(at).cast(),
                ARG_LEN as u32,
                ptr as *const _,
            )
        };
        if n <= 0 {
            count(counter::USER_READ_ERRORS);
            break;
        }
        if n as usize >= ARG_LEN {
            event.header.flags |= HEADER_TRUNCATED;
        }
        offset += n as usize;
    }
    event.argv_len = if offset > ARGV_LEN {
        event.header.flags |= HEADER_TRUNCATED;
        ARGV_LEN as u32
    } else {
        offset as u32
    };
}

/// Whether the current process (its comm, after exec the new program's) is a job parent: a
/// runner that starts jobs is never one itself, whatever its environment holds.
#[inline(always)]
fn is_job_parent() -> bool {
    if crate::names::setting(runner_monitor_common::setting::JOB_PARENTS) == 0 {
        return false;
    }
    match bpf_get_current_comm() {
        Ok(comm) => NAMES
            .get_ptr(comm_key(NAME_KIND_JOB_PARENT_COMM, &comm))
            .is_some(),
        Err(_) => false,
    }
}

/// Whether a path's basename is a configured job-root executable.
#[inline(always)]
fn is_job_root_exe(path: &[u8; PATH_LEN], len_with_nul: usize) -> bool {
    let Some(parts) = split(path, len_with_nul) else {
        return false;
    };
    match key_of(NAME_KIND_JOB_ROOT_EXE, path, parts.base_start, parts.len) {
        Some(key) => NAMES.get_ptr(key).is_some(),
        None => false,
    }
}

#[inline(always)]
fn enter_exec(filename: u64, argv: u64, envp: u64) {
    let mut process = current_process();
    if process.is_none() {
        // A job's `docker exec` into a container not its own: its command joins here.
        process = crate::containers::join_by_exec(current_tgid());
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // The new environment of a process outside any job may make it a job root; a root's may
    // name its job (a stage shell GitLab Runner forked). A job's other processes carry the
    // markers too: they are not looked at.
    let scan_env = match process {
        None => true,
        Some(p) => p.flags & PROCESS_JOB_ROOT != 0,
    };
    let marked = scan_env
        && crate::names::setting(runner_monitor_common::setting::JOB_ENV) != 0
        && crate::env::scan(envp, tid);
    let Some(scratch) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let scratch = unsafe { &mut *scratch };
    let n = read_user_path(&mut scratch.event.filename, filename);
    // Arguments are kept for job processes and for programs that may become job roots.
    if process.is_none()
        && !marked
        && !in_job_container()
        && (n == 0 || !is_job_root_exe(&scratch.event.filename, n))
    {
        return;
    }
    scratch.event.header.flags = 0;
    read_argv(scratch, argv);
    if PENDING_EXECS.insert(tid, scratch, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

// long sys_execve(const char __user *filename, const char __user *const __user *argv, ...)
#[tracepoint]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    enter_exec(
        syscall_arg(&ctx, 0),
        syscall_arg(&ctx, 1),
        syscall_arg(&ctx, 2),
    );
    0
}

// long sys_execveat(int fd, const char __user *filename, const char __user *const __user *argv,
//                   const char __user *const __user *envp, int flags)
#[tracepoint]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    enter_exec(
        syscall_arg(&ctx, 1),
        syscall_arg(&ctx, 2),
        syscall_arg(&ctx, 3),
    );
    0
}

/// A failed exec drops the kept arguments (a successful one sends them at `sched_process_exec`).
#[tracepoint]
pub fn sys_exit_exec(ctx: TracePointContext) -> u32 {
    if syscall_ret(&ctx) < 0 {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = PENDING_EXECS.remove(tid);
        let _ = crate::env::PENDING_ENVS.remove(tid);
    }
    0
}

/// A new job key: unique across CPUs, never 0, top bit clear (agent keys have it set).
#[inline(always)]
fn new_job_key() -> u64 {
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    ((now_ns() & !0xff) | (cpu & 0xff) | 0x100) & !runner_monitor_common::AGENT_JOB_KEY_BIT
}

// sched:sched_process_exec: __data_loc char[] filename; pid_t pid; pid_t old_pid
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let old_pid: i32 = field(&ctx, offsets::EXEC_OLD_PID);
    let old_pid = old_pid as u32;
    let tgid = current_tgid();
    let Some(scratch) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let scratch = unsafe { &mut *scratch };
    // The kernel's copy of the filename, from the tracepoint record.
    let data_loc: u32 = field(&ctx, offsets::EXEC_FILENAME);
    let offset = (data_loc & 0xffff) as usize;
    // SAFETY: the record holds the string at `offset`; the helper bounds the copy.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            scratch.event.filename.as_mut_ptr().cast(),
            PATH_LEN as u32,
            (ctx.as_ptr() as *const u8).add(offset).cast(),
        )
    };
    let n = if n > 0 { n as usize } else { 0 };

    let mut process = current_process();
    if process.is_none() {
        process = join_container(tgid);
        if process.is_some() {
            // A container's environment does not name (or rename) the job that started it.
            let _ = crate::env::PENDING_ENVS.remove(old_pid);
        }
    }
    let env = crate::env::PENDING_ENVS.get_ptr_mut(old_pid);
    if process.is_none() {
        // SAFETY: the entry belongs to this thread.
        let marked = env.is_some_and(|e| unsafe { (*e).markers } > 0) && !is_job_parent();
        if !marked && (n == 0 || !is_job_root_exe(&scratch.event.filename, n)) {
            let _ = PENDING_EXECS.remove(old_pid);
            if env.is_some() {
                let _ = crate::env::PENDING_ENVS.remove(old_pid);
            }
            return 0;
        }
        // A job root recognised at exec, by its environment or its name: a new job starts here,
        // before the program's first instruction.
        let Some(entry) = start_job(tgid, 0, 0) else {
            warn!(
                &ctx,
                "job map or process map full: job root {} is untracked", tgid
            );
            return 0;
        };
        process = Some(entry);
    }

    // The identity values of its environment go first, so that the agent names the job before
    // it judges the exec.
    if let Some(env) = env {
        // SAFETY: the entry belongs to this thread; sent, then removed.
        let env = unsafe { &mut *env };
        let truncated = env.header.flags & HEADER_TRUNCATED;
        fill_header(&mut env.header, EventKind::JobEnv, process.as_ref());
        env.header.flags |= truncated;
        send_built::<JobEnvEvent>(env);
        let _ = crate::env::PENDING_ENVS.remove(old_pid);
    }

    // Arguments kept at execve entry, when there are some.
    if let Some(pending) = PENDING_EXECS.get_ptr(old_pid) {
        // SAFETY: the entry belongs to this thread.
        let pending = unsafe { &(*pending).event };
        scratch.event.argv_len = pending.argv_len;
        scratch.event.argc = pending.argc;
        scratch.event.header.flags = pending.header.flags & HEADER_TRUNCATED;
        // SAFETY: same-sized kernel buffers.
        unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                scratch.event.argv.as_mut_ptr().cast(),
                ARGV_LEN as u32,
                pending.argv.as_ptr().cast(),
            );
        }
        let _ = PENDING_EXECS.remove(old_pid);
    } else {
        scratch.event.argv_len = 0;
        scratch.event.argc = 0;
        scratch.event.header.flags = 0;
    }
    let truncated = scratch.event.header.flags;
    fill_header(&mut scratch.event.header, EventKind::Exec, process.as_ref());
    scratch.event.header.flags |= truncated;
    scratch.event.filename_len = if n > 0 { (n - 1) as u32 } else { 0 };
    scratch.event._pad = 0;
    send_built::<ExecEvent>(&scratch.event);
    // A program in block mode may be in a network namespace of its own (a job's container, `ip
    // netns exec`): the agent checks that its resolver listens there before the program asks.
    if let Some(process) = process {
        crate::redirect::want_netns_unless_served(&process, tgid, DNS_NETNS_WANTED_EXEC);
    }
    0
}

/// Whether the current task runs in the cgroup of a job's container.
#[inline(always)]
fn in_job_container() -> bool {
    // SAFETY: helper without arguments.
    crate::containers::container_job(unsafe { bpf_get_current_cgroup_id() }).is_some()
}

/// A process outside any job that execs in the cgroup of a job's container joins that job,
/// before the new program's first instruction (`containers.rs`).
#[inline(always)]
fn join_container(tgid: u32) -> Option<ProcessJob> {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let entry = crate::containers::member(crate::containers::container_job(cgroup)?);
    if PROCESSES.insert(tgid, entry, 0).is_err() {
        count(counter::PROCESS_MAP_FULL);
        return None;
    }
    Some(entry)
}

// long sys_exit_group(int error_code)
#[tracepoint]
pub fn sys_enter_exit_group(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if current_process().is_none() {
        return 0;
    }
    let code: i64 = syscall_arg(&ctx, 0);
    let _ = EXIT_CODES.insert(tgid, code as i32, 0);
    0
}

// sched:sched_process_exit: char comm[16]; pid_t pid; int prio; bool group_dead
// Runs in the exiting thread; `group_dead` is set for the process's last thread.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    crate::files::forget_thread(tid);
    crate::maps::forget_connect(tid);
    // `group_dead` is where the kernel's record has it (the agent read its format); without it,
    // the leader's exit is the process's (a leader that leaves with pthread_exit before its
    // other threads ends the process early: the price of older kernels).
    let group_dead_at = crate::names::setting(runner_monitor_common::setting::EXIT_GROUP_DEAD);
    let group_dead = if group_dead_at != 0 {
        field::<u8>(&ctx, group_dead_at as usize) != 0
    } else {
        let pid_tgid = bpf_get_current_pid_tgid();
        pid_tgid as u32 == (pid_tgid >> 32) as u32
    };
    if !group_dead {
        return 0;
    }
    let tgid = current_tgid();
    // SAFETY: copied out at once.
    let code = unsafe { EXIT_CODES.get(tgid).copied() };
    let _ = EXIT_CODES.remove(tgid);
    let signal = killed_by();
    send(
        EventKind::Exit,
        Some(&process),
        |e: &mut ExitEvent| match (signal, code) {
            (Some(signal), _) => {
                e.exit_code = signal;
                e.flags = EXIT_KILLED_BY_SIGNAL;
            }
            (None, Some(code)) => {
                e.exit_code = code;
                e.flags = EXIT_CODE_KNOWN;
            }
            (None, None) => {
                e.exit_code = 0;
                e.flags = 0;
            }
        },
    );
    let _ = PROCESSES.remove(tgid);
    if process.flags & PROCESS_JOB_ROOT != 0
        && let Some(state) = JOBS.get_ptr_mut(process.job)
    {
        // The job ends when its root exits; its survivors' events now say so.
        // SAFETY: a field update of a map value.
        unsafe {
            if (*state).flags & JOB_ENDED == 0 {
                (*state).flags |= JOB_ENDED;
                (*state).ended_ns = now_ns();
            }
        }
    }
    0
}

/// The signal that killed the exiting task, from its wait status (`task_struct.exit_code`, set
/// by `do_exit` before this tracepoint: the signal in the low 7 bits, 0 for a normal exit).
#[inline(always)]
fn killed_by() -> Option<i32> {
    let offset = names::setting(setting::TASK_EXIT_CODE);
    if offset == 0 {
        return None;
    }
    // SAFETY: a checked read of the current task (bpf_probe_read_kernel).
    let status: i32 = unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + u64::from(offset - 1)) as *const i32).ok()?
    };
    let signal = status & 0x7f;
    (signal != 0 && signal != 0x7f).then_some(signal)
}
