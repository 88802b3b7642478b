//! The kernel sensors, tested with the real programs, real processes, files and sockets (root).
//! Each test reads as "run this job, expect these events".

use std::{
    io::BufRead,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixListener,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use integration_tests::{NetNs, TestEnv, assert_no_canary, harness};
use runner_monitor::event::{EventDetail, FileAccess, SocketFamily};

fn file_open(e: &runner_monitor::event::Event) -> Option<&FileAccess> {
    match &e.detail {
        EventDetail::FileOpen(f) => Some(f),
        _ => None,
    }
}

/// A file open by a process of `job`.
fn open_in(job: runner_monitor::event::JobKey) -> impl Fn(&runner_monitor::event::Event) -> bool {
    move |e| e.job.as_ref().is_some_and(|j| j.key == job) && file_open(e).is_some()
}

#[test]
fn job_process_reading_credential_by_absolute_path_gives_one_event() {
    let h = harness();
    let env = TestEnv::new("abs");
    let cred = env.path(".docker/config.json");
    let job = h
        .start_job(&env, &format!("cat {cred} > /dev/null"))
        .wait_success();
    let event = h.wait_for("open of docker config", open_in(job));
    let opens: Vec<_> = h
        .job_events(job)
        .into_iter()
        .filter(|e| file_open(e).is_some())
        .collect();
    assert_eq!(opens.len(), 1, "exactly one open event: {opens:#?}");
    let f = file_open(&event).unwrap();
    assert_eq!(f.path, cred);
    assert!(f.resolved);
    assert!(f.result >= 0, "open succeeded: {f:?}");
    assert!(!f.write);
    assert_eq!(event.process.comm, "cat");
    assert!(!event.job.as_ref().unwrap().ended);
    assert_no_canary(&h.job_events(job));
}

#[test]
fn relative_path_after_cd_is_resolved_to_the_credential() {
    let h = harness();
    let env = TestEnv::new("rel");
    let job = h
        .start_job(&env, "cd \"$HOME/.aws\" && cat credentials > /dev/null && cd ../notes && cat ../.aws/./credentials >/dev/null")
        .wait_success();
    let want = env.path(".aws/credentials");
    // Seen where the kernel opens the file (LSM, fentry), the path is the file's own and the
    // string the process passed is not known: both opens read `want`.
    let kernel_opens = h.kernel_opens();
    let (first_raw, second_raw) = if kernel_opens {
        (want.as_str(), want.as_str())
    } else {
        ("credentials", "../.aws/./credentials")
    };
    if kernel_opens {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.job_events(job).iter().filter_map(file_open).count() < 2 {
            assert!(std::time::Instant::now() < deadline, "no second open");
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        h.wait_for("second relative open", |e| {
            e.job.as_ref().is_some_and(|j| j.key == job)
                && file_open(e).is_some_and(|f| f.raw_path == second_raw)
        });
    }
    let opens: Vec<FileAccess> = h
        .job_events(job)
        .iter()
        .filter_map(file_open)
        .cloned()
        .collect();
    assert_eq!(opens.len(), 2, "{opens:#?}");
    for f in &opens {
        assert_eq!(f.path, want, "{f:?}");
        assert!(f.resolved);
    }
    assert_eq!(opens[0].raw_path, first_raw);
}

#[test]
fn open_relative_to_a_directory_fd_is_resolved() {
    let h = harness();
    let env = TestEnv::new("dirfd");
    // The directory fd is resolved through /proc/<pid>/fd while the process holds it (the kernel
    // reports the fd, not its path): the step keeps it open until the test has the event.
    let gate = env.dir.join("seen");
    let run = h.start_job(
        &env,
        &format!(
            "\"$JOB_STEP\" open-at \"$HOME/.docker\" config.json {}",
            gate.display()
        ),
    );
    let event = h.wait_for("openat with dirfd", open_in(run.key));
    std::fs::write(&gate, "").unwrap();
    run.wait_success();
    let f = file_open(&event).unwrap();
    let raw = if h.kernel_opens() {
        env.path(".docker/config.json")
    } else {
        "config.json".to_owned()
    };
    assert_eq!(f.raw_path, raw);
    assert_eq!(f.path, env.path(".docker/config.json"));
    assert!(f.result >= 0);
}

#[test]
fn kernel_matches_basename_dirname_and_prefix_and_ignores_other_files() {
    let h = harness();
    let env = TestEnv::new("match");
    // The file exists: the LSM and fentry hooks see the opens the kernel makes, not one that
    // fails with ENOENT (the tracepoints see both).
    let token = env.home.join("k8s/serviceaccount/token");
    std::fs::create_dir_all(token.parent().unwrap()).unwrap();
    std::fs::write(&token, "not a real token\n").unwrap();
    let job = h
        .start_job(
            &env,
            "cat $HOME/.git-credentials $HOME/.ssh/id_ed25519 $HOME/k8s/serviceaccount/token \
             $HOME/notes/readme.txt /etc/hostname > /dev/null; touch $HOME/.aws/config",
        )
        .wait_success();
    h.wait_for("the touch", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && file_open(e).is_some_and(|f| f.path.ends_with(".aws/config"))
    });
    let opens: Vec<FileAccess> = h
        .job_events(job)
        .iter()
        .filter_map(file_open)
        .cloned()
        .collect();
    let find = |suffix: &str| opens.iter().find(|f| f.path.ends_with(suffix));
    assert_eq!(find(".git-credentials").unwrap().matched, ["basename"]);
    assert_eq!(find(".ssh/id_ed25519").unwrap().matched, ["prefix"]);
    assert_eq!(find("serviceaccount/token").unwrap().matched, ["dirname"]);
    let aws = find(".aws/config").unwrap();
    assert_eq!(aws.matched, ["basename"]);
    assert!(aws.write, "touch opens for writing: {aws:?}");
    assert!(
        find("readme.txt").is_none(),
        "an ordinary file is filtered in the kernel"
    );
    assert!(find("/etc/hostname").is_none());
}

#[test]
fn daemonised_grandchild_stays_in_the_job_and_its_late_read_says_the_job_ended() {
    let h = harness();
    let env = TestEnv::new("daemon");
    let cred = env.path(".aws/credentials");
    // Double fork + setsid: the reader is re-parented to init and outlives the job's root.
    let job = h
        .start_job(
            &env,
            &format!("(setsid sh -c 'sleep 0.5; cat {cred} > /dev/null' &) ; exit 0"),
        )
        .wait_success();
    let event = h.wait_for("the survivor's read", open_in(job));
    assert_eq!(file_open(&event).unwrap().path, cred);
    let j = event.job.as_ref().unwrap();
    assert!(j.ended, "the root exited before the read: {event:?}");
    assert_ne!(event.process.pid, 0);
    // The job's root exit was seen, and it came before the read.
    let exit = h.wait_for("the root's exit", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job && j.root)
            && matches!(e.detail, EventDetail::Exit { .. })
    });
    assert!(exit.time_ns < event.time_ns);
}

