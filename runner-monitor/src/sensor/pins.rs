//! Kernel state that outlives the agent: the process and job maps, the jobs' containers and
//! their connections to a runtime's socket (and the bitmap of processes with one), job TCP
//! sockets' TLS state and the event ring buffer, pinned on bpffs (the probes' links are pinned
//! by `links.rs`).
//!
//! The ring buffer's pin is named after this build's kernel object (`events-<hash>`): a build with
//! the same object writes the same records, so a restarted agent reads what the probes recorded
//! while no agent ran; a different build's ring buffer is removed (what it held is not read).
//!
//! A restarted agent (crash, upgrade, `systemctl restart`) loads its programs with these maps
//! instead of empty ones, so every process the kernel attributed to a job still is. A pin whose
//! shape no longer matches this build (an upgrade changed the map) is removed, with a warning:
//! the jobs it held cannot be followed any more, and the new agent starts afresh.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use runner_monitor_common::{
    CONTAINER_ID_LEN, JobState, MAX_JOBS, MAX_TRACKED_PROCESSES, ProcessJob, RING_BUFFER_BYTES,
    container::{MAX_CONTAINERS, MAX_UNIX_CONNS, RUNTIME_TGID_WORDS},
    map_name,
    tls::{MAX_TLS_WATCHES, TLS_SOCKET_BYTES, TLS_WATCH_BYTES},
};

use super::SensorError;

/// bpffs's `statfs` magic number.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The ring buffer's pin name for the kernel object `object`.
pub fn events_pin_name(object: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    object.hash(&mut h);
    format!("events-{:016x}", h.finish())
}

/// A map to pin: its name in the object, its pin path, and whether a pin was already there.
#[derive(Debug)]
pub struct Pin {
    pub name: &'static str,
    pub path: PathBuf,
    pub existed: bool,
}

/// The maps that carry job attribution across restarts, with their expected shape
/// (key size, value size, capacity).
fn pinned_maps() -> [(&'static str, u32, u32, u32); 8] {
    [
        (
            map_name::PROCESSES,
            size_of::<u32>() as u32,
            size_of::<ProcessJob>() as u32,
            MAX_TRACKED_PROCESSES,
        ),
        (
            map_name::JOBS,
            size_of::<u64>() as u32,
            size_of::<JobState>() as u32,
            MAX_JOBS,
        ),
        // A job's containers: a `docker exec` into one after a restart is still the job's.
        (
            map_name::CONTAINER_CGROUPS,
            size_of::<u64>() as u32,
            size_of::<u64>() as u32,
            MAX_CONTAINERS,
        ),
        (
            map_name::REQUESTED_CONTAINERS,
            CONTAINER_ID_LEN as u32,
            size_of::<u64>() as u32,
            MAX_CONTAINERS,
        ),
        // Job processes' connections to a runtime's socket: a start request sent on one made
        // before a restart is still the job's.
        (
            map_name::UNIX_CONNS,
            size_of::<u64>() as u32,
            size_of::<u64>() as u32,
            MAX_UNIX_CONNS,
        ),
        // The processes in it (a bitmap every write asks first).
        (
            map_name::RUNTIME_TGIDS,
            size_of::<u32>() as u32,
            size_of::<u64>() as u32,
            RUNTIME_TGID_WORDS,
        ),
        // Job TCP sockets' TLS state (socket-local storage, no capacity): a connection refused
        // for its server name stays refused under the next agent, retransmissions included.
        (
            map_name::TLS_SOCKETS,
            size_of::<i32>() as u32,
            TLS_SOCKET_BYTES,
            0,
        ),
        // And those whose server name is only reported: one connected before a restart and
        // sending its ClientHello after is still reported.
        (
            map_name::TLS_WATCHES,
            size_of::<u32>() as u32,
            TLS_WATCH_BYTES,
            MAX_TLS_WATCHES,
        ),
    ]
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SensorError + '_ {
    move |source| SensorError::Pins {
        path: path.to_path_buf(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the struct we own.
    unsafe {
        let mut st = std::mem::zeroed::<libc::statfs>();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The pin directory, locked (flock) for one agent: two agents sharing the maps would each
/// remove the other's processes as dead when they reconcile.
#[derive(Debug)]
pub struct PinDir {
    pub pins: Vec<Pin>,
    _lock: std::fs::File,
}

/// Makes `dir` usable for pins (mounting bpffs at /sys/fs/bpf when nothing is mounted there),
/// locks it, and checks the pins already in it.
pub fn prepare(dir: &Path, events: &str) -> Result<PinDir, SensorError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        if parent == Path::new("/sys/fs/bpf") {
            let target = c"/sys/fs/bpf";
            // SAFETY: mount(2) with static NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(io(parent)(std::io::Error::last_os_error()));
            }
            tracing::info!("mounted bpffs at /sys/fs/bpf");
        } else {
            return Err(io(parent)(std::io::Error::other(
                "not on a bpf filesystem (mount -t bpf bpf DIR)",
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock = std::fs::File::open(dir).map_err(io(dir))?;
    // SAFETY: flock on an fd we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(SensorError::PinsInUse(dir.to_path_buf()));
    }
    // Another build's ring buffer: its records may not be this build's.
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("events-") && name != events {
            tracing::warn!(path = %entry.path().display(),
                "events an earlier build's probes recorded while no agent ran are not read \
                 (another build): removed");
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    let mut out = Vec::new();
    let events_map = (map_name::EVENTS, 0, 0, RING_BUFFER_BYTES);
    for (name, key_size, value_size, capacity) in pinned_maps().into_iter().chain([events_map]) {
        let path = dir.join(if name == map_name::EVENTS {
            events
        } else {
            name
        });
        let mut existed = path.exists();
        if existed {
            let fits = MapInfo::from_pin(&path).map(|info| {
                (info.key_size(), info.value_size(), info.max_entries())
                    == (key_size, value_size, capacity)
            });
            if !matches!(fits, Ok(true)) {
                tracing::warn!(
                    path = %path.display(),
                    "pinned kernel state is from an incompatible build or unreadable: \
                     removed; jobs it held are no longer attributed"
                );
                std::fs::remove_file(&path).map_err(io(&path))?;
                existed = false;
            }
        }
        out.push(Pin {
            name,
            path,
            existed,
        });
    }
    Ok(PinDir {
        pins: out,
        _lock: lock,
    })
}

/// Removes the pinned kernel state (`runner-monitor run --fresh-state`, uninstall): maps, ring
/// buffers and the probes' links (which detach).
pub fn remove(dir: &Path) -> Result<(), SensorError> {
    let events = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("events-"));
    for name in pinned_maps().iter().map(|m| m.0.to_owned()).chain(events) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    super::links::remove(dir).map_err(io(dir))
}

/// Removes the ring buffer's pin (a clean stop: nothing records into it any more).
pub fn remove_events(dir: &Path, events: &str) {
    let path = dir.join(events);
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "removing the ring buffer's pin");
    }
}
