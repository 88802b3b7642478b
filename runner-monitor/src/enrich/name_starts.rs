//! Starts by name made exact: when a job asks the daemon to start a container by name (`docker
//! start web`, `POST /containers/web/start`), the kernel remembers a pending start and tells the
//! agent (`container_start`). The daemon then takes tens of milliseconds to make the container's
//! cgroup (65-135 ms measured here); in that time this asks the same daemon, at the socket the
//! job connected to, which container the name is (the container list filtered by name answers
//! while the start is under way), registers its id as the job's in the kernel's
//! requested-container map and frees the pending start. The cgroup then matches by its id,
//! exactly as a start by id does, and no other container can take the start by the kernel's
//! first-in first-out guess.
//!
//! When the answer is late (the cgroup was made first) or missing (the daemon does not answer,
//! no such name), the kernel's guess stands and the container's naming checks it, as before
//! (docs/containers.md). The asking runs on a thread of its own, one start at a time, never on
//! the event path.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::{
    bounded::BoundedMap,
    clock::monotonic_ns,
    docker_api,
    event::{JobKey, RequestedAs},
    sensor::handles::Asked,
};

/// How long the daemon may take to answer: past the time it takes to make the cgroup the
/// answer is of no use.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The most of an answer read (a list of the containers with that name: one).
const MAX_ANSWER: u64 = 1 << 20;
/// Starts waiting to be asked; more are left to the kernel's guess.
const QUEUE: usize = 64;
/// How long the container the daemon named for a job's inspect stands for that job's exec of
/// the same name (`docker exec` sends its inspect a few milliseconds before the exec).
const LOOKED_UP_FOR_NS: u64 = 2_000_000_000;
/// Inspects' answers kept at once (the oldest is forgotten).
const LOOKED_UP: usize = 256;

/// For a start: registers container `id` (64 hex digits) as job `job`'s in the kernel and frees
/// the pending start if it is still that start: `Ok(true)`; `Ok(false)` when the pending start
/// was gone (its container's cgroup was made first and took it). For an exec: marks the
/// container's cgroup for the job's command: `Ok(false)` when the kernel does not know the
/// container.
pub type Register = Box<dyn FnMut(&str, JobKey, Asked) -> Result<bool, String> + Send>;

struct Start {
    socket: PathBuf,
    reference: String,
    job: JobKey,
    asked: Asked,
}

/// What the thread is asked to do, in the order the job's requests came.
enum Request {
    Register(Start),
    /// A job's inspect of a container by name or short id at a daemon: looked up for the exec
    /// that may follow (`exec`).
    LookUp(Inspected),
}

/// A job's inspect: (daemon socket, job, reference).
type Inspected = (PathBuf, JobKey, String);

/// An inspect -> the container's id and when the daemon named it.
type LookedUp = BoundedMap<Inspected, (String, u64)>;

/// A name resolved to its container before the container's cgroup was made.
#[derive(Clone, Debug)]
struct Resolved {
    reference: String,
    pending_ns: u64,
    resolved_ns: u64,
}

pub struct NameStarts {
    starts: mpsc::SyncSender<Request>,
    /// container id -> how its name was resolved, until its container event.
    resolved: Arc<Mutex<BoundedMap<String, Resolved>>>,
}

impl NameStarts {
    /// Starts the thread that asks the daemons and registers through `register`.
    pub fn spawn(register: Register) -> std::io::Result<Self> {
        let (starts, queue) = mpsc::sync_channel(QUEUE);
        let resolved = Arc::new(Mutex::new(BoundedMap::new(256)));
        let table = resolved.clone();
        std::thread::Builder::new()
            .name("name-starts".into())
            .spawn(move || run(queue, register, &table))?;
        Ok(Self { starts, resolved })
    }

    /// A job's start by name `reference` at the Docker socket `socket`: asked at once.
    pub fn ask(&self, socket: &str, reference: &str, job: JobKey, slot: u32, pending_ns: u64) {
        let start = Start {
            socket: socket.into(),
            reference: reference.to_owned(),
            job,
            asked: Asked::Start { slot, pending_ns },
        };
        if self.starts.try_send(Request::Register(start)).is_err() {
            tracing::warn!(
                reference,
                "too many container starts by name at once: this one is left to the kernel's guess"
            );
        }
    }

