//! The kernel side of the agent: load the embedded programs, attach them, feed them the patterns
//! and the job roots, and read what they send.

mod adopt;
pub mod allowlists;
pub mod attach;
pub mod btf;
pub mod check;
pub mod container_ids;
pub mod decode;
pub mod dns;
pub mod dns_netns;
pub mod egress;
mod fdstore;
pub mod file_hooks;
pub mod handles;
mod heartbeat;
pub mod hook_sets;
pub mod io_uring;
mod io_uring_layout;
pub mod job_roots;
pub mod links;
mod names;
pub mod paths;
pub mod pins;
mod probes;
mod procfs;
pub mod reader;
pub mod reconcile;
pub mod resolver;
pub mod ringfill;
pub mod sock_diag;
pub mod socket_layout;
pub mod task_hooks;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use runner_monitor_common::{
    EVENT_KIND_SLOTS, EventKind, JobBudget, JobState, NameKey, ProcessJob, counter, map_name,
    setting,
};

pub use adopt::Claim;
pub use attach::{ProbeState, ProbeStatus};
use heartbeat::Heartbeat;

use crate::policy::SensorPolicy;

/// The kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/runner-monitor"));

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error(
        "this runner-monitor was built without kernel programs (RUNNER_MONITOR_SKIP_EBPF set, or \
         a fuzz build): build it with `cargo xtask build` and that variable unset"
    )]
    NoKernelPrograms,
    #[error("loading the kernel programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("kernel map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("name {0:?} does not fit the kernel's {len}-byte name key", len = runner_monitor_common::NAME_LEN)]
    NameTooLong(String),
    #[error("required probe {program} on {target} did not attach: {reason}")]
    RequiredProbe {
        program: String,
        target: String,
        reason: String,
    },
    #[error("--hooks fast: no fast hook loads on this kernel for {0}")]
    NoFastHooks(String),
    #[error("process {pid}: {reason}")]
    Process { pid: u32, reason: String },
    #[error("no such job {0}")]
    NoSuchJob(crate::event::JobKey),
    #[error("{0}")]
    Container(String),
    #[error(
        "kernel state directory {0} is in use by another runner-monitor (one agent per pin \
         directory: they would corrupt each other's jobs)"
    )]
    PinsInUse(PathBuf),
    #[error("kernel state directory {path}: {source}")]
    Pins {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A map error of map `name`, as `SensorError::Map`.
pub(super) fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> SensorError {
    move |source| SensorError::Map { name, source }
}

/// How to load the sensor.
#[derive(Clone, Debug, Default)]
pub struct SensorOptions {
    /// Where the process and job maps are pinned (on bpffs) so that they outlive the agent: a
    /// restarted agent takes them over and its jobs stay attributed. `None`: maps live and die
    /// with this sensor (tests).
    pub pin_dir: Option<PathBuf>,
    /// Which hooks each family uses (`hook_sets`): `Auto` takes the best the kernel allows.
    pub hooks: hook_sets::HookChoice,
}

/// What the kernel counted, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelCounters {
    pub emitted: BTreeMap<&'static str, u64>,
    pub lost: BTreeMap<&'static str, u64>,
    pub user_read_errors: u64,
    pub process_map_full: u64,
    pub pending_map_full: u64,
    pub job_map_full: u64,
    pub dns_socket_map_full: u64,
    pub rate_limited: u64,
    /// Events of jobs over their event budget, dropped (also in `lost`).
    pub job_budget_dropped: u64,
    /// Connections and UDP sends refused by block mode.
    pub egress_blocked: u64,
}

impl KernelCounters {
    pub fn total_lost(&self) -> u64 {
        self.lost.values().sum::<u64>() + self.pending_map_full + self.process_map_full
    }
    pub fn total_emitted(&self) -> u64 {
        self.emitted.values().sum()
    }
}