#[test]
fn job_root_recognised_at_exec_by_executable_name() {
    let h = harness();
    let env = TestEnv::new("exe");
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let cred = env.path(".docker/config.json");
    let out = integration_tests::output_of(
        std::process::Command::new(&worker)
            .arg("-c")
            .arg(format!("cat {cred} > /dev/null")),
    );
    assert!(out.status.success());
    let exec = h.wait_for("exec of Runner.Worker", |e| {
        matches!(&e.detail, EventDetail::Exec { filename, .. } if filename == &worker.display().to_string())
    });
    let job = exec.job.as_ref().expect("the exec starts a job");
    assert!(job.root);
    let key = job.key;
    let open = h.wait_for("its child's read", |e| {
        e.job.as_ref().is_some_and(|j| j.key == key) && file_open(e).is_some()
    });
    assert_eq!(file_open(&open).unwrap().path, cred);
    assert_eq!(open.process.ppid, exec.process.pid);
}

#[test]
fn process_outside_any_job_produces_nothing() {
    let h = harness();
    let env = TestEnv::new("outside");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat {} > /dev/null; sleep 0.2",
            env.path(".docker/config.json")
        ))
        .spawn()
        .unwrap();
    let pid = child.id();
    child.wait().unwrap();
    // A job started afterwards is seen, so the sensor is live; the outsider still is not.
    let job = h
        .start_job(&env, "cat $HOME/.git-credentials > /dev/null")
        .wait_success();
    h.wait_for("the later job's read", open_in(job));
    assert!(
        h.events(|e| e.process.pid == pid || e.process.ppid == pid)
            .is_empty()
    );
}

