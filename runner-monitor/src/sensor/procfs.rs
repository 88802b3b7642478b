//! What the sensor reads from /proc: a process's children and its start time, to attribute the
//! processes a registered job root already has and to tell a live process from a reused pid.

/// Children of a process, from every thread's `children` file.
pub(super) fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Clock ticks per second of /proc's times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// When `pid` started, in CLOCK_BOOTTIME ns (to the clock tick); `None` if it is gone.
pub fn start_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold anything: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 of proc_pid_stat(5), the 20th after the name.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(ticks * 1_000_000_000 / clock_ticks())
}

/// Whether `pid` is alive and the same process that started at `recorded_start_ns` (0: not
/// recorded, by an older path that did not know it: alive is all that can be told).
pub(super) fn same_process(pid: u32, recorded_start_ns: u64) -> bool {
    match start_ns(pid) {
        None => false,
        Some(_) if recorded_start_ns == 0 => true,
        // /proc rounds down to the tick; two ticks of slack.
        Some(start) => start.abs_diff(recorded_start_ns) <= 2 * 1_000_000_000 / clock_ticks(),
    }
}
