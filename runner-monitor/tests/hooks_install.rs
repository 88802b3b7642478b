//! `runner-monitor hooks install|uninstall`, run as the real binary on copies of real runner
//! configurations (`tests/fixtures/hooks/`): a GitLab Runner `config.toml` with comments, global
//! settings and three `[[runners]]` (shell, docker, and one with a hand-written older hook
//! line), and a GitHub Actions runner directory with the `.env` its `config.sh` writes.
//! The expected results are `*.installed` files beside the fixtures, with `@HOOKS@` for the
//! hooks directory.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hooks");

/// A scratch directory with a copy of the fixtures and of the repository's hook scripts.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rm-hooks-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("runner")).unwrap();
        fs::create_dir_all(dir.join("hooks/github")).unwrap();
        fs::create_dir_all(dir.join("hooks/gitlab")).unwrap();
        let repository_hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hooks");
        for script in [
            "github/job-started.sh",
            "github/job-completed.sh",
            "gitlab/pre-build.sh",
            "gitlab/post-build.sh",
        ] {
            fs::copy(
                repository_hooks.join(script),
                dir.join("hooks").join(script),
            )
            .unwrap();
        }
        fs::copy(
            Path::new(FIXTURES).join("gitlab-config.toml"),
            dir.join("config.toml"),
        )
        .unwrap();
        for file in [".env", ".runner"] {
            fs::copy(
                Path::new(FIXTURES).join("github-runner").join(file),
                dir.join("runner").join(file),
            )
            .unwrap();
        }
        Self { dir }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    fn read(&self, relative: &str) -> String {
        fs::read_to_string(self.path(relative)).unwrap()
    }

    fn hooks_dir(&self) -> String {
        self.path("hooks").to_str().unwrap().to_owned()
    }

    /// `runner-monitor hooks ARGS... --hooks-dir <scratch>/hooks`.
    fn hooks(&self, args: &[&str]) -> Output {
        let output = Command::new(env!("CARGO_BIN_EXE_runner-monitor"))
            .arg("hooks")
            .args(args)
            .args(["--hooks-dir", &self.hooks_dir()])
            .output()
            .unwrap();
        eprintln!(
            "hooks {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn succeeds(&self, args: &[&str]) -> String {
        let output = self.hooks(args);
        assert!(output.status.success(), "hooks {args:?} failed");
        String::from_utf8(output.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let output = self.hooks(args);
        assert!(!output.status.success(), "hooks {args:?} succeeded");
        String::from_utf8(output.stderr).unwrap()
    }

    /// The backups made next to `relative`.
    fn backups(&self, relative: &str) -> Vec<PathBuf> {
        let file = self.path(relative);
        let prefix = format!(
            "{}.runner-monitor-",
            file.file_name().unwrap().to_str().unwrap()
        );
        let mut backups: Vec<PathBuf> = fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                name.starts_with(&prefix) && name.ends_with(".bak")
            })
            .collect();
        backups.sort();
        backups
    }

    /// An expected result from the fixtures, for this scratch directory's hooks.
    fn expected(&self, fixture: &str) -> String {
        fs::read_to_string(Path::new(FIXTURES).join(fixture))
            .unwrap()
            .replace("@HOOKS@", &self.hooks_dir())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn fixture(relative: &str) -> String {
    fs::read_to_string(Path::new(FIXTURES).join(relative)).unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn gitlab_install_adds_both_lines_to_every_runner_and_keeps_everything_else_byte_for_byte() {
    let scratch = Scratch::new("gitlab-install");
    let config = scratch.path("config.toml");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o640)).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&config, Some(4321), Some(4322)).unwrap();
    }

    let out = scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);

    assert_eq!(
        scratch.read("config.toml"),
        scratch.expected("gitlab-config.toml.installed")
    );
    assert!(
        out.contains("runners[2] (\"ci-runner-07-release\"): pre_build_script: replaced an older runner-monitor line"),
        "{out}"
    );
    // What GitLab will run: ours first in pre, last in post, theirs kept in between.
    let parsed: toml::Table = scratch.read("config.toml").parse().unwrap();
    let runners = parsed["runners"].as_array().unwrap();
    let pre = format!(
        "if [ -r {0}/gitlab/pre-build.sh ]; then . {0}/gitlab/pre-build.sh; fi",
        scratch.hooks_dir()
    );
    let post = format!(
        "if [ -r {0}/gitlab/post-build.sh ]; then . {0}/gitlab/post-build.sh; fi",
        scratch.hooks_dir()
    );
    let script = |runner: usize, key: &str| runners[runner][key].as_str().unwrap().to_owned();
    assert_eq!(
        script(0, "pre_build_script"),
        format!("{pre}\nrm -rf ./.cache/tmp")
    );
    assert_eq!(script(0, "post_build_script"), post);
    assert_eq!(script(1, "pre_build_script"), pre);
    assert_eq!(
        script(1, "post_build_script"),
        format!("echo \"build finished\"\nrm -f ~/.docker/config.json\n{post}\n")
    );
    assert_eq!(script(2, "pre_build_script"), pre);

    // One backup, the original byte for byte; backup and new file keep mode and owner.
    let backups = scratch.backups("config.toml");
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        fs::read_to_string(&backups[0]).unwrap(),
        fixture("gitlab-config.toml")
    );
    for file in [&config, &backups[0]] {
        let metadata = fs::metadata(file).unwrap();
        assert_eq!(metadata.mode() & 0o7777, 0o640, "{}", file.display());
        if is_root() {
            assert_eq!((metadata.uid(), metadata.gid()), (4321, 4322));
        }
    }
}

