//! A job's `docker build`: the daemon runs the build's `RUN` steps in containers it makes
//! itself, with no start request from the job (the classic builder's containers, BuildKit's
//! step cgroups). While the job's build request is open they are the job's steps; a build
//! outside any job is nobody's. A real Docker engine (`integration_tests::docker`) and the real
//! agent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    TestEnv,
    docker::{DOCKER_CLI, Docker, IMAGE, read_three_kinds},
    live::{
        Agent, agent, agent_dir, assert_no_secret, assert_no_secret_in, assert_nothing_of,
        free_port, github_job, run_id, test_policy, wait_alert,
    },
};

/// A build context whose one `RUN` step writes three kinds of credentials under `/<marker>` and
/// reads them back (made-up values: no canary leaves the test's home).
fn context(docker: &Docker, marker: &str) -> PathBuf {
    let files = [".aws/credentials", ".ssh/id_ed25519", ".docker/config.json"]
        .map(|f| format!("/{marker}/{f}"));
    let run = format!(
        "busybox mkdir -p /{marker}/.aws /{marker}/.ssh /{marker}/.docker && \
         for f in {all}; do echo made-up > $f; done && cat {all} > /dev/null",
        all = files.join(" "),
    );
    context_running(docker, marker, &run)
}

/// A build context `context-<name>` whose one step runs `run` in the busybox image.
fn context_running(docker: &Docker, name: &str, run: &str) -> PathBuf {
    let dir = docker.dir.join(format!("context-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), format!("FROM {IMAGE}\nRUN {run}\n")).unwrap();
    dir
}

fn build(docker: &Docker, buildkit: bool, tag: &str, context: &Path) -> String {
    format!(
        "DOCKER_BUILDKIT={kit} {cli} build --progress plain --network none -t {tag} {context} \
         > /dev/null 2>&1",
        kit = u8::from(buildkit),
        cli = docker.shell_cli(),
        context = context.display(),
    )
}

/// While a job's build is open, every Docker daemon's new container is taken for its step
/// (docs/containers.md, "A job's docker build"): the tests' builds take turns.
static ONE_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_jobs_docker_build_steps_are_the_jobs_and_a_build_outside_jobs_is_nobodys() {
    let _turn = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let agent = agent();
    let docker = Docker::start("build");
    let env = TestEnv::new("containers-build");
    // A build outside any job first: its step reads the same kinds of credentials.
    let outside = context(&docker, "outside");
    let out = docker
        .cli()
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--network", "none", "-t", "rm-build-outside"])
        .arg(&outside)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = run_id(1);
    let steps = [
        build(
            &docker,
            false,
            "rm-build-classic",
            &context(&docker, "classic"),
        ),
        build(&docker, true, "rm-build-kit", &context(&docker, "kit")),
    ]
    .join("\n");
    github_job(&env, agent, &run, "acme/build", &steps);
    let id = format!("{run}/build");
    // The classic builder's step is a container of the daemon's (`/docker/<id>`).
    let classic = wait_alert(agent, "credential-harvesting", &id, |a| {
        a.to_string().contains("/classic/")
    });
    assert_eq!(classic["job"]["repository"], "acme/build", "{classic}");
    // The step's shell writes the files (the first touches), then its `cat` reads them.
    assert_eq!(classic["process"]["exe"], "/bin/sh", "{classic}");
    let c = &classic["container"];
    assert_eq!(c["runtime"], "docker", "{classic}");
    assert_eq!(c["id"].as_str().map(str::len), Some(64), "{classic}");
    assert_eq!(c["requested_as"]["by"], "build", "{classic}");
    // The job's daemon made it: nothing says otherwise.
    assert!(c["requested_as"].get("confirmed").is_none(), "{classic}");
    // BuildKit's step has a cgroup of its own (`/docker/buildkit/<id>`), no container.
    let kit = wait_alert(agent, "credential-harvesting", &id, |a| {
        a.to_string().contains("/kit/")
    });
    let c = &kit["container"];
    assert_eq!(c["runtime"], "buildkit", "{kit}");
    assert_eq!(c["id"].as_str().map(str::len), Some(25), "{kit}");
    assert_eq!(c["requested_as"]["by"], "build", "{kit}");
    assert!(c["requested_as"].get("confirmed").is_none(), "{kit}");
    // The outside build's step came first in the one ring buffer: nothing of it.
    assert_nothing_of(agent, "/outside/", "a build step outside jobs");
    assert_no_secret(agent);
}

/// While a job's build is open, a container that something outside jobs starts on another
/// daemon is taken for a step of the build (the kernel cannot tell daemons apart); the job's
/// daemon does not know it, so the finding says the match is not confirmed.
#[test]
fn another_daemons_container_made_during_a_jobs_build_is_not_confirmed() {
    let _turn = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let agent = agent();
    let docker = Docker::start("build-slow");
    let other = Docker::start("build-other");
    let env = TestEnv::new("containers-build-other");
    let context = context_running(&docker, "slow", "sleep 5");
    let home = env.home.display().to_string();
    // Once the job's build step runs (it sleeps), the other daemon's container comes.
    let host = docker.host();
    let outside = std::thread::spawn(move || {
        let step_runs = || {
            let ps = Command::new(DOCKER_CLI)
                .args(["-H", &host, "ps", "-q"])
                .output();
            ps.is_ok_and(|o| !o.stdout.is_empty())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !step_runs() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let sweep = format!("{} > /dev/null", read_three_kinds("/h-other"));
        let mount = format!("{home}:/h-other");
        let args = [
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &mount,
            IMAGE,
            "sh",
            "-c",
            &sweep,
        ];
        other.run(&args);
        other
    });
    let run = run_id(3);
    let step = build(&docker, false, "rm-build-slow", &context);
    github_job(&env, agent, &run, "acme/build-other", &step);
    let other = outside.join().unwrap();
    let alert = wait_alert(
        agent,
        "credential-harvesting",
        &format!("{run}/build"),
        |a| a.to_string().contains("/h-other"),
    );
    assert_eq!(alert["container"]["requested_as"]["by"], "build", "{alert}");
    assert_eq!(
        alert["container"]["requested_as"]["confirmed"], false,
        "{alert}"
    );
    drop(other);
    assert_no_secret(agent);
}

/// Block mode reaches a job's build steps: a `RUN` step's connect to an address the job's rule
/// does not admit fails with EPERM in the kernel, reported for the job. Before, the step was
/// nobody's and block mode let it through: a way out of the allowlist. The build has no network
/// (`--network none`): a connect the kernel let through fails with ENETUNREACH, so nothing
/// leaves the host either way.
#[test]
fn block_mode_refuses_a_jobs_build_step_what_the_job_may_not_reach() {
    let _turn = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = agent_dir("containers-build-block");
    let policy = format!(
        "{}\n[[rules]]\nrepository = \"acme/build-blocked\"\nmode = \"block\"\n",
        test_policy()
    );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let docker = Docker::start("build-block");
    let env = TestEnv::new("containers-build-block");
    let nc = format!("busybox nc -w 1 {REFUSED} 7000 < /dev/null; echo nc=$?");
    let context = context_running(&docker, "egress", &nc);
    let run = run_id(2);
    let step = build(&docker, false, "rm-build-egress", &context);
    github_job(&env, &agent, &run, "acme/build-blocked", &step);
    let alert = wait_alert(&agent, "unexpected-egress", &format!("{run}/build"), |a| {
        a["destination"]["ip"] == REFUSED
    });
    assert_eq!(alert["blocked"], true, "{alert}");
    assert_eq!(alert["container"]["requested_as"]["by"], "build", "{alert}");
    drop(docker);
    assert!(agent.stop().success());
    assert_no_secret_in(&dir);
}

/// An address no rule admits (and no route reaches from the build's empty network).
const REFUSED: &str = "10.214.9.3";
