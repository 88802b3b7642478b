//! A client and a server network namespace joined by a veth pair (IPv4 and IPv6), and servers
//! (`job-step` subcommands) started in either; all removed on drop, also when the test fails.
//! The egress tests run their jobs in the client namespace and reach only the server one.

use std::{
    io::BufRead,
    process::{Child, Command, Stdio},
};

use crate::{job_step, sh, spawn_with_parent_death};

pub struct NetPair {
    pub client: String,
    pub server: String,
    servers: Vec<Child>,
}

impl NetPair {
    /// Namespaces `rm<tag>c<pid>` and `rm<tag>s<pid>` on subnet `10.<net>.0.0/24` and
    /// `fd00:<net>::/64`: the client side is `.1` / `::1`, the server side has `server_v4` (on
    /// /24) and `server_v6` (on /64).
    pub fn new(tag: &str, net: u8, server_v4: &[&str], server_v6: &[&str]) -> Self {
        let id = std::process::id() % 100000;
        let pair = NetPair {
            client: format!("rm{tag}c{id}"),
            server: format!("rm{tag}s{id}"),
            servers: Vec::new(),
        };
        let (c, s) = (&pair.client, &pair.server);
        for name in [c, s] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            sh(&format!(
                "ip netns add {name} && ip -n {name} link set lo up"
            ));
        }
        let mut script = format!(
            "ip -n {c} link add vc type veth peer name vs netns {s} && \
             ip -n {c} addr add 10.{net}.0.1/24 dev vc && \
             ip -n {c} addr add fd00:{net}::1/64 dev vc nodad && ip -n {c} link set vc up"
        );
        for ip in server_v4 {
            script.push_str(&format!(" && ip -n {s} addr add {ip}/24 dev vs"));
        }
        for ip in server_v6 {
            script.push_str(&format!(" && ip -n {s} addr add {ip}/64 dev vs nodad"));
        }
        script.push_str(&format!(" && ip -n {s} link set vs up"));
        sh(&script);
        pair
    }

    /// Job script lines that run `job-step COMMAND CASE` in the client namespace for each case,
    /// each printing `CASE=ANSWER` (for `live::job_answers`).
    pub fn client_steps(&self, command: &str, cases: &[String]) -> String {
        cases
            .iter()
            .map(|case| {
                format!(
                    "printf '%s=' '{case}'; ip netns exec {} \"$JOB_STEP\" {command} {case}\n",
                    self.client
                )
            })
            .collect()
    }

    /// `job-step ARGS` inside namespace `name` (`client` or `server`), ready when it printed
    /// `listening`.
    pub fn serve(&mut self, name: &str, args: &[String]) {
        self.servers.push(serve_in(name, args));
    }
}

/// `job-step ARGS` inside network namespace `name`, killed if the test dies; returned once it
/// printed `listening`.
pub fn serve_in(name: &str, args: &[String]) -> Child {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", name])
        .arg(job_step())
        .args(args)
        .stdout(Stdio::piped());
    let mut child = spawn_with_parent_death(&mut command, libc::SIGKILL).expect("serve");
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(
        ready.trim(),
        "listening",
        "{args:?} in {name} did not start"
    );
    child
}

/// Asserts that each `(case, expected)` of `cases` got `expected` in `answers`; `what` and
/// `log` go into the message.
pub fn assert_answers(
    what: &str,
    cases: &[(String, &str)],
    answers: &std::collections::BTreeMap<String, String>,
    log: impl Fn() -> String,
) {
    for (case, expected) in cases {
        assert_eq!(
            answers.get(case).map(String::as_str),
            Some(*expected),
            "{what}: `{case}`; all answers: {answers:#?}\nlog: {}",
            log()
        );
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
