//! Shared machinery of the integration tests: one real sensor for the whole test binary (loading
//! the programs takes seconds), real processes started as CI jobs, and the events they produced.
//!
//! Tests run in parallel against the one sensor; each looks only at the events of its own job (or
//! its own processes), so they do not see each other.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use runner_monitor::{
    event::{Event, JobKey},
    policy::SensorPolicy,
    sensor::{
        Sensor,
        decode::Decoder,
        hook_sets::{HookFamily, HookSet},
        reader::{self, ReaderCounters},
    },
};

pub mod cri;
pub mod dns;
pub mod dns_hosts;
pub mod docker;
pub mod live;
pub mod nats;
pub mod netpair;
pub mod podman;
pub mod systemd;
pub mod tls;

/// The recognisable fake secret planted in every credential file the tests create. No output may
/// ever contain it.
pub const CANARY: &str = "rmcanary-7f3c9e1d-NOT-A-REAL-TOKEN";

pub struct Harness {
    sensor: Mutex<Sensor>,
    events: Arc<(Mutex<Vec<Event>>, Condvar)>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

/// Reads `sensor`'s ring buffer with the agent's reader (its pace in the settings map), on a
/// thread of its own: the batches as they come, until the receiver is dropped.
pub fn read_events(sensor: &mut Sensor) -> std::sync::mpsc::Receiver<Vec<Event>> {
    let ring = sensor.take_events().expect("ring buffer");
    let settings = sensor.settings_handle();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (batches_tx, mut batches) = tokio::sync::mpsc::channel(64);
            let (_stop_tx, stop) = tokio::sync::oneshot::channel();
            let counters = Arc::new(ReaderCounters::default());
            tokio::spawn(reader::run(
                ring,
                Decoder::new(),
                batches_tx,
                counters,
                stop,
                settings,
            ));
            while let Some(batch) = batches.recv().await {
                if tx.send(batch).is_err() {
                    return;
                }
            }
        });
    });
    rx
}

/// The shared sensor, loaded on first use.
pub fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the integration tests need root"
        );
        // RUNNER_MONITOR_TEST_HOOKS=tracepoint|fast|fentry|auto (default auto): which hook sets
        // the shared sensor uses, so that each set can be tested where the kernel has both.
        let hooks = std::env::var("RUNNER_MONITOR_TEST_HOOKS")
            .unwrap_or_else(|_| "auto".into())
            .parse()
            .expect("RUNNER_MONITOR_TEST_HOOKS");
        let options = runner_monitor::sensor::SensorOptions {
            hooks,
            ..Default::default()
        };
        let mut sensor =
            Sensor::load_with(&SensorPolicy::default(), &options).expect("loading the sensor");
        for set in sensor.hook_sets() {
            eprintln!("{}: {}", set.family.label(), set.describe());
        }
        for probe in sensor.probes() {
            assert_eq!(
                probe.state,
                runner_monitor::sensor::ProbeState::Attached,
                "probe {} on {} did not attach",
                probe.program,
                probe.target
            );
        }
        let batches = read_events(&mut sensor);
        let events: Arc<(Mutex<Vec<Event>>, Condvar)> = Arc::default();
        let sink = events.clone();
        std::thread::spawn(move || {
            for batch in batches {
                let (lock, cvar) = &*sink;
                lock.lock().unwrap().extend(batch);
                cvar.notify_all();
            }
        });
        Harness {
            sensor: Mutex::new(sensor),
            events,
        }
    })
}

impl Harness {
    pub fn sensor(&self) -> std::sync::MutexGuard<'_, Sensor> {
        self.sensor.lock().unwrap()
    }

    /// Whether file opens are seen where the kernel opens the file (LSM or fentry), not at the
    /// open syscalls: then `path` is the file's own path and `raw_path` the same.
    pub fn kernel_opens(&self) -> bool {
        self.sensor().file_open_hooks().set != HookSet::Tracepoint
    }

    /// Which hook set `family` uses.
    pub fn hook_set(&self, family: HookFamily) -> HookSet {
        self.sensor().hook_set(family).set
    }

    /// Every event so far that matches `pred`.
    pub fn events(&self, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| pred(e))
            .cloned()
            .collect()
    }

    /// Waits until an event matching `pred` arrives; panics with `what` after `timeout`.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (lock, cvar) = &*self.events;
        let mut events = lock.lock().unwrap();
        loop {
            if let Some(e) = events.iter().find(|e| pred(e)) {
                return e.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("no event for: {what}");
            }
            events = cvar.wait_timeout(events, deadline - now).unwrap().0;
        }
    }

    /// Starts `script` under `sh` as the root of a new registered job. The shell waits on its
    /// stdin until it is registered, so the job's very first process is attributed.
    pub fn start_job(&self, env: &TestEnv, script: &str) -> JobRun {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _go; {script}"))
            .env("HOME", &env.home)
            .env("JOB_STEP", job_step())
            .current_dir(&env.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the job");
        let pid = child.id();
        let key = self
            .sensor()
            .register_job(pid)
            .expect("registering the job");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("releasing the job");
        JobRun { key, pid, child }
    }

    /// Events of one job.
    pub fn job_events(&self, key: JobKey) -> Vec<Event> {
        self.events(|e| e.job.as_ref().is_some_and(|j| j.key == key))
    }
}