    /// A job's `docker exec` into the container `reference` (a name or short id) at the Docker
    /// socket `socket`: asked at once, so that the container is marked before the daemon has
    /// made the command's process.
    pub fn ask_exec(&self, socket: &str, reference: &str, job: JobKey, requested_ns: u64) {
        let exec = Start {
            socket: socket.into(),
            reference: reference.to_owned(),
            job,
            asked: Asked::Exec { requested_ns },
        };
        if self.starts.try_send(Request::Register(exec)).is_err() {
            tracing::warn!(
                reference,
                "too many container requests by name at once: this docker exec is not followed"
            );
        }
    }

    /// A job's inspect of container `reference` (a name or short id) at the Docker socket
    /// `socket`, found in its API stream: `docker exec` sends one just before its exec, so the
    /// daemon is asked now and its answer is kept for that exec (`exec`). Dropped when the
    /// thread is busy: the exec is then asked as before.
    pub fn look_up(&self, socket: &str, reference: &str, job: JobKey) {
        let inspect = (socket.into(), job, reference.to_owned());
        let _ = self.starts.try_send(Request::LookUp(inspect));
    }

    /// A job's start (or attach) of container `reference` that the kernel did not read where
    /// it was sent, found in the job's API stream (`runtime_streams.rs`): a 64-digit id is
    /// registered as is; a name or short id is asked of the job's Docker socket `socket` first.
    /// `sent_ns`: when the job sent the request's last bytes (the kernel's clock).
    pub fn ask_found(&self, socket: Option<&str>, reference: &str, job: JobKey, sent_ns: u64) {
        let start = Start {
            socket: socket.map(PathBuf::from).unwrap_or_default(),
            reference: reference.to_owned(),
            job,
            asked: Asked::Found { found_ns: sent_ns },
        };
        if self.starts.try_send(Request::Register(start)).is_err() {
            tracing::warn!(
                "too many container requests at once: a start found in a job's API stream is \
                 not registered"
            );
        }
    }

    /// How container `id`'s start was asked for, when its name was resolved before its cgroup
    /// was made (`container_ns`: the container event's time).
    pub fn requested_as(&self, id: &str, container_ns: u64) -> Option<RequestedAs> {
        let r = self.resolved.lock().ok()?.remove(&id.to_owned())?;
        Some(RequestedAs {
            reference: r.reference,
            by: "name".into(),
            waited_us: container_ns.saturating_sub(r.pending_ns) / 1000,
            // The daemon's own answer named this container.
            confirmed: Some(true),
            resolved_us: Some(r.resolved_ns.saturating_sub(r.pending_ns) / 1000),
        })
    }
}

fn run(
    queue: mpsc::Receiver<Request>,
    mut register: Register,
    resolved: &Mutex<BoundedMap<String, Resolved>>,
) {
    let mut looked_up = LookedUp::new(LOOKED_UP);
    for request in queue {
        let start = match request {
            Request::LookUp(inspect) => {
                look_up(&mut looked_up, inspect);
                continue;
            }
            Request::Register(start) => start,
        };
        if let Asked::Exec { requested_ns } = start.asked {
            exec(&start, requested_ns, &mut register, &mut looked_up);
            continue;
        }
        if let Asked::Found { found_ns } = start.asked {
            found(&start, found_ns, &mut register, resolved);
            continue;
        }
        let Asked::Start { pending_ns, .. } = start.asked else {
            continue;
        };
        let id = match container_named(&start.socket, &start.reference) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::debug!(reference = %start.reference, "no container of that name");
                continue;
            }
            Err(error) => {
                tracing::debug!(reference = %start.reference, %error, "a start by name not resolved");
                continue;
            }
        };
        // In the table before the kernel's map: the container event can follow at once.
        let entry = remember(resolved, &id, &start.reference, pending_ns);
        let outcome = register(&id, start.job, start.asked);
        let after_us = entry.resolved_ns.saturating_sub(entry.pending_ns) / 1000;
        match outcome {
            Ok(true) => {
                tracing::debug!(reference = %start.reference, %id, after_us, "start by name resolved")
            }
            Ok(false) | Err(_) => {
                if let Ok(mut table) = resolved.lock() {
                    table.remove(&id);
                }
                match outcome {
                    Err(error) => {
                        tracing::warn!(%error, reference = %start.reference, "a start by name could not be registered")
                    }
                    _ => {
                        tracing::info!(reference = %start.reference, %id, after_us, "a start by name was resolved after its container was made: the kernel's guess stands")
                    }
                }
            }
        }
    }
}

