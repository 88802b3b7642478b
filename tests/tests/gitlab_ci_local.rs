//! gitlab-ci-local as it is (installed by `cargo xtask setup` from npm): a real GitLab CI runner
//! for workstations whose job shells descend from `node`, with no hook and no runner process the
//! agent knows by name. Its jobs are found by their environment at exec and named from it; the
//! project comes from the git remote, as GitLab's `CI_PROJECT_PATH` does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{
    CANARY, TestEnv,
    live::{agent, alerts, assert_no_secret, wait_alert},
    output_of,
};

fn gitlab_ci_local() -> PathBuf {
    let home = std::env::var_os("HOME").map_or("/root".into(), PathBuf::from);
    let bin = home.join(".cache/runner-monitor/gitlab-ci-local/node_modules/.bin/gitlab-ci-local");
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask setup` installs gitlab-ci-local",
        bin.display()
    );
    bin
}

fn git(repo: &Path, args: &[&str]) {
    let out = output_of(
        Command::new("git")
            .args(["-c", "user.email=ci@example.test", "-c", "user.name=ci"])
            .args(args)
            .current_dir(repo),
    );
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_gitlab_ci_local_job_sweeping_credentials_and_its_survivor_are_found() {
    let agent = agent();
    let env = TestEnv::new("gitlab-ci-local");
    let project = format!("acme-{}/widgets", std::process::id());
    let repo = env.dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join(".gitlab-ci.yml"),
        concat!(
            "sweep:\n",
            "  script:\n",
            "    - cat \"$HOME/.aws/credentials\" \"$HOME/.docker/config.json\" > /dev/null\n",
            "    - cat \"$HOME/.ssh/id_ed25519\" > /dev/null\n",
            // A survivor that outlives the job and reads a credential after it ended.
            "    - setsid nohup sh -c 'sleep 4; cat \"$HOME/.git-credentials\"' > /dev/null 2>&1 &\n",
        ),
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(
        &repo,
        &[
            "remote",
            "add",
            "origin",
            &format!("https://gitlab.example.test/{project}.git"),
        ],
    );
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "ci"]);

    let out = output_of(
        Command::new(gitlab_ci_local())
            .args(["--shell-executor-no-image", "--variable"])
            .arg(format!("CI_JOB_TOKEN={CANARY}"))
            .arg("--variable")
            .arg(format!("DEPLOY_PASSWORD={CANARY}"))
            .current_dir(&repo)
            .env_clear()
            .env("HOME", &env.home)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("GITHUB_TOKEN", CANARY),
    );
    assert!(
        out.status.success(),
        "gitlab-ci-local failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let harvest = wait_alert_for_project(agent, "credential-harvesting", &project);
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest:#}");
    assert_eq!(harvest["job"]["workflow"], "sweep", "{harvest:#}");
    let job_id = harvest["job"]["id"].as_str().unwrap().to_owned();
    let after = wait_alert(agent, "credential-after-job-end", &job_id, |_| true);
    assert_eq!(after["job"]["repository"], project.as_str(), "{after:#}");
    // The step: the command the job's shell ran (gitlab-ci-local runs the script's lines in a
    // subshell of the job's root shell).
    assert_eq!(harvest["step"]["kind"], "command", "{harvest:#}");
    let name = harvest["step"]["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("cat "), "{harvest:#}");
    let name = after["step"]["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("setsid nohup sh -c "), "{after:#}");
    assert_no_secret(agent);
}

/// Waits for an alert of `rule` whose job's repository is `project` (the job id is
/// gitlab-ci-local's own).
fn wait_alert_for_project(
    agent: &integration_tests::live::Agent,
    rule: &str,
    project: &str,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(a) = alerts(agent)
            .into_iter()
            .find(|a| a["rule"] == rule && a["job"]["repository"] == project)
        {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {rule} alert for {project}; alerts: {:#?}",
            alerts(agent)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