#[test]
fn connect_to_loopback_tcp_listener_is_decoded() {
    let h = harness();
    let env = TestEnv::new("tcp");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let job = h
        .start_job(&env, &format!("\"$JOB_STEP\" connect-tcp 127.0.0.1:{port}"))
        .wait_success();
    let event = h.wait_for("tcp connect", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job) && matches!(e.detail, EventDetail::Connect(_))
    });
    let EventDetail::Connect(c) = &event.detail else {
        unreachable!()
    };
    assert_eq!(c.family, SocketFamily::Inet);
    assert_eq!(c.ip, Some(Ipv4Addr::LOCALHOST.into()));
    assert_eq!(c.port, Some(port));
    assert_eq!(c.result, 0);
}

#[test]
fn connect_to_a_host_in_a_network_namespace_is_decoded() {
    let h = harness();
    let env = TestEnv::new("netns");
    let ns = NetNs::new(7);
    let mut server = ns.spawn(
        &integration_tests::job_step(),
        &["listen", &format!("{}:7070", ns.ns_ip)],
    );
    let mut ready = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "listening");
    let job = h
        .start_job(
            &env,
            &format!("\"$JOB_STEP\" connect-tcp {}:7070", ns.ns_ip),
        )
        .wait_success();
    let event = h.wait_for("connect into the namespace", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job) && matches!(e.detail, EventDetail::Connect(_))
    });
    let EventDetail::Connect(c) = &event.detail else {
        unreachable!()
    };
    assert_eq!(c.ip, Some(ns.ns_ip.parse().unwrap()));
    assert_eq!(c.port, Some(7070));
    assert_eq!(c.result, 0);
    let _ = server.wait();
}

#[test]
fn connect_to_a_unix_socket_gives_its_path() {
    let h = harness();
    let env = TestEnv::new("unix");
    let path = env.dir.join("agent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let job = h
        .start_job(
            &env,
            &format!("\"$JOB_STEP\" connect-unix {}", path.display()),
        )
        .wait_success();
    let event = h.wait_for("unix connect", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job) && matches!(e.detail, EventDetail::Connect(_))
    });
    let EventDetail::Connect(c) = &event.detail else {
        unreachable!()
    };
    assert_eq!(c.family, SocketFamily::Unix);
    assert_eq!(c.unix_path.as_deref(), Some(path.to_str().unwrap()));
    assert_eq!(c.result, 0);
    assert_eq!(c.ip, None);
}

/// A DNS server on a loopback address of its own, port 53, answering every A and AAAA query.
fn dns_server(
    addr: Ipv4Addr,
    answer_v4: Ipv4Addr,
    answer_v6: Ipv6Addr,
) -> std::thread::JoinHandle<()> {
    let socket = UdpSocket::bind(SocketAddr::from((addr, 53))).expect("bind port 53");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        // Answer until nothing has come for a while (the test is then done).
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(true)
                .set_recursion_available(true)
                .set_response_code(ResponseCode::NoError);
            for q in query.queries() {
                reply.add_query(q.clone());
                let rdata = match q.query_type() {
                    RecordType::A => Some(RData::A(rdata::A(answer_v4))),
                    RecordType::AAAA => Some(RData::AAAA(rdata::AAAA(answer_v6))),
                    _ => None,
                };
                if let Some(rdata) = rdata {
                    reply.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                }
            }
            let _ = socket.send_to(&reply.to_vec().unwrap(), peer);
        }
    })
}

