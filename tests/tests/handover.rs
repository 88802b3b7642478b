//! Probes that outlive the agent (`runner-monitor/src/sensor/links.rs`): real sensors with a pin
//! directory, one dropped the way a crash leaves it (nothing unpinned) or handed over, the next
//! taking over. The kernel matrix runs the first one on Debian's 6.1 and 6.12 too.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    TestEnv, job_step, live::poll_until, netpair::NetPair, pin_dir_of, read_events,
};
use runner_monitor::{
    event::{Event, EventDetail, JobKey},
    policy::{EgressPlan, SensorPolicy},
    sensor::{Sensor, SensorOptions},
};

fn load(pins: &std::path::Path, policy: &SensorPolicy) -> Sensor {
    let options = SensorOptions {
        pin_dir: Some(pins.to_path_buf()),
        ..SensorOptions::default()
    };
    let sensor = Sensor::load_with(policy, &options).expect("loading the sensor");
    assert!(
        sensor.pinned_probes() > 0,
        "the probes' links are not pinned: {}",
        sensor.pin_refusal().unwrap_or_default()
    );
    sensor
}

/// Reads `sensor`'s ring buffer for up to `within`, until `want` matches an event.
fn read_until(sensor: &mut Sensor, within: Duration, want: impl Fn(&Event) -> bool) -> Vec<Event> {
    let batches = read_events(sensor);
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    while let Ok(batch) = batches.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        events.extend(batch);
        if events.iter().any(&want) {
            break;
        }
    }
    events
}

/// A job's root: a shell the sensor registers, running the lines it is sent, one at a time,
/// answering each with its output and a line `done`.
struct Job {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    key: JobKey,
}

