//! Kernel state that outlives the agent: the process and job maps, and the jobs' containers,
//! pinned on bpffs.
//!
//! A restarted agent (crash, upgrade, `systemctl restart`) loads its programs with these maps
//! instead of empty ones, so every process the kernel attributed to a job still is. A pin whose
//! shape no longer matches this build (an upgrade changed the map) is removed, with a warning:
//! the jobs it held cannot be followed any more, and the new agent starts afresh.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use runner_monitor_common::{
    CONTAINER_ID_LEN, JobState, MAX_JOBS, MAX_TRACKED_PROCESSES, ProcessJob,
    container::MAX_CONTAINERS, map_name,
};

use super::SensorError;

/// bpffs's `statfs` magic number.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A map to pin: its name in the object, its pin path, and whether a pin was already there.
#[derive(Debug)]
pub struct Pin {
    pub name: &'static str,
    pub path: PathBuf,
    pub existed: bool,
}

/// The maps that carry job attribution across restarts, with their expected shape
/// (key size, value size, capacity).
fn pinned_maps() -> [(&'static str, u32, u32, u32); 4] {
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
pub fn prepare(dir: &Path) -> Result<PinDir, SensorError> {
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
    let mut out = Vec::new();
    for (name, key_size, value_size, capacity) in pinned_maps() {
        let path = dir.join(name);
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

/// Removes the pinned kernel state (`runner-monitor run --fresh-state`, uninstall).
pub fn remove(dir: &Path) -> Result<(), SensorError> {
    for (name, ..) in pinned_maps() {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(())
}