#[test]
fn glibc_lookup_gives_the_query_name_and_the_answer_addresses() {
    let h = harness();
    let env = TestEnv::new("dns");
    let server_ip = Ipv4Addr::new(127, 53, 0, 1);
    let answer_v4 = Ipv4Addr::new(10, 213, 99, 7);
    let answer_v6: Ipv6Addr = "fd00:213::7".parse().unwrap();
    let _server = dns_server(server_ip, answer_v4, answer_v6);
    // The job gets its own resolv.conf in a private mount namespace: the machine's resolver is
    // never asked.
    let resolv = env.dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {server_ip}\noptions attempts:2 timeout:5\n"),
    )
    .unwrap();
    let name = "build-cache.runner-monitor.test";
    let job = h
        .start_job(
            &env,
            &format!(
                "unshare --mount sh -c 'mount --bind {} /etc/resolv.conf && getent ahosts {name}'",
                resolv.display()
            ),
        )
        .wait_success();
    let query = h.wait_for("dns query", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job) && matches!(e.detail, EventDetail::DnsQuery(_))
    });
    let EventDetail::DnsQuery(q) = &query.detail else {
        unreachable!()
    };
    assert_eq!(q.server_ip, std::net::IpAddr::V4(server_ip));
    assert_eq!(q.server_port, 53);
    assert_eq!(q.questions[0].name, format!("{name}."));
    assert_eq!(query.process.comm, "getent");

    h.wait_for("AAAA answer", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(&e.detail, EventDetail::DnsAnswer(a) if a.answers.iter().any(|r| r.record_type == "AAAA"))
    });
    let answers: Vec<String> = h
        .job_events(job)
        .iter()
        .filter_map(|e| match &e.detail {
            EventDetail::DnsAnswer(a) => {
                Some(a.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert!(answers.contains(&answer_v4.to_string()), "{answers:?}");
    assert!(answers.contains(&answer_v6.to_string()), "{answers:?}");
}

#[test]
fn reading_another_process_environment_is_reported_with_its_pid() {
    let h = harness();
    let env = TestEnv::new("environ");
    let mut victim = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let victim_pid = victim.id();
    let job = h
        .start_job(&env, &format!("cat /proc/{victim_pid}/environ > /dev/null; cat /proc/self/environ > /dev/null; cat /proc/$$/maps > /dev/null; cat /proc/{victim_pid}/task/{victim_pid}/environ > /dev/null"))
        .wait_success();
    let event = h.wait_for("environ read", open_in(job));
    let f = file_open(&event).unwrap();
    assert_eq!(f.path, format!("/proc/{victim_pid}/environ"));
    assert_eq!(f.target_pid, Some(victim_pid));
    assert_eq!(f.matched, ["proc_memory"]);
    let _ = victim.kill();
    let _ = victim.wait();
    // /proc/self/environ is the reader's own; /proc/$$/maps is another process of the same job,
    // which is reported (the shell's memory is not the cat's).
    let opens: Vec<FileAccess> = h
        .job_events(job)
        .iter()
        .filter_map(file_open)
        .cloned()
        .collect();
    assert!(
        opens.iter().all(|f| f.raw_path != "/proc/self/environ"),
        "{opens:#?}"
    );
    // A thread's view of the same process (`/proc/<pid>/task/<tid>/environ`) is the process.
    let thread = h.wait_for("a thread's environ read", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && file_open(e).is_some_and(|f| f.path.contains("/task/"))
    });
    let f = file_open(&thread).unwrap();
    assert_eq!(f.target_pid, Some(victim_pid), "{f:?}");
    assert_eq!(f.matched, ["proc_memory"]);
}

#[test]
fn a_signal_to_the_agent_is_reported_as_tamper() {
    let h = harness();
    let env = TestEnv::new("signal");
    let agent = std::process::id();
    let job = h
        .start_job(&env, &format!("\"$JOB_STEP\" signal {agent} 0"))
        .wait_success();
    let event = h.wait_for("signal to the agent", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(e.detail, EventDetail::Signal { .. })
    });
    let EventDetail::Signal {
        target_pid,
        signal,
        syscall,
    } = &event.detail
    else {
        unreachable!()
    };
    assert_eq!(*target_pid, agent);
    assert_eq!(*signal, 0);
    assert_eq!(syscall, "kill");
}

#[test]
fn a_process_killed_by_a_signal_exits_with_that_signal() {
    let h = harness();
    let env = TestEnv::new("killed");
    let job = h
        .start_job(
            &env,
            "sh -c 'kill -TERM $$'; sh -c 'kill -KILL $$'; sh -c 'exit 3'; true",
        )
        .wait_success();
    for signal in [15, 9] {
        h.wait_for(&format!("exit by signal {signal}"), |e| {
            e.job.as_ref().is_some_and(|j| j.key == job)
                && matches!(e.detail, EventDetail::Exit { exit_code: None, signal: Some(s) } if s == signal)
        });
    }
    h.wait_for("exit 3, no signal", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(
                e.detail,
                EventDetail::Exit {
                    exit_code: Some(3),
                    signal: None
                }
            )
    });
}