impl Job {
    fn start(sensor: &mut Sensor, env: &TestEnv) -> Job {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("read _go; while read line; do eval \"$line\"; echo done; done")
            .env("HOME", &env.home)
            .current_dir(&env.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let key = sensor
            .register_job(child.id())
            .expect("registering the job");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Job {
            child,
            stdin,
            stdout,
            key,
        }
    }

    /// Runs `line` in the job; its output.
    fn run(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        let mut out = String::new();
        loop {
            let mut l = String::new();
            assert!(self.stdout.read_line(&mut l).unwrap() > 0, "the job died");
            if l.trim() == "done" {
                return out;
            }
            out.push_str(&l);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job environment named `name`, its pin directory, a sensor loaded there on the default
/// policy, and a job registered with that sensor.
fn sensor_with_job(name: &str) -> (TestEnv, std::path::PathBuf, Sensor, Job) {
    let env = TestEnv::new(name);
    let pins = pin_dir_of(&env.dir);
    let mut sensor = load(&pins, &SensorPolicy::default());
    let job = Job::start(&mut sensor, &env);
    (env, pins, sensor, job)
}

#[test]
fn probes_outlive_a_crashed_agent_and_the_next_reads_what_they_recorded() {
    let (env, pins, first, mut job) = sensor_with_job("handover-crash");
    // Dropped without `stop`: what a crash leaves. The probes stay attached and recording.
    drop(first);
    let cred = env.path(".aws/credentials");
    job.run(&format!("cat {cred} > /dev/null"));

    let mut next = load(&pins, &SensorPolicy::default());
    let key = job.key;
    let is_read = |e: &Event| {
        e.job.as_ref().is_some_and(|j| j.key == key)
            && matches!(&e.detail, EventDetail::FileOpen(f) if f.path == cred)
    };
    let events = read_until(&mut next, Duration::from_secs(10), is_read);
    assert!(
        events.iter().any(is_read),
        "the read made while no agent ran was not read by the next one: {events:#?}"
    );
    // A clean stop removes every pin: nothing is left attached.
    let links = pins.join("links");
    assert!(std::fs::read_dir(&links).unwrap().count() > 0);
    next.stop();
    assert_eq!(std::fs::read_dir(&links).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&pins);
}

/// `job-step egress udp ADDR` in `job`: refused (EPERM) or not.
fn refused(job: &mut Job, addr: &str) -> bool {
    let step = job_step();
    let out = job.run(&format!("{} egress udp {addr}", step.display()));
    out.trim() == "errno 1"
}

/// Block mode for every job, admitting 192.0.2.1 only; `closed` per `on_agent_failure`.
fn blocking(closed: bool) -> SensorPolicy {
    SensorPolicy {
        egress: EgressPlan {
            block: true,
            nets: vec![("192.0.2.1/32".parse().unwrap(), Vec::new())],
            ..EgressPlan::default()
        },
        failure_closed: closed,
        ..SensorPolicy::default()
    }
}

/// The agent crashes with a job in block mode: until the heartbeat is stale the job's plan still
/// holds; then `closed` refuses what the plan allowed and `open` lets through what it refused.
fn after_a_crash(closed: bool) {
    let env = TestEnv::new(if closed {
        "failure-closed"
    } else {
        "failure-open"
    });
    let pins = pin_dir_of(&env.dir);
    let mut first = load(&pins, &blocking(closed));
    let mut job = Job::start(&mut first, &env);
    assert!(!refused(&mut job, "192.0.2.1:9"), "the allowed address");
    assert!(
        refused(&mut job, "192.0.2.2:9"),
        "an address outside the list"
    );
    drop(first);
    // Still the plan while the heartbeat is fresh.
    assert!(refused(&mut job, "192.0.2.2:9"));
    let stale = Instant::now()
        + Duration::from_secs(u64::from(runner_monitor_common::setting::AGENT_STALE_SECONDS) + 2);
    std::thread::sleep(stale.saturating_duration_since(Instant::now()));
    if closed {
        assert!(
            refused(&mut job, "192.0.2.1:9"),
            "closed: even the allowed address"
        );
        // Loopback stays.
        assert!(!refused(&mut job, "127.0.0.1:9"));
    } else {
        assert!(
            !refused(&mut job, "192.0.2.2:9"),
            "open: not judged any more"
        );
    }
    // The next agent takes over: its plan holds again.
    let next = load(&pins, &blocking(closed));
    assert!(refused(&mut job, "192.0.2.2:9"));
    assert!(!refused(&mut job, "192.0.2.1:9"));
    next.stop();
    let _ = std::fs::remove_dir_all(&pins);
}

#[test]
fn on_agent_failure_closed_refuses_a_jobs_egress_once_the_agent_is_gone() {
    after_a_crash(true);
}

#[test]
fn on_agent_failure_open_stops_judging_a_jobs_egress_once_the_agent_is_gone() {
    after_a_crash(false);
}

/// Block mode with `sni = true` for one job, admitting `server` and TLS named `name`.
fn tls_plan(server: &str, name: &str) -> EgressPlan {
    EgressPlan {
        block: true,
        nets: vec![(format!("{server}/32").parse().unwrap(), Vec::new())],
        names: vec![(name.to_owned(), Vec::new())],
        sni: true,
        ..EgressPlan::default()
    }
}

/// A namespace pair tagged `tag` whose server `server` (10.N.0.2) answers TLS on port 7443: the
/// pair, and the server's address.
fn tls_server(tag: &str, net: u8) -> (NetPair, String, String) {
    let server = format!("10.{net}.0.2");
    let mut ns = NetPair::new(tag, net, &[&server], &[]);
    let host = ns.server.clone();
    let addr = format!("{server}:7443");
    ns.serve(&host, &["tls-serve".to_owned(), addr.clone()]);
    (ns, server, addr)
}

/// Starts a `tls-held` connection of `job` for each (name, when) of `cases`, from the client
/// namespace of `ns` to `addr`; each one's output lines come from the function returned.
fn held_connections(
    env: &TestEnv,
    job: &mut Job,
    ns: &NetPair,
    addr: &str,
    cases: &[(&str, &str)],
) -> impl Fn(usize) -> Vec<String> + use<> {
    let go = env.dir.join("go");
    let out = |i: usize| env.dir.join(format!("held-{i}.out"));
    for (i, (name, when)) in cases.iter().enumerate() {
        job.run(&format!(
            "ip netns exec {} {} tls-held {name} {addr} {} {when} > {} 2>&1 &",
            ns.client,
            job_step().display(),
            go.display(),
            out(i).display()
        ));
    }
    let dir = env.dir.clone();
    move |i: usize| {
        std::fs::read_to_string(dir.join(format!("held-{i}.out")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Waits up to `seconds` for `done`; the assertions after it say what did not happen.
fn wait_for(seconds: u64, done: impl Fn() -> bool) {
    poll_until(
        Duration::from_secs(seconds),
        Duration::from_millis(50),
        done,
    );
}

/// A job's TLS connections live across a hand-over (`SIGUSR2`) to the next agent, whose policy
/// ids differ: a ClientHello refused before stays refused (its retransmissions are dropped too),
/// one sent afterwards on a socket connected before is judged by the job's plan as the next agent
/// wrote it.
#[test]
fn tls_refused_before_a_hand_over_stays_refused_and_held_sockets_are_judged_after_it() {
    let (env, pins, mut first, mut job) = sensor_with_job("handover-tls");
    let (ns, server, addr) = tls_server("ht", 218);
    let plan = tls_plan(&server, "allowed.example");
    first.egress_mut().set_job(job.key, &plan).unwrap();

    let cases = [
        ("evil.example", "before"),
        ("evil.example", "after"),
        ("allowed.example", "after"),
    ];
    let lines = held_connections(&env, &mut job, &ns, &addr, &cases);
    // Each has connected; the one that sent first was refused.
    wait_for(20, || {
        lines(0).len() >= 2 && lines(1).len() + lines(2).len() >= 2
    });
    assert_eq!(lines(0), ["sent", "silent"], "before the hand-over");
    assert_eq!(lines(1), ["connected"]);
    assert_eq!(lines(2), ["connected"]);

    assert!(first.hand_over() > 0);
    let mut next = load(&pins, &SensorPolicy::default());
    // The next agent numbers its plans afresh: another job's plan, which allows the refused
    // name, takes the id the first agent gave this job's.
    let other = JobKey(u64::MAX - 1);
    next.egress_mut()
        .set_job(other, &tls_plan(&server, "evil.example"))
        .unwrap();
    next.egress_mut().set_job(job.key, &plan).unwrap();
    std::fs::write(env.dir.join("go"), "").unwrap();

    wait_for(30, || {
        lines(0).len() >= 3 && lines(1).len() >= 2 && lines(2).len() >= 2
    });
    assert_eq!(
        lines(0),
        ["sent", "silent", "silent"],
        "a ClientHello refused before the hand-over reached the server after it (retransmitted)"
    );
    assert_eq!(
        lines(1),
        ["connected", "silent"],
        "a name outside the job's allowlist, sent after the hand-over on a socket connected before"
    );
    assert_eq!(
        lines(2),
        ["connected", "answered"],
        "an allowed name, sent after the hand-over"
    );
    next.stop();
    let _ = std::fs::remove_dir_all(&pins);
}

/// A socket connected while its job's plan only reports server names is watched, not given
/// storage (`runner-monitor-ebpf/src/tls.rs`); when the plan enforces names by the time it sends
/// its ClientHello (a reload), a name outside the allowlist is refused there, and its
/// retransmissions with it (the socket gets storage then), while an allowed name goes through.
#[test]
fn a_socket_connected_before_its_plan_enforces_names_is_judged_at_its_client_hello() {
    let (env, pins, mut sensor, mut job) = sensor_with_job("watched-tls");
    let (ns, server, addr) = tls_server("wt", 219);
    let enforced = tls_plan(&server, "allowed.example");
    let reported = EgressPlan {
        sni: false,
        ..enforced.clone()
    };
    sensor.egress_mut().set_job(job.key, &reported).unwrap();

    let cases = [("evil.example", "after"), ("allowed.example", "after")];
    let lines = held_connections(&env, &mut job, &ns, &addr, &cases);
    wait_for(20, || lines(0).len() + lines(1).len() >= 2);
    assert_eq!(lines(0), ["connected"]);
    assert_eq!(lines(1), ["connected"]);

    sensor.egress_mut().set_job(job.key, &enforced).unwrap();
    std::fs::write(env.dir.join("go"), "").unwrap();
    wait_for(30, || lines(0).len() >= 2 && lines(1).len() >= 2);
    assert_eq!(
        lines(0),
        ["connected", "silent"],
        "a name outside the allowlist (or its retransmission), on a socket connected before \
         the plan enforced names, reached the server"
    );
    assert_eq!(lines(1), ["connected", "answered"], "an allowed name");
    sensor.stop();
    let _ = std::fs::remove_dir_all(&pins);
}

/// The event reader sleeps once nothing comes (`setting::READER_ASLEEP`: records then wake it,
/// instead of its polling every 2 ms), and the next record wakes it: read, and polling again.
/// How soon a sleeping reader reads is measured by `cargo xtask bench` (alert latency).
#[test]
fn the_event_reader_sleeps_when_nothing_comes_and_the_next_record_wakes_it() {
    let (env, _pins, mut sensor, mut job) = sensor_with_job("reader-pace");
    let flag = sensor.settings_handle().expect("the settings map");
    let asleep = || {
        flag.get(&runner_monitor_common::setting::READER_ASLEEP, 0)
            .unwrap()
            != 0
    };
    let events = read_events(&mut sensor);
    let (within, every) = (Duration::from_secs(10), Duration::from_millis(5));
    assert!(poll_until(within, every, &asleep), "the reader never slept");
    let marker = env.dir.join("pace-marker");
    job.run(&format!("touch {}", marker.display()));
    let deadline = Instant::now() + Duration::from_secs(5);
    let woken = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = events.recv_timeout(left).expect("no event of the job");
        if let Some(event) = batch.into_iter().find(|event| {
            event.job.as_ref().is_some_and(|j| j.key == job.key)
                && matches!(&event.detail, EventDetail::Exec { filename, .. } if filename.ends_with("touch"))
        }) {
            break event;
        }
    };
    assert!(
        !asleep(),
        "the reader read {woken:?} and still says it sleeps"
    );
    // Asleep again once nothing more comes.
    assert!(
        poll_until(within, every, &asleep),
        "the reader never slept again"
    );
}