/// The loaded and attached kernel programs and the maps the agent works with.
pub struct Sensor {
    ebpf: Ebpf,
    kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Kept so that the patterns can be changed while running (`set_names`).
    names: HashMap<MapData, NameKey, u32>,
    /// The credential names the file programs match, by `file_name_hash`.
    file_names: HashMap<MapData, u64, u32>,
    /// Basenames of credential aliases (`identity`), kept in `file_names` across policy reloads.
    alias_names: BTreeSet<String>,
    /// First bytes of the job identity variables (`env_prefix_key`): the environment prefilter.
    env_prefixes: HashMap<MapData, [u64; 2], u32>,
    settings: Array<MapData, u32>,
    /// Block mode's maps.
    egress: egress::EgressMaps,
    /// Whether the process and job maps were taken over from an earlier agent.
    resumed: bool,
    /// Held: the pin directory's lock.
    _pins: Option<pins::PinDir>,
    /// The probes' links (pinned with a pin directory).
    links: links::LinkPins,
    /// The pin directory and the ring buffer's pin name in it.
    events_pin: Option<(PathBuf, String)>,
    heartbeat: Option<Heartbeat>,
    processes: HashMap<MapData, u32, ProcessJob>,
    jobs: HashMap<MapData, u64, JobState>,
    budgets: HashMap<MapData, u64, JobBudget>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    probes: Vec<ProbeStatus>,
    /// The hook set of each family (`hook_sets`), in `HookFamily` order.
    hook_sets: Vec<hook_sets::FamilyHooks>,
}

/// Credential alias basenames the kernel's name table takes, beside the policy's patterns.
pub const MAX_ALIAS_NAMES: usize = 256;

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, SensorError> {
    ebpf.take_map(name).ok_or(SensorError::MissingMap(name))
}

impl Sensor {
    /// Loads the programs, fills the pattern maps from `policy` and attaches every probe.
    /// Fails when a required probe does not attach; optional ones are reported in `probes()`.
    pub fn load(policy: &SensorPolicy) -> Result<Self, SensorError> {
        Self::load_with(policy, &SensorOptions::default())
    }

