//! Match the file, not the name, through the real agent: a job links a credential and a secret
//! socket to innocent names; a survivor reading the credential through its link after the job
//! ended, and a step connecting to the socket through its link, are reported under the host
//! paths of what they reached, with the paths they used.

use std::os::unix::net::UnixListener;

use integration_tests::{
    TestEnv,
    live::{
        Agent, agent_dir, assert_no_secret, free_port, github_job, run_id, test_policy, wait_alert,
    },
};

/// Symlinks made by the job, removed on drop (also when the test fails).
struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for link in &self.0 {
            let _ = std::fs::remove_file(link);
        }
    }
}

#[test]
fn a_credential_and_a_secret_socket_reached_through_symlinks_are_reported_as_themselves() {
    let dir = agent_dir("identity");
    let socket = dir.join("docker.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let socket = socket.to_str().unwrap().to_owned();
    let policy = format!(
        "{}\n[[secret_sockets]]\nkind = \"test-engine\"\npaths = [\"{socket}\"]\n",
        test_policy()
    );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("identity");
    let id = std::process::id();
    let links = Links(vec![
        format!("/tmp/rm-notes-{id}.txt"),
        format!("/tmp/rm-ipc-{id}.sock"),
    ]);
    let (notes, ipc) = (&links.0[0], &links.0[1]);
    let run = run_id(1);
    github_job(
        &env,
        &agent,
        &run,
        "acme/app",
        &format!(
            "ln -s \"$HOME/.aws/credentials\" {notes}\nln -s {socket} {ipc}\n\
             \"$JOB_STEP\" connect-unix {ipc}\n\
             (setsid sh -c 'sleep 2; cat {notes} > /dev/null; sleep 3' &)"
        ),
    );
    let job_id = format!("{run}/build");
    let credential = env.home.join(".aws/credentials");
    let after = wait_alert(&agent, "credential-after-job-end", &job_id, |_| true);
    assert_eq!(
        after["credential"]["path"],
        credential.to_str().unwrap(),
        "{after}"
    );
    assert_eq!(after["credential"]["used_path"], notes.as_str(), "{after}");
    assert_eq!(after["credential"]["kind"], "aws", "{after}");
    let socket_alert = wait_alert(&agent, "secret-socket-access", &job_id, |a| {
        a["socket"]["kind"] == "test-engine"
    });
    assert_eq!(
        socket_alert["socket"]["path"],
        socket.as_str(),
        "{socket_alert}"
    );
    assert_eq!(
        socket_alert["socket"]["used_path"],
        ipc.as_str(),
        "{socket_alert}"
    );
    assert!(
        socket_alert["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("through {ipc}")),
        "{socket_alert}"
    );
    assert_no_secret(&agent);
    drop(links);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}

/// A survivor reading the job's credential through its own `/proc/<pid>/root`: the credential
/// under its host path, with the path used.
#[test]
fn a_credential_read_through_proc_root_is_reported_under_its_host_path() {
    let dir = agent_dir("identity-procroot");
    std::fs::write(dir.join("policy.toml"), test_policy()).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("identity-procroot");
    let run = run_id(2);
    github_job(
        &env,
        &agent,
        &run,
        "acme/app",
        "(setsid sh -c 'sleep 2; cat /proc/$$/root'\"$HOME\"'/.aws/credentials > /dev/null; \
         sleep 3' &)",
    );
    let job_id = format!("{run}/build");
    let credential = env.home.join(".aws/credentials");
    let credential = credential.to_str().unwrap();
    let after = wait_alert(&agent, "credential-after-job-end", &job_id, |_| true);
    assert_eq!(after["credential"]["path"], credential, "{after}");
    let used = after["credential"]["used_path"]
        .as_str()
        .unwrap_or_default();
    assert!(
        used.starts_with("/proc/") && used.ends_with(&format!("/root{credential}")),
        "{after}"
    );
    assert_no_secret(&agent);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}
