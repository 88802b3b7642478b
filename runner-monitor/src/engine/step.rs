//! Which step of a job a process runs in, from the command line of the process that started the
//! step: pure, so the live agent and `replay` derive the same step from the same exec events.
//!
//! - GitHub Actions: the runner (`Runner.Worker`, the job's root) starts each step as a direct
//!   child. A JavaScript action runs `node <runner>/_work/_actions/OWNER/REPO/REF/<main>`, a
//!   docker action builds from `_work/_actions/OWNER/REPO/REF/Dockerfile`, a composite action's
//!   scripts live under the same folder; a `run:` step runs a script the runner wrote to
//!   `_work/_temp/<uuid>.sh`.
//! - GitLab: a stage's shell is its (kernel) job's root; executors that hand the shell its script
//!   as a file name it after the stage (`/scripts-1-2/step_script`, the custom executor's
//!   `run <script> step_script`). The shell executor pipes the script to `bash` on stdin: those
//!   stages are not named, and the stage shell's direct children are `command` steps.
//! - Anything else: the root's direct child's command.

use super::finding::Step;
use crate::event::Event;

/// The stages of a GitLab job, as the runner names them.
const GITLAB_STAGES: &[&str] = &[
    "prepare_script",
    "get_sources",
    "clear_worktree",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "build_script",
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];

/// Build folders an action's entry point often sits in: `dist/index.js` is the action at the
/// folder above, not an action in `dist/`.
const BUILD_DIRS: &[&str] = &["dist", "lib", "build", "out", "src", "bin"];

/// A command line's step name is cut here (characters).
const MAX_NAME: usize = 200;

/// The stage a job root's command line names (`/scripts-1-2/step_script`), if any.
pub fn stage_of_root(argv: &[String]) -> Option<Step> {
    // A word of any argument: `sh -c '... /scripts-1-2/step_script'` names it inside a script.
    let words = argv
        .iter()
        .flat_map(|arg| arg.split(|c: char| c.is_whitespace() || "'\";".contains(c)));
    words
        .map(|word| word.rsplit('/').next().unwrap_or(word))
        .find(|last| GITLAB_STAGES.contains(last))
        .map(|stage| Step {
            index: None,
            kind: Some("stage".into()),
            action: None,
            name: Some(stage.to_owned()),
        })
}