#[test]
fn gitlab_install_a_second_time_changes_nothing_and_makes_no_second_backup() {
    let scratch = Scratch::new("gitlab-twice");
    let config = scratch.path("config.toml");
    scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);
    let inode = fs::metadata(&config).unwrap().ino();

    let out = scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);

    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(
        scratch.read("config.toml"),
        scratch.expected("gitlab-config.toml.installed")
    );
    assert_eq!(
        fs::metadata(&config).unwrap().ino(),
        inode,
        "the file was rewritten"
    );
    assert_eq!(scratch.backups("config.toml").len(), 1);
}

#[test]
fn gitlab_uninstall_takes_out_only_runner_monitor_lines() {
    let scratch = Scratch::new("gitlab-uninstall");
    let config = scratch.path("config.toml");
    scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);

    scratch.succeeds(&["uninstall", "--gitlab", config.to_str().unwrap()]);

    // The original, less the hand-written older runner-monitor line (a pre_build_script with
    // nothing else goes entirely).
    let parsed: toml::Table = scratch.read("config.toml").parse().unwrap();
    let mut original: toml::Table = fixture("gitlab-config.toml").parse().unwrap();
    original["runners"].as_array_mut().unwrap()[2]
        .as_table_mut()
        .unwrap()
        .remove("pre_build_script");
    assert_eq!(parsed, original);
    assert_eq!(
        scratch.read("config.toml"),
        scratch.expected("gitlab-config.toml.uninstalled")
    );
}

#[test]
fn gitlab_config_that_is_not_toml_is_refused_with_file_line_and_column_and_left_alone() {
    let scratch = Scratch::new("gitlab-broken");
    let config = scratch.path("config.toml");
    let broken = fixture("gitlab-config.toml")
        .replace("  executor = \"docker\"\n", "  executor = \"docker\n");
    fs::write(&config, &broken).unwrap();

    let err = scratch.fails(&["install", "--gitlab", config.to_str().unwrap()]);

    assert!(
        err.contains(&format!("{}:37:21: not valid TOML", config.display())),
        "{err}"
    );
    assert_eq!(scratch.read("config.toml"), broken);
    assert!(scratch.backups("config.toml").is_empty());
}

#[test]
fn gitlab_config_behind_a_symlink_is_edited_where_it_lives_and_the_link_stays() {
    let scratch = Scratch::new("gitlab-symlink");
    let link = scratch.path("link.toml");
    std::os::unix::fs::symlink(scratch.path("config.toml"), &link).unwrap();

    scratch.succeeds(&["install", "--gitlab", link.to_str().unwrap()]);

    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(
        scratch.read("config.toml"),
        scratch.expected("gitlab-config.toml.installed")
    );
}