/// Container `id` was resolved now from `reference`, asked at `pending_ns`: kept for its
/// container event (`requested_as`).
fn remember(
    resolved: &Mutex<BoundedMap<String, Resolved>>,
    id: &str,
    reference: &str,
    pending_ns: u64,
) -> Resolved {
    let entry = Resolved {
        reference: reference.to_owned(),
        pending_ns,
        resolved_ns: monotonic_ns(),
    };
    if let Ok(mut table) = resolved.lock() {
        table.insert(id.to_owned(), entry.clone());
    }
    entry
}

/// A start the kernel did not read, found in the job's stream at `found_ns`: the container's
/// id (the daemon's answer for a name or short id) is registered as the job's, as a start by id
/// is, before the daemon makes its cgroup (`Ok(false)`: it had made it).
fn found(
    start: &Start,
    found_ns: u64,
    register: &mut Register,
    resolved: &Mutex<BoundedMap<String, Resolved>>,
) {
    let id = if let Some(id) = full_id(&start.reference) {
        id
    } else if start.socket.as_os_str().is_empty() {
        tracing::info!(reference = %start.reference, "a start by name found in a job's API stream: no Docker socket known for the job to ask, not registered");
        return;
    } else {
        match container_referenced(&start.socket, &start.reference) {
            Ok(Some(id)) => {
                remember(resolved, &id, &start.reference, found_ns);
                id
            }
            Ok(None) => {
                tracing::debug!(reference = %start.reference, "no container of that name");
                return;
            }
            Err(error) => {
                tracing::warn!(reference = %start.reference, %error, "a start found in a job's API stream could not be resolved: not registered");
                return;
            }
        }
    };
    let after_us = monotonic_ns().saturating_sub(found_ns) / 1000;
    match register(&id, start.job, Asked::Found { found_ns }) {
        Ok(true) => {
            tracing::info!(reference = %start.reference, %id, after_us, "a start the kernel could not read where it was sent, found in the job's API stream: registered")
        }
        Ok(false) => {
            if let Ok(mut table) = resolved.lock() {
                table.remove(&id);
            }
            tracing::warn!(reference = %start.reference, %id, after_us, "a start or attach found in a job's API stream names a container the kernel already had (running before the request, e.g. an attach, or made before the registration): not made the job's")
        }
        Err(error) => {
            tracing::warn!(%error, reference = %start.reference, "a start found in a job's API stream could not be registered")
        }
    }
}

/// A job's inspect of a container by name or short id: the daemon's answer, kept for the job's
/// exec of the same reference.
fn look_up(looked_up: &mut LookedUp, inspect: Inspected) {
    let (socket, _, reference) = &inspect;
    match container_referenced(socket, reference) {
        Ok(Some(id)) => {
            looked_up.insert(inspect, (id, monotonic_ns()));
        }
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(%reference, %error, "an inspect's container not looked up")
        }
    }
}

/// A job's `docker exec` by name or short id: the daemon says which container that is (as it
/// will for the exec itself), and its cgroup is marked for the job's command. A full id (found
/// in the job's stream where the kernel could not read it) is marked as is.
///
/// The container the daemon named for the job's inspect just before (`look_up`) is marked
/// first, at once, and the daemon is asked again after: podman's answer waits for the
/// container's lock, which the exec's start holds until its command runs (73 ms measured here,
/// after the command's runc init had passed). The second answer is marked only when it names
/// another container (renamed in between); a second mark of the same one would let another
/// command there take it.
fn exec(exec: &Start, requested_ns: u64, register: &mut Register, looked_up: &mut LookedUp) {
    let asked_ns = monotonic_ns();
    let key = (exec.socket.clone(), exec.job, exec.reference.clone());
    let early = looked_up
        .remove(&key)
        .filter(|(_, at)| asked_ns.saturating_sub(*at) <= LOOKED_UP_FOR_NS)
        .map(|(id, _)| id);
    if let Some(id) = &early {
        mark(
            exec,
            id,
            requested_ns,
            asked_ns,
            register,
            "from its inspect",
        );
    }
    let id = match full_id(&exec.reference) {
        // A full id found in the job's stream: nothing to ask.
        Some(id) => Ok(Some(id)),
        None if exec.socket.as_os_str().is_empty() => {
            tracing::info!(reference = %exec.reference, "a job's docker exec by name found in its API stream: no Docker socket known for the job to ask, its command is not followed");
            return;
        }
        None => container_referenced(&exec.socket, &exec.reference),
    };
    let id = match id {
        Ok(Some(id)) => id,
        // Marked from its inspect: the daemon's second answer only checks that.
        Ok(None) | Err(_) if early.is_some() => return,
        Ok(None) => {
            tracing::info!(reference = %exec.reference, "docker exec: the daemon names no such container");
            return;
        }
        Err(error) => {
            tracing::warn!(reference = %exec.reference, %error, "a job's docker exec into a container by name could not be resolved: its command is not the job's");
            return;
        }
    };
    match early {
        Some(early) if early == id => return,
        Some(early) => {
            tracing::warn!(reference = %exec.reference, inspected = %early, %id, "the container a job's docker exec names changed since its inspect: the one the daemon names now is marked too")
        }
        None => {}
    }
    mark(exec, &id, requested_ns, asked_ns, register, "asked");
}