    /// `load`, with the process and job maps pinned per `options`.
    pub fn load_with(policy: &SensorPolicy, options: &SensorOptions) -> Result<Self, SensorError> {
        if OBJECT.is_empty() {
            return Err(SensorError::NoKernelPrograms);
        }
        let agent_tgid = std::process::id();
        let mut loader = EbpfLoader::new();
        loader.override_global("AGENT_TGID", &agent_tgid, true);
        let events_pin = pins::events_pin_name(OBJECT);
        let pin_dir = match &options.pin_dir {
            Some(dir) => match pins::prepare(dir, &events_pin) {
                Ok(pins) => Some(pins),
                Err(error @ SensorError::PinsInUse(_)) => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "kernel job state not pinned: jobs will not stay \
                        attributed across an agent restart");
                    None
                }
            },
            None => None,
        };
        let pinned = pin_dir.as_ref().map_or(&[][..], |d| &d.pins[..]);
        // Resumed when the process and job maps were there; the container maps may be missing
        // (an upgrade from a build without them) and start empty.
        let resumed = !pinned.is_empty()
            && pinned
                .iter()
                .filter(|p| p.name == map_name::PROCESSES || p.name == map_name::JOBS)
                .all(|p| p.existed);
        // What systemd kept across a restart goes back where a crashed agent's pins would be.
        let restored = match (&pin_dir, &options.pin_dir) {
            (Some(_), Some(dir)) => fdstore::restore(dir, &events_pin),
            _ => Vec::new(),
        };
        for pin in pinned {
            loader.map_pin_path(pin.name, pin.path.clone());
        }
        let kernel_btf = btf::KernelBtf::vmlinux().map_err(|e| e.to_string());
        let file_layout = btf::layout::<file_hooks::FileLayout>(&kernel_btf);
        let task_layout = btf::layout::<task_hooks::TaskLayout>(&kernel_btf);
        let netns_layout = btf::layout::<dns_netns::NetnsLayout>(&kernel_btf);
        let socket_layout = btf::layout::<socket_layout::SocketLayout>(&kernel_btf);
        if let Err(reason) = &socket_layout {
            tracing::warn!(
                %reason,
                "who serves a unix socket is not known: container requests a job writes on any \
                 unix socket are read as if a container runtime served it"
            );
        }
        let known: [Option<&dyn btf::KernelLayout>; 4] = [
            file_layout.as_ref().ok().map(|l| l as _),
            task_layout.as_ref().ok().map(|l| l as _),
            netns_layout.as_ref().ok().map(|l| l as _),
            socket_layout.as_ref().ok().map(|l| l as _),
        ];
        for layout in known.into_iter().flatten() {
            layout.set_globals(&mut loader);
        }
        let mut ebpf = loader.load(OBJECT).map_err(SensorError::Load)?;
        let links = match (&pin_dir, &options.pin_dir) {
            (Some(_), Some(dir)) => links::LinkPins::open(dir).unwrap_or_else(|error| {
                tracing::warn!(%error, "probes not pinned: while no agent runs, no probe does");
                links::LinkPins::default()
            }),
            _ => links::LinkPins::default(),
        };
        let events_pin = match (&pin_dir, &options.pin_dir) {
            (Some(_), Some(dir)) => Some((dir.clone(), events_pin)),
            _ => None,
        };

        // Held by the sensor: the programs are loaded later and need the log map alive.
        let kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::warn!(%error, "kernel-side log unavailable");
                None
            }
        };

        let names = HashMap::try_from(take_map(&mut ebpf, map_name::NAMES)?)
            .map_err(map_error(map_name::NAMES))?;
        let file_names = HashMap::try_from(take_map(&mut ebpf, map_name::FILE_NAMES)?)
            .map_err(map_error(map_name::FILE_NAMES))?;
        let env_prefixes = HashMap::try_from(take_map(&mut ebpf, map_name::ENV_PREFIXES)?)
            .map_err(map_error(map_name::ENV_PREFIXES))?;
        let settings = Array::try_from(take_map(&mut ebpf, map_name::SETTINGS)?)
            .map_err(map_error(map_name::SETTINGS))?;
        let processes = HashMap::try_from(take_map(&mut ebpf, map_name::PROCESSES)?)
            .map_err(map_error(map_name::PROCESSES))?;
        let jobs = HashMap::try_from(take_map(&mut ebpf, map_name::JOBS)?)
            .map_err(map_error(map_name::JOBS))?;
        let budgets = HashMap::try_from(take_map(&mut ebpf, map_name::JOB_BUDGETS)?)
            .map_err(map_error(map_name::JOB_BUDGETS))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, map_name::COUNTERS)?)
            .map_err(map_error(map_name::COUNTERS))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, map_name::EVENTS)?)
            .map_err(map_error(map_name::EVENTS))?;
        let egress = egress::EgressMaps::take(&mut ebpf)?;

        let mut sensor = Self {
            ebpf,
            kernel_log,
            names,
            file_names,
            alias_names: BTreeSet::new(),
            env_prefixes,
            settings,
            egress,
            resumed,
            _pins: pin_dir,
            links,
            events_pin,
            heartbeat: None,
            processes,
            jobs,
            budgets,
            counters,
            events: Some(events),
            probes: Vec::new(),
            hook_sets: Vec::new(),
        };
        // The patterns go in before any probe can look for them.
        sensor.set_names(policy)?;
        // Alive before any program that outlives the agent can look.
        sensor.heartbeat = Heartbeat::start(sensor.settings_handle());
        let chosen = hook_sets::attach(
            &mut sensor.ebpf,
            options.hooks,
            &[
                (
                    &file_hooks::FILE_OPENS,
                    file_layout.as_ref().map(|_| ()).map_err(Clone::clone),
                ),
                (
                    &task_hooks::PROCESS_MEMORY,
                    task_layout.as_ref().map(|_| ()).map_err(Clone::clone),
                ),
                (
                    &task_hooks::SIGNALS,
                    task_layout.as_ref().map(|_| ()).map_err(Clone::clone),
                ),
                (&hook_sets::PACKET_SOCKETS, Ok(())),
            ],
            &mut sensor.links,
        );
        if matches!(
            options.hooks,
            hook_sets::HookChoice::Fast | hook_sets::HookChoice::Fentry
        ) && let Some(slow) = chosen
            .sets
            .iter()
            .find(|s| s.set == hook_sets::HookSet::Tracepoint)
        {
            return Err(SensorError::NoFastHooks(format!(
                "{}: {}",
                slow.family.label(),
                slow.reason
            )));
        }
        let mut probes = chosen.probes;
        sensor.hook_sets = chosen.sets;
        probes.extend(attach::attach_all(
            &mut sensor.ebpf,
            &mut sensor.links,
            &chosen.skip,
        ));
        btf::write_task_layout(&kernel_btf, &mut sensor.settings);
        probes.extend(io_uring::attach(
            &mut sensor.ebpf,
            &mut sensor.settings,
            kernel_btf,
            &mut sensor.links,
        ));
        if sensor.file_open_hooks().set != hook_sets::HookSet::Tracepoint {
            io_uring::leave_opens(&mut sensor.settings);
        }
        {
            let links = &mut sensor.links;
            if let Some((n, reason)) = links.refused() {
                tracing::warn!(
                    probes = n,
                    %reason,
                    "the kernel refused to pin the probes: they detach with this agent, and \
                     while no agent runs, no probe does"
                );
            }
            let (replaced, removed) = links.finish();
            if let Some((dir, events)) = &sensor.events_pin
                && !links.is_empty()
            {
                fdstore::store(dir, events, &restored);
            }
            if replaced + removed > 0 {
                tracing::info!(
                    replaced,
                    removed,
                    "took over the probes an earlier agent left attached: what they recorded \
                     while no agent ran is read now"
                );
            }
        }
        for probe in &probes {
            if let ProbeState::Failed(reason) = &probe.state
                && probe.required
            {
                return Err(SensorError::RequiredProbe {
                    program: probe.program.clone(),
                    target: probe.target.clone(),
                    reason: reason.clone(),
                });
            }
        }
        sensor.probes = probes;
        Ok(sensor)
    }

    /// Whether the process and job maps were taken over from an earlier agent (pinned).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// How many probes are pinned (outlive this sensor); 0 without a pin directory or when the
    /// kernel refuses to pin links.
    pub fn pinned_probes(&self) -> usize {
        self.links.len()
    }

    /// Why the probes are not pinned, when they are not.
    pub fn pin_refusal(&self) -> Option<String> {
        if self.events_pin.is_none() {
            return Some("no pin directory (none given, or not usable: see the log)".into());
        }
        self.links
            .refused()
            .map(|(n, reason)| format!("{n} probes: {reason}"))
    }

    /// A clean stop: the probes' pins and the ring buffer's are removed, so every probe detaches
    /// with this sensor. Returns how many pins were removed.
    pub fn stop(mut self) -> usize {
        let n = self.links.unpin_all();
        if let Some((dir, events)) = &self.events_pin {
            pins::remove_events(dir, events);
        }
        links::detach_all(&mut self.ebpf);
        n
    }

    /// Leaves the probes attached and recording for the next agent (`SIGUSR2`): the heartbeat
    /// is set `HAND_OVER_SECONDS` ahead, so block mode keeps enforcing while the next agent
    /// starts. Returns how many probes stay (0: none is pinned, every probe detaches).
    pub fn hand_over(mut self) -> usize {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop();
        }
        let ahead = (crate::clock::monotonic_ns() / 1_000_000_000) as u32 + HAND_OVER_SECONDS;
        if let Err(error) = self.settings.set(setting::AGENT_HEARTBEAT, ahead, 0) {
            tracing::warn!(%error, "heartbeat not set ahead for the hand-over");
        }
        self.links.len()
    }

    /// Sends the DNS of job processes in block mode to the resolver on 127.0.0.1:`port` in the
    /// network namespace `netns_cookie` (the namespace first: a port without it redirects
    /// nothing); IPv6 sockets' unconnected sends to `[::1]:port` when `v6` (it listens there).
    /// The resolver listens on the same port in the job namespaces it serves (`dns_netns.rs`).
    pub fn set_dns_resolver(
        &mut self,
        port: u16,
        netns_cookie: u64,
        v6: bool,
    ) -> Result<(), SensorError> {
        let mut served = self
            .dns_netns_served()
            .ok_or(SensorError::MissingMap(map_name::DNS_NETNS))?;
        let flags = runner_monitor_common::dns_netns_flags(true, false, v6);
        served
            .insert(netns_cookie, flags, 0)
            .map_err(|source| SensorError::Map {
                name: map_name::DNS_NETNS,
                source,
            })?;
        self.settings
            .set(setting::DNS_RESOLVER_PORT, u32::from(port), 0)
            .map_err(|source| SensorError::Map {
                name: map_name::SETTINGS,
                source,
            })
    }

    /// Block mode's per-job plans.
    pub fn egress_mut(&mut self) -> &mut egress::EgressMaps {
        &mut self.egress
    }

    pub fn egress(&self) -> &egress::EgressMaps {
        &self.egress
    }

    /// Jobs the kernel dropped events of for being over their budget, with how many so far.
    pub fn over_budget_jobs(&self) -> Vec<(crate::event::JobKey, u64)> {
        self.budgets
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, b)| b.dropped > 0)
            .map(|(job, b)| (crate::event::JobKey(job), b.dropped))
            .collect()
    }

    /// Which hooks see file opens, and why.
    pub fn file_open_hooks(&self) -> &hook_sets::FamilyHooks {
        self.hook_set(hook_sets::HookFamily::FileOpens)
    }

    /// Which hooks `family` uses, and why.
    pub fn hook_set(&self, family: hook_sets::HookFamily) -> &hook_sets::FamilyHooks {
        self.hook_sets
            .iter()
            .find(|s| s.family == family)
            .unwrap_or_else(|| unreachable!("load_with chooses a set for every family"))
    }

    /// Every family's hook set, in `HookFamily` order.
    pub fn hook_sets(&self) -> &[hook_sets::FamilyHooks] {
        &self.hook_sets
    }

    /// Every probe and whether it attached.
    pub fn probes(&self) -> &[ProbeStatus] {
        &self.probes
    }

    /// Starts forwarding the kernel programs' log records (aya-log) to the agent's log. Needs a
    /// tokio runtime.
    pub fn start_kernel_log(&mut self) {
        if let Some(logger) = self.kernel_log.take() {
            reader::spawn_kernel_log(logger);
        }
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn counters(&self) -> Result<KernelCounters, SensorError> {
        let read = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        let mut c = KernelCounters::default();
        for kind in EventKind::ALL {
            let k = kind as u32;
            debug_assert!(k < EVENT_KIND_SLOTS);
            c.emitted.insert(kind.name(), read(counter::EMITTED + k));
            c.lost.insert(kind.name(), read(counter::LOST + k));
        }
        c.user_read_errors = read(counter::USER_READ_ERRORS);
        c.process_map_full = read(counter::PROCESS_MAP_FULL);
        c.pending_map_full = read(counter::PENDING_MAP_FULL);
        c.job_map_full = read(counter::JOB_MAP_FULL);
        c.dns_socket_map_full = read(counter::DNS_SOCKET_MAP_FULL);
        c.rate_limited = read(counter::RATE_LIMITED);
        c.job_budget_dropped = read(counter::JOB_BUDGET_DROPPED);
        c.egress_blocked = read(counter::EGRESS_BLOCKED);
        Ok(c)
    }

    /// The underlying object, for programs and maps not wrapped here.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// How long programs left for the next agent (`Sensor::hand_over`) take the agent for alive.
const HAND_OVER_SECONDS: u32 = 30;

impl Drop for Sensor {
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop();
        }
    }
}