#[test]
fn github_install_appends_the_two_hooks_to_env_and_backs_it_up_once() {
    let scratch = Scratch::new("github-install");
    let runner = scratch.path("runner");
    let original = fixture("github-runner/.env");

    let out = scratch.succeeds(&["install", "--github", runner.to_str().unwrap()]);
    assert!(out.contains("restart the runner"), "{out}");
    let again = scratch.succeeds(&["install", "--github", runner.to_str().unwrap()]);

    let hooks = scratch.hooks_dir();
    assert_eq!(
        scratch.read("runner/.env"),
        format!(
            "{original}ACTIONS_RUNNER_HOOK_JOB_STARTED={hooks}/github/job-started.sh\n\
             ACTIONS_RUNNER_HOOK_JOB_COMPLETED={hooks}/github/job-completed.sh\n"
        )
    );
    assert!(again.contains("nothing to change"), "{again}");
    let backups = scratch.backups("runner/.env");
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(fs::read_to_string(&backups[0]).unwrap(), original);

    scratch.succeeds(&["uninstall", "--github", runner.to_str().unwrap()]);
    assert_eq!(scratch.read("runner/.env"), original);
}

#[test]
fn github_hook_pointing_at_another_script_is_replaced_in_place_and_reported() {
    let scratch = Scratch::new("github-replace");
    let runner = scratch.path("runner");
    let original = fixture("github-runner/.env").replace(
        "ImageOS",
        "ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/ci/cleanup.sh\nImageOS",
    );
    fs::write(scratch.path("runner/.env"), &original).unwrap();

    let out = scratch.succeeds(&["install", "--github", runner.to_str().unwrap()]);

    let hooks = scratch.hooks_dir();
    assert_eq!(
        scratch.read("runner/.env"),
        format!(
            "{}ACTIONS_RUNNER_HOOK_JOB_STARTED={hooks}/github/job-started.sh\n",
            original.replace(
                "/opt/ci/cleanup.sh",
                &format!("{hooks}/github/job-completed.sh")
            )
        )
    );
    assert!(
        out.contains("line 9: ACTIONS_RUNNER_HOOK_JOB_COMPLETED was \"/opt/ci/cleanup.sh\"")
            && out.contains("no longer runs"),
        "{out}"
    );
}

#[test]
fn github_runner_without_env_gets_one_with_only_the_hooks_and_no_backup() {
    let scratch = Scratch::new("github-new");
    fs::remove_file(scratch.path("runner/.env")).unwrap();
    let runner = scratch.path("runner");

    scratch.succeeds(&["install", "--github", runner.to_str().unwrap()]);

    let hooks = scratch.hooks_dir();
    assert_eq!(
        scratch.read("runner/.env"),
        format!(
            "ACTIONS_RUNNER_HOOK_JOB_STARTED={hooks}/github/job-started.sh\n\
             ACTIONS_RUNNER_HOOK_JOB_COMPLETED={hooks}/github/job-completed.sh\n"
        )
    );
    let mode = fs::metadata(scratch.path("runner/.env")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o644);
    assert!(scratch.backups("runner/.env").is_empty());
}

#[test]
fn github_env_with_a_line_the_runner_would_misread_is_refused_naming_the_line() {
    let scratch = Scratch::new("github-broken");
    let runner = scratch.path("runner");
    let broken = fixture("github-runner/.env").replace("ANT_HOME=", "export ANT_HOME=");
    fs::write(scratch.path("runner/.env"), &broken).unwrap();

    let err = scratch.fails(&["install", "--github", runner.to_str().unwrap()]);

    assert!(
        err.contains(&format!(
            "{}:3: \"export ANT_HOME\" is not a variable name",
            scratch.path("runner/.env").display()
        )),
        "{err}"
    );
    assert_eq!(scratch.read("runner/.env"), broken);
    assert!(scratch.backups("runner/.env").is_empty());
}

#[test]
fn one_broken_file_means_no_file_is_written() {
    let scratch = Scratch::new("all-or-nothing");
    let runner = scratch.path("runner");
    let config = scratch.path("config.toml");
    fs::write(&config, "[[runners]\nname = 1\n").unwrap();

    let err = scratch.fails(&[
        "install",
        "--github",
        runner.to_str().unwrap(),
        "--gitlab",
        config.to_str().unwrap(),
    ]);

    assert!(err.contains(&format!("{}:1:", config.display())), "{err}");
    assert_eq!(scratch.read("runner/.env"), fixture("github-runner/.env"));
    assert!(scratch.backups("runner/.env").is_empty());
}