/// The step a direct child of the job's root starts by running `filename` with `argv`.
pub fn of_step_process(filename: &str, argv: &[String], index: u32) -> Step {
    let words = || std::iter::once(filename).chain(argv.iter().map(String::as_str));
    let mut step = Step {
        index: Some(index),
        ..Step::default()
    };
    if let Some(action) = words().find_map(action_of_path) {
        step.kind = Some("action".into());
        step.action = Some(action);
    } else if let Some(script) = words().find_map(run_script_of_path) {
        step.kind = Some("run".into());
        step.name = Some(script);
    } else if let Some(stage) = stage_of_root(argv) {
        step.kind = stage.kind;
        step.name = stage.name;
    } else {
        step.kind = Some("command".into());
        let base = filename.rsplit('/').next().unwrap_or(filename);
        let mut name = std::iter::once(base)
            .chain(argv.iter().skip(1).map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        if name.chars().count() > MAX_NAME {
            name = name.chars().take(MAX_NAME).collect::<String>() + "…";
        }
        step.name = Some(name);
    }
    step
}

/// The step after its own process exec'd again: a bare command becomes the action, `run:`
/// script or stage the new command line names (`sh -c 'node .../_actions/...'` becoming
/// `node ...`); otherwise the first command line stays its name (`setsid nohup bash -c '...'`
/// is not renamed after the `cat` that bash finally execs).
pub fn on_reexec(previous: &Step, next: Step) -> Step {
    let bare = |s: &Step| s.kind.as_deref() == Some("command");
    if bare(previous) && !bare(&next) {
        next
    } else {
        previous.clone()
    }
}

/// A step in one line: `step 2: action evil-org/changed-files@v45`, `stage step_script`.
pub fn label(step: &Step) -> String {
    let mut parts = Vec::new();
    if let Some(i) = step.index {
        parts.push(format!("step {i}:"));
    }
    parts.extend(step.kind.clone());
    parts.extend(step.action.clone());
    parts.extend(step.name.clone());
    parts.join(" ")
}

/// `owner/repo@ref` (or `owner/repo/path@ref`) for a path under `_work/_actions/`.
fn action_of_path(path: &str) -> Option<String> {
    let (_, rest) = path.split_once("/_actions/")?;
    let mut parts = rest.split('/').filter(|p| !p.is_empty() && *p != ".");
    let (owner, repo, git_ref) = (parts.next()?, parts.next()?, parts.next()?);
    // The runner keeps `_actions/<owner>/<repo>.completed` markers and a `_temp_<n>` download
    // folder beside the actions: not actions.
    if owner.starts_with('_') || repo.ends_with(".completed") {
        return None;
    }
    let rest: Vec<&str> = parts.collect();
    // The entry point's folder: `sub/../lib/main.js` (an action in `sub` whose `main` climbs
    // out of it) is the action in `sub`; `sub/dist/index.js` is the action in `sub`.
    let mut dir: Vec<&str> = Vec::new();
    for (n, part) in rest.iter().enumerate() {
        if *part == ".." || n + 1 == rest.len() {
            break;
        }
        dir.push(part);
        if rest.get(n + 1) == Some(&"..") {
            break;
        }
    }
    if dir.last().is_some_and(|d| BUILD_DIRS.contains(d)) {
        dir.pop();
    }
    let sub = if dir.is_empty() {
        String::new()
    } else {
        format!("/{}", dir.join("/"))
    };
    Some(format!("{owner}/{repo}{sub}@{git_ref}"))
}

/// The script file of a `run:` step: `<runner>/_work/_temp/<uuid>.sh`.
fn run_script_of_path(path: &str) -> Option<String> {
    let (_, rest) = path.split_once("/_work/_temp/")?;
    (!rest.is_empty() && !rest.contains('/')).then(|| format!("_temp/{rest}"))
}

/// The engine's side: which process starts a step, and which step a process is in.
impl super::Engine {
    /// Whether `p`'s children start steps: it is its job's root, or a subshell of it, and not
    /// in a named stage.
    pub(super) fn starts_steps(&self, p: &super::Process) -> bool {
        let job_root = p.job.and_then(|k| self.jobs.get(&k)).map(|j| j.root_pid);
        (p.is_root || job_root == Some(p.pid) || p.root_fork) && p.step.is_none()
    }

    /// The step an exec starts: a stage named on a stage shell's command line, or the step a
    /// direct child of the job's root (one not in a named stage) starts. A step's own process
    /// exec'ing again may name it better (`on_reexec`).
    pub(super) fn track_step(&mut self, event: &Event, filename: &str, argv: &[String]) {
        let pid = event.process.pid;
        let Some(p) = self.processes.get(&pid) else {
            return;
        };
        // A root the kernel recognised says so in its events; one registered by a hook or
        // found by discovery is its job's `root_pid`.
        let job_root = p.job.and_then(|k| self.jobs.get(&k)).map(|j| j.root_pid);
        let is_root = |q: &super::Process| q.is_root || job_root == Some(q.pid);
        if is_root(p) {
            if let Some(stage) = stage_of_root(argv)
                && let Some(p) = self.processes.get_mut(&pid)
            {
                p.step = Some(stage);
            }
            return;
        }
        let parent_is_step_root = self
            .processes
            .get(&p.ppid)
            .or_else(|| self.exited.get(&p.ppid))
            .is_some_and(|parent| self.starts_steps(parent));
        if !parent_is_step_root {
            return;
        }
        let index = match (&p.step, p.starts_step) {
            (Some(step), true) => step.index.unwrap_or(0),
            _ => {
                let Some(job) = p.job.and_then(|k| self.jobs.get_mut(&k)) else {
                    return;
                };
                job.steps += 1;
                job.steps
            }
        };
        let step = of_step_process(filename, argv, index);
        let Some(p) = self.processes.get_mut(&pid) else {
            return;
        };
        p.step = Some(match (&p.step, p.starts_step) {
            (Some(previous), true) => on_reexec(previous, step),
            _ => step,
        });
        p.starts_step = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(filename: &str, argv: &[&str]) -> Step {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        of_step_process(filename, &argv, 3)
    }

    #[test]
    fn a_javascript_action_is_named_by_its_folder_under_actions() {
        let s = step(
            "/home/runner/externals/node20/bin/node",
            &[
                "/home/runner/externals/node20/bin/node",
                "/home/runner/_work/_actions/evil-org/changed-files/v45/dist/index.js",
            ],
        );
        assert_eq!(s.kind.as_deref(), Some("action"));
        assert_eq!(s.action.as_deref(), Some("evil-org/changed-files@v45"));
        assert_eq!(s.index, Some(3));
        assert_eq!(s.name, None);
    }

    #[test]
    fn an_action_in_a_subdirectory_names_the_subdirectory() {
        let node = "/usr/bin/node";
        let s = step(
            node,
            &[
                node,
                "/r/_work/_actions/github/codeql-action/v3/init/../lib/init-action.js",
            ],
        );
        assert_eq!(s.action.as_deref(), Some("github/codeql-action/init@v3"));
        let s = step(
            node,
            &[node, "/r/_work/_actions/acme/tools/v1/lint/dist/index.js"],
        );
        assert_eq!(s.action.as_deref(), Some("acme/tools/lint@v1"));
        let s = step(node, &[node, "/r/_work/_actions/acme/tools/main/index.js"]);
        assert_eq!(s.action.as_deref(), Some("acme/tools@main"));
    }

    #[test]
    fn a_docker_action_is_named_by_its_build_context() {
        let s = step(
            "/usr/bin/docker",
            &[
                "docker",
                "build",
                "-t",
                "a1b2c3:d4",
                "-f",
                "/r/_work/_actions/acme/scan/v2/Dockerfile",
                "/r/_work/_actions/acme/scan/v2",
            ],
        );
        assert_eq!(s.action.as_deref(), Some("acme/scan@v2"));
    }

    #[test]
    fn a_run_step_is_named_by_its_script() {
        let s = step(
            "/usr/bin/bash",
            &[
                "/usr/bin/bash",
                "-e",
                "/home/runner/_work/_temp/4b5c3e1f-0a9d.sh",
            ],
        );
        assert_eq!(s.kind.as_deref(), Some("run"));
        assert_eq!(s.name.as_deref(), Some("_temp/4b5c3e1f-0a9d.sh"));
    }

    #[test]
    fn anything_else_is_the_command_cut_to_length() {
        let s = step("/usr/bin/make", &["make", "test"]);
        assert_eq!(s.kind.as_deref(), Some("command"));
        assert_eq!(s.name.as_deref(), Some("make test"));
        let long = "x".repeat(1000);
        let s = step("/bin/echo", &["echo", &long]);
        assert_eq!(s.name.unwrap().chars().count(), MAX_NAME + 1);
    }

    #[test]
    fn a_gitlab_stage_is_named_from_its_script_file() {
        let argv: Vec<String> = ["sh", "-c", "exec bash /scripts-30-1234/step_script 2>&1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = stage_of_root(&argv).unwrap();
        assert_eq!(s.kind.as_deref(), Some("stage"));
        assert_eq!(s.name.as_deref(), Some("step_script"));
        assert!(stage_of_root(&["bash".into(), "--login".into()]).is_none());
    }

    #[test]
    fn a_reexec_names_an_action_but_keeps_the_first_command() {
        let first = step(
            "/usr/bin/setsid",
            &["setsid", "nohup", "bash", "-c", "sleep 4; cat x"],
        );
        let later = step("/usr/bin/cat", &["cat", "x"]);
        assert_eq!(on_reexec(&first, later), first);
        let node = "/usr/bin/node";
        let action = step(node, &[node, "/r/_work/_actions/a/b/v1/index.js"]);
        assert_eq!(on_reexec(&first, action.clone()), action);
        assert_eq!(on_reexec(&action, first), action);
    }

    #[test]
    fn runner_bookkeeping_under_actions_is_not_an_action() {
        assert_eq!(action_of_path("/r/_work/_actions/_temp_1/x.js"), None);
        assert_eq!(
            action_of_path("/r/_work/_actions/acme/tools.completed"),
            None
        );
    }
}