/// The `job-step` helper binary, built beside the test binaries (target/<profile>/job-step).
pub fn job_step() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let step = dir.join("job-step");
    assert!(
        step.exists(),
        "{} is missing: build the tests crate",
        step.display()
    );
    step
}

pub struct JobRun {
    pub key: JobKey,
    pub pid: u32,
    child: Child,
}

impl JobRun {
    /// Waits for the job's root to exit and checks that it succeeded.
    pub fn wait_success(self) -> JobKey {
        let JobRun { key, child, .. } = self;
        let out = child.wait_with_output().expect("waiting for the job");
        assert!(
            out.status.success(),
            "job failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        key
    }
}

/// A private directory with a home holding canary credentials; removed on drop.
pub struct TestEnv {
    pub dir: PathBuf,
    pub home: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let home = dir.join("home");
        for (path, content) in [
            (
                ".docker/config.json",
                format!("{{\"auths\":{{\"x\":{{\"auth\":\"{CANARY}\"}}}}}}"),
            ),
            (
                ".aws/credentials",
                format!("[default]\naws_secret_access_key = {CANARY}\n"),
            ),
            (
                ".ssh/id_ed25519",
                format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{CANARY}\n"),
            ),
            (
                ".git-credentials",
                format!("https://x:{CANARY}@example.test\n"),
            ),
            ("notes/readme.txt", "not a credential\n".to_owned()),
        ] {
            let file = home.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, content).unwrap();
        }
        Self { dir, home }
    }

    pub fn path(&self, rel: &str) -> String {
        self.home.join(rel).display().to_string()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Panics if any event carries the canary.
pub fn assert_no_canary(events: &[Event]) {
    for e in events {
        let line = serde_json::to_string(e).unwrap();
        assert!(
            !line.contains(CANARY),
            "canary leaked into an event: {line}"
        );
    }
}

/// `Command::output`, retried while the executable is "text file busy": a program the test just
/// copied can still be open for writing in a child another test thread forked meanwhile (between
/// its fork and exec), which makes exec fail with ETXTBSY for a moment.
pub fn output_of(command: &mut Command) -> std::process::Output {
    for _ in 0..100 {
        match command.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.expect("running the command"),
        }
    }
    panic!("{command:?}: executable stayed busy");
}

/// Stops a daemon a test started: SIGTERM, up to `within` to exit, then SIGKILL. Returns how long
/// it took to exit.
pub fn terminate(child: &mut Child, within: Duration) -> Duration {
    let started = Instant::now();
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) of a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while matches!(child.try_wait(), Ok(None)) && started.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    started.elapsed()
}

/// Spawns `command` so that it is killed (`signal`) when the calling thread ends: nothing a test
/// starts outlives it.
pub fn spawn_with_parent_death(command: &mut Command, signal: i32) -> std::io::Result<Child> {
    // SAFETY: prctl in the forked child before exec is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
    command.spawn()
}

/// Runs a command and panics with its output when it fails.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair to the host, removed on drop. The host side is
/// `HOST_IP`, the namespace side `NS_IP`: addresses that exist only on this pair.
pub struct NetNs {
    pub name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn new(tag: u8) -> Self {
        let id = std::process::id() % 10000;
        let name = format!("rmtest{tag}-{id}");
        let host_if = format!("rmh{tag}{id}");
        let ns_if = format!("rmn{tag}{id}");
        let host_ip = format!("10.213.{tag}.1");
        let ns_ip = format!("10.213.{tag}.2");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        sh(&format!("ip netns add {name}"));
        sh(&format!(
            "ip link add {host_if} type veth peer name {ns_if}"
        ));
        sh(&format!("ip link set {ns_if} netns {name}"));
        sh(&format!(
            "ip addr add {host_ip}/24 dev {host_if} && ip link set {host_if} up"
        ));
        sh(&format!(
            "ip -n {name} addr add {ns_ip}/24 dev {ns_if} && ip -n {name} link set {ns_if} up && ip -n {name} link set lo up"
        ));
        Self {
            name,
            host_if,
            host_ip,
            ns_ip,
        }
    }

    /// Starts a command inside the namespace.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip netns exec")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The bpffs directory for the pinned maps of the agent whose files are in `dir`:
/// `/sys/fs/bpf/rm-test-<dir>-PID`. Test agents die with their test binary, leaving their pins:
/// those of test binaries no longer running are removed here first, so kernel memory does not
/// pile up across runs.
pub fn pin_dir_of(dir: &Path) -> PathBuf {
    let root = Path::new("/sys/fs/bpf");
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix("rm-test-") else {
                continue;
            };
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let name: String = dir
        .strip_prefix(std::env::temp_dir())
        .unwrap_or(dir)
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    root.join(format!("rm-test-{name}-{}", std::process::id()))
}

/// Whether the running kernel is `major.minor` or newer (`/proc/sys/kernel/osrelease`).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}