/// Marks container `id` for `exec`'s command (`how`: where the id came from).
fn mark(
    exec: &Start,
    id: &str,
    requested_ns: u64,
    asked_ns: u64,
    register: &mut Register,
    how: &str,
) {
    let after_us = monotonic_ns().saturating_sub(asked_ns) / 1000;
    match register(id, exec.job, Asked::Exec { requested_ns }) {
        Ok(true) => {
            tracing::debug!(reference = %exec.reference, %id, after_us, how, "docker exec by name resolved")
        }
        Ok(false) => {
            tracing::info!(reference = %exec.reference, %id, "docker exec resolved too late, or into a container whose cgroup is unknown: its command is not the job's")
        }
        Err(error) => {
            tracing::warn!(%error, reference = %exec.reference, "a docker exec could not be registered")
        }
    }
}

/// `reference` as a container's full id, when it is one (64 hex digits), lowercase.
fn full_id(reference: &str) -> Option<String> {
    (reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| reference.to_ascii_lowercase())
}

/// The full id of the container `reference` (a name or a short id) at the daemon `socket`, in
/// the daemon's own order (a name, then an id prefix). The container list answers from the
/// daemon's snapshot at once; an inspect waits for the container's lock, which the exec being
/// created holds (40-60 ms measured here: longer than the exec takes to start).
fn container_referenced(socket: &Path, reference: &str) -> std::io::Result<Option<String>> {
    if let Some(id) = container_named(socket, reference)? {
        return Ok(Some(id));
    }
    if !reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let path = format!("/containers/json?all=1&filters=%7B%22id%22%3A%5B%22{reference}%22%5D%7D");
    let answer = docker_api::get(socket, &path, TIMEOUT, MAX_ANSWER)?;
    let mut ids = answer
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["Id"].as_str())
        .filter(|id| id.len() == 64 && id.starts_with(reference));
    // An ambiguous prefix: the daemon refuses the exec.
    Ok(match (ids.next(), ids.next()) {
        (Some(id), None) => Some(id.to_owned()),
        _ => None,
    })
}

/// What the kernel passes as a reference: `[a-zA-Z0-9_.-]`, not empty.
fn reference_chars(reference: &str) -> bool {
    !reference.is_empty()
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The id of the container named `name` at the daemon `socket`, if there is one.
fn container_named(socket: &Path, name: &str) -> std::io::Result<Option<String>> {
    // The kernel passes only names of `[a-zA-Z0-9_.-]`; anything else is not asked.
    if !reference_chars(name) {
        return Ok(None);
    }
    // `{"name":["^/?<name>$"]}`, the name's dots escaped (the filter is a regular expression;
    // Docker matches it against `/<name>`, podman's compatible API against `<name>`).
    let pattern = name.replace('.', "%5C.");
    let path = format!(
        "/containers/json?all=1&filters=%7B%22name%22%3A%5B%22%5E%2F%3F{pattern}%24%22%5D%7D"
    );
    let answer = docker_api::get(socket, &path, TIMEOUT, MAX_ANSWER)?;
    Ok(answer
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| {
            c["Names"].as_array().is_some_and(|names| {
                names
                    .iter()
                    .any(|n| n.as_str().map(|n| n.trim_start_matches('/')) == Some(name))
            })
        })
        .and_then(|c| c["Id"].as_str())
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned))
}

#[cfg(test)]
mod tests;