#[test]
fn missing_hook_scripts_are_refused_before_any_file_is_touched() {
    let scratch = Scratch::new("no-scripts");
    fs::remove_file(scratch.path("hooks/gitlab/post-build.sh")).unwrap();
    let config = scratch.path("config.toml");

    let err = scratch.fails(&["install", "--gitlab", config.to_str().unwrap()]);

    assert!(
        err.contains(&format!(
            "hook script {}/gitlab/post-build.sh is missing",
            scratch.hooks_dir()
        )),
        "{err}"
    );
    assert_eq!(scratch.read("config.toml"), fixture("gitlab-config.toml"));
}

#[test]
fn dry_run_prints_the_changed_lines_and_writes_nothing() {
    let scratch = Scratch::new("dry-run");
    let runner = scratch.path("runner");
    let config = scratch.path("config.toml");

    let out = scratch.succeeds(&[
        "install",
        "--dry-run",
        "--github",
        runner.to_str().unwrap(),
        "--gitlab",
        config.to_str().unwrap(),
    ]);

    assert!(
        out.contains(&format!(
            "+11: ACTIONS_RUNNER_HOOK_JOB_STARTED={}/github/job-started.sh",
            scratch.hooks_dir()
        )),
        "{out}"
    );
    assert!(
        out.contains(
            "-65:   pre_build_script = \". /opt/runner-monitor/hooks/gitlab/pre-build.sh\""
        ),
        "{out}"
    );
    // Only changed lines: a runner's token is never among them.
    assert!(!out.contains("token"), "{out}");
    assert_eq!(scratch.read("config.toml"), fixture("gitlab-config.toml"));
    assert_eq!(scratch.read("runner/.env"), fixture("github-runner/.env"));
    assert!(scratch.backups("config.toml").is_empty());
}

/// Runs a build script the way GitLab's shell executor does (shell text in the job's shell,
/// errors fatal), with a stand-in `runner-monitor` on PATH that records its arguments.
fn run_build_script(scratch: &Scratch, script: &str) -> String {
    let bin = scratch.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let log = scratch.path("calls.log");
    fs::write(
        bin.join("runner-monitor"),
        format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
    )
    .unwrap();
    fs::set_permissions(
        bin.join("runner-monitor"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let status = Command::new("sh")
        .args(["-e", "-c", script])
        .current_dir(&scratch.dir)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("CI_JOB_ID", "4242")
        .env("CI_PROJECT_PATH", "acme/app")
        .status()
        .unwrap();
    assert!(status.success(), "the build script failed: {script}");
    fs::read_to_string(&log).unwrap_or_default()
}

#[test]
fn gitlab_pre_build_script_as_installed_starts_the_job_and_still_runs_the_runners_own_line() {
    let scratch = Scratch::new("gitlab-shell");
    let config = scratch.path("config.toml");
    scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);
    let parsed: toml::Table = scratch.read("config.toml").parse().unwrap();
    let shell_runner = &parsed["runners"][0];
    fs::create_dir_all(scratch.path(".cache/tmp")).unwrap();

    let calls = run_build_script(&scratch, shell_runner["pre_build_script"].as_str().unwrap());

    assert!(
        calls.starts_with("job start --platform gitlab --id 4242 --pid ")
            && calls.contains("--repository acme/app"),
        "{calls}"
    );
    assert!(
        !scratch.path(".cache/tmp").exists(),
        "the runner's own line did not run"
    );
    let calls = run_build_script(
        &scratch,
        shell_runner["post_build_script"].as_str().unwrap(),
    );
    assert!(calls.ends_with("job end --id 4242\n"), "{calls}");
}

#[test]
fn gitlab_build_scripts_do_nothing_where_the_hook_scripts_are_not_there() {
    // A docker executor runs the job shell in a container without the hook scripts.
    let scratch = Scratch::new("gitlab-container");
    let config = scratch.path("config.toml");
    scratch.succeeds(&["install", "--gitlab", config.to_str().unwrap()]);
    let parsed: toml::Table = scratch.read("config.toml").parse().unwrap();
    fs::remove_dir_all(scratch.path("hooks")).unwrap();

    for key in ["pre_build_script", "post_build_script"] {
        let calls = run_build_script(&scratch, parsed["runners"][1][key].as_str().unwrap());
        assert_eq!(calls, "", "{key}");
    }
}