#[test]
fn exec_and_exit_carry_arguments_and_status() {
    let h = harness();
    let env = TestEnv::new("exec");
    let job = h.start_job(&env, "sh -c 'exit 7' x y; true").wait_success();
    let exit = h.wait_for("exit 7", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(
                e.detail,
                EventDetail::Exit {
                    exit_code: Some(7),
                    signal: None
                }
            )
    });
    let exec = h.wait_for("exec of sh", |e| {
        e.process.pid == exit.process.pid && matches!(e.detail, EventDetail::Exec { .. })
    });
    let EventDetail::Exec { argv, argc, .. } = &exec.detail else {
        unreachable!()
    };
    assert_eq!(argv, &["sh", "-c", "exit 7", "x", "y"]);
    assert_eq!(*argc, 5);
    let fork = h.wait_for(
        "fork of the sh",
        |e| matches!(e.detail, EventDetail::Fork { child_pid } if child_pid == exit.process.pid),
    );
    assert_eq!(fork.job.as_ref().unwrap().key, job);
}

#[test]
fn registering_a_root_attributes_the_processes_it_already_has() {
    let h = harness();
    let env = TestEnv::new("existing");
    let cred = env.path(".git-credentials");
    // The child exists before the root is registered; it reads once released by a file.
    let gate = env.dir.join("gate");
    let mut root = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done; cat {cred} > /dev/null' & wait",
            gate = gate.display()
        ))
        .spawn()
        .unwrap();
    // Wait until the inner shell exists.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{}/task/{}/children", root.id(), root.id()))
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let job = h.sensor().register_job(root.id()).unwrap();
    std::fs::write(&gate, "").unwrap();
    assert!(root.wait().unwrap().success());
    let event = h.wait_for("the existing child's read", open_in(job));
    assert_eq!(file_open(&event).unwrap().path, cred);
    // The cat's parent is the shell that existed before registration, recorded as the root's
    // child by the /proc walk.
    let fork = h.wait_for(
        "the existing child's fork of cat",
        |e| matches!(e.detail, EventDetail::Fork { child_pid } if child_pid == event.process.pid),
    );
    assert_eq!(fork.process.ppid, root.id());
    assert_eq!(fork.job.as_ref().unwrap().key, job);
}
