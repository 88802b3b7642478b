//! persistence-planted through the real agent: a GitHub-style step writes a cron entry, a systemd
//! unit, a timer (renamed into place), `/etc/ld.so.preload` and the runner's own `.env`. The system paths are written in a
//! throw-away root: the step runs in a private mount namespace with an overlay over `/etc` whose
//! upper layer is the test's directory, so the host's `/etc` never changes (checked, and undone by
//! a guard even if the test panics).

use std::path::{Path, PathBuf};

use integration_tests::{
    TestEnv,
    live::{agent, alerts, assert_no_secret, github_job, run_id, wait_alert},
};

/// What the host's `/etc` held at the start, put back when dropped (also on panic): the test
/// never writes the host's `/etc`, and this makes sure a broken overlay cannot leave a change.
struct HostEtcGuard {
    /// Path and its content before the test (`None`: it did not exist).
    before: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl HostEtcGuard {
    fn new(paths: &[&str]) -> Self {
        Self {
            before: paths
                .iter()
                .map(|p| (PathBuf::from(p), std::fs::read(p).ok()))
                .collect(),
        }
    }

    /// The paths whose content differs from what they held at the start.
    fn changed(&self) -> Vec<PathBuf> {
        self.before
            .iter()
            .filter(|(p, was)| &std::fs::read(p).ok() != was)
            .map(|(p, _)| p.clone())
            .collect()
    }
}

impl Drop for HostEtcGuard {
    fn drop(&mut self) {
        for (path, was) in &self.before {
            if std::fs::read(path).ok() == *was {
                continue;
            }
            match was {
                Some(content) => {
                    let _ = std::fs::write(path, content);
                }
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// A step script that runs `body` in a private mount namespace whose `/etc` is an overlay over
/// the host's, with its upper layer in `dir`. `set -e`: if the overlay cannot be mounted the
/// step stops before writing anything.
fn in_throwaway_etc(dir: &Path, body: &str) -> String {
    let (upper, work) = (dir.join("etc-upper"), dir.join("etc-work"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    format!(
        "unshare --mount --propagation private sh -e -c '\
         mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc\n\
         {body}'",
        upper = upper.display(),
        work = work.display(),
    )
}

#[test]
fn a_step_planting_cron_systemd_ld_so_preload_and_the_runner_env_raises_each() {
    let name = format!("rm-test-{}", std::process::id());
    let cron = format!("/etc/cron.d/{name}");
    let unit = format!("/etc/systemd/system/{name}.service");
    let timer = format!("/etc/systemd/system/{name}.timer");
    let timer_tmp = format!("/etc/{name}.timer.tmp");
    let preload = "/etc/ld.so.preload";
    let guard = HostEtcGuard::new(&[&cron, &unit, &timer, &timer_tmp, preload]);

    let agent = agent();
    let env = TestEnv::new("live-persistence");
    let runner_dir = env.home.join("actions-runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    let runner_env = runner_dir.join(".env");
    let run = run_id(1);
    // `cat` reading the cron entry back is what cron does: not planting.
    let body = format!(
        "mkdir -p /etc/cron.d /etc/systemd/system\n\
         echo \"* * * * * root /bin/true\" > {cron}\n\
         cat {cron} > /dev/null\n\
         printf \"[Service]\\nExecStart=/bin/true\\n\" > {unit}\n\
         printf \"[Timer]\\nOnCalendar=minutely\\n\" > {timer_tmp}\n\
         mv {timer_tmp} {timer}\n\
         : > {preload}\n"
    );
    let steps = format!(
        "{}\nsh -c 'printf \"LANG=C\\n\" > \"{}\"'",
        in_throwaway_etc(&env.dir, &body),
        runner_env.display()
    );
    github_job(&env, agent, &run, "evil/app", &steps);

    // The step really wrote them, in the throw-away layer.
    let upper = env.dir.join("etc-upper");
    assert!(upper.join(format!("cron.d/{name}")).exists());
    assert!(
        upper
            .join(format!("systemd/system/{name}.service"))
            .exists()
    );
    assert!(upper.join(format!("systemd/system/{name}.timer")).exists());
    assert_eq!(std::fs::read(upper.join("ld.so.preload")).unwrap(), b"");
    assert!(
        guard.changed().is_empty(),
        "the host's /etc changed: {:?}",
        guard.changed()
    );

    let id = format!("{run}/build");
    let runner_env = runner_env.display().to_string();
    // Step 1 is the job-started hook, step 2 the throw-away-/etc script, step 3 the `.env` write.
    for (path, kind, technique, severity, step) in [
        (cron.as_str(), "cron", "T1053.003", "high", 2),
        (unit.as_str(), "systemd", "T1543.002", "high", 2),
        // Written beside it and renamed into place, as editors and `crontab` do.
        (timer.as_str(), "systemd", "T1543.002", "high", 2),
        (preload, "ld-preload", "T1574.006", "high", 2),
        (runner_env.as_str(), "runner", "T1574.007", "critical", 3),
    ] {
        let alert = wait_alert(agent, "persistence-planted", &id, |a| {
            a["persistence"]["path"] == path
        });
        assert_eq!(alert["persistence"]["kind"], kind, "{alert}");
        assert_eq!(alert["mitre"]["id"], technique, "{alert}");
        assert_eq!(alert["severity"], severity, "{alert}");
        assert_eq!(alert["job"]["repository"], "evil/app", "{alert}");
        assert!(alert["summary"].as_str().unwrap().contains(path), "{alert}");
        assert!(alert["process"]["pid"].as_u64().unwrap() > 0, "{alert}");
        assert_eq!(alert["step"]["index"], step, "{alert}");
        assert_eq!(alert["step"]["kind"], "command", "{alert}");
        let name = alert["step"]["name"].as_str().unwrap_or_default();
        let first = if step == 2 { "unshare " } else { "sh -c " };
        assert!(name.starts_with(first), "{alert}");
    }
    let planted: Vec<String> = alerts(agent)
        .iter()
        .filter(|a| a["rule"] == "persistence-planted" && a["job"]["id"] == id.as_str())
        .map(|a| a["persistence"]["path"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        planted.len(),
        5,
        "one finding per planted path, none for `cat` reading the cron entry: {planted:?}"
    );
    assert_no_secret(agent);
}

#[test]
fn a_symlink_made_at_ld_so_preload_raises_without_a_write() {
    let preload = "/etc/ld.so.preload";
    let guard = HostEtcGuard::new(&[preload]);
    let agent = agent();
    let env = TestEnv::new("live-persistence-symlink");
    let run = run_id(2);
    // `/dev/null`: what the dynamic linker then reads in the namespace is empty.
    let steps = in_throwaway_etc(&env.dir, &format!("ln -s /dev/null {preload}\n"));
    github_job(&env, agent, &run, "evil/app", &steps);
    let link = std::fs::symlink_metadata(env.dir.join("etc-upper/ld.so.preload")).unwrap();
    assert!(link.file_type().is_symlink());
    assert!(guard.changed().is_empty(), "the host's /etc changed");
    let alert = wait_alert(agent, "persistence-planted", &format!("{run}/build"), |a| {
        a["persistence"]["path"] == preload
    });
    assert_eq!(alert["persistence"]["how"], "made a symlink at", "{alert}");
    assert_eq!(alert["persistence"]["kind"], "ld-preload", "{alert}");
    assert_eq!(alert["process"]["comm"], "ln", "{alert}");
}
