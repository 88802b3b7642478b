//! `runner-monitor hooks install|uninstall`: points a GitHub Actions runner's `.env` and GitLab
//! Runner's `config.toml` at runner-monitor's hook scripts (or takes them out again). Every file
//! is parsed and edited in memory first; nothing is written unless all of them parse. A file
//! that changes is backed up first and replaced atomically; a file that needs no change is not
//! touched (no backup either), so running it twice changes nothing the second time.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

mod files;
mod github;
mod gitlab;

use files::{Original, Ownership};
use github::EnvHook;
use gitlab::{BuildScriptHook, Place};

/// Where the Debian package installs the hook scripts.
pub const DEFAULT_HOOKS_DIR: &str = "/usr/share/runner-monitor/hooks";

#[derive(Subcommand)]
pub enum HooksCommand {
    /// Point runners at runner-monitor's hook scripts: `.env` entries for a GitHub Actions runner,
    /// pre/post_build_script lines in every [[runners]] entry of a GitLab Runner config.toml.
    Install(HooksArgs),
    /// Take runner-monitor's hook entries and lines out again; everything else stays.
    Uninstall(HooksArgs),
}

#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("runners").required(true).multiple(true).args(["github", "gitlab"])
))]
pub struct HooksArgs {
    /// A GitHub Actions runner directory (with `.runner`, `config.sh` or `run.sh`); its `.env`
    /// is edited (created if missing). Repeatable.
    #[arg(long, value_name = "RUNNER_DIR")]
    github: Vec<PathBuf>,
    /// A GitLab Runner config.toml (usually /etc/gitlab-runner/config.toml). Repeatable.
    #[arg(long, value_name = "CONFIG_TOML")]
    gitlab: Vec<PathBuf>,
    /// Where the hook scripts are (github/job-started.sh, gitlab/pre-build.sh, ...).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_HOOKS_DIR)]
    hooks_dir: PathBuf,
    /// Print what would change, as changed lines, and write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Install,
    Uninstall,
}

/// A file's new text and what changed in it, in words.
pub struct Edit {
    pub text: String,
    pub changes: Vec<String>,
    /// What was deliberately left alone, and why.
    pub notes: Vec<String>,
}

impl Edit {
    fn unchanged(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            changes: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Why a runner's configuration was not changed. Messages never quote a configuration value
/// other than runner-monitor's own hook paths: these files hold tokens.
#[derive(Debug, thiserror::Error)]
pub enum HookConfigError {
    #[error("{file}:{line}: {reason}")]
    EnvLine {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{file}:{line}:{column}: not valid TOML: {message}")]
    Toml {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}:{column}: {field}: {reason}")]
    Field {
        file: String,
        line: usize,
        column: usize,
        field: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{action} {file}")]
    Io {
        action: &'static str,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "hook script {0} is missing: install the runner-monitor package, or point --hooks-dir at \
         a directory with github/ and gitlab/ hook scripts (the repository's hooks/)"
    )]
    MissingScript(String),
}

/// One file to change: where, what it was, what it becomes.
struct Target {
    file: PathBuf,
    original: Option<Original>,
    /// Owner and mode for the file if it is created.
    new_owner: Ownership,
    edit: Edit,
    /// Printed after a change: what the runner needs to pick it up.
    after_change: &'static str,
}

pub fn run(command: HooksCommand) -> anyhow::Result<()> {
    let (mode, args) = match command {
        HooksCommand::Install(args) => (Mode::Install, args),
        HooksCommand::Uninstall(args) => (Mode::Uninstall, args),
    };
    let hooks_dir = hooks_dir(&args, mode)?;
    // Everything parsed and edited first: one broken file and nothing is written.
    let mut targets = Vec::new();
    for runner_dir in &args.github {
        targets.push(github_target(runner_dir, &hooks_dir, mode)?);
    }
    for config in &args.gitlab {
        targets.push(gitlab_target(config, &hooks_dir, mode)?);
    }
    for target in &targets {
        apply(target, args.dry_run)?;
    }
    Ok(())
}

/// The hooks directory as an absolute path (the runner runs the scripts from its own working
/// directory), with the scripts the requested runners need checked when installing.
fn hooks_dir(args: &HooksArgs, mode: Mode) -> Result<String, HookConfigError> {
    let dir = match std::fs::canonicalize(&args.hooks_dir) {
        Ok(dir) => dir,
        Err(_) if mode == Mode::Uninstall => {
            std::path::absolute(&args.hooks_dir).map_err(|e| HookConfigError::Io {
                action: "resolving",
                file: args.hooks_dir.display().to_string(),
                source: e,
            })?
        }
        Err(_) => {
            return Err(HookConfigError::MissingScript(
                args.hooks_dir.display().to_string(),
            ));
        }
    };
    let Some(dir) = dir.to_str().filter(|d| !d.contains('\n')) else {
        return Err(HookConfigError::File {
            file: dir.display().to_string(),
            reason: "a hooks directory must be a UTF-8 path without newlines".to_owned(),
        });
    };
    if mode == Mode::Install {
        let needed = [
            (!args.github.is_empty(), "github/job-started.sh"),
            (!args.github.is_empty(), "github/job-completed.sh"),
            (!args.gitlab.is_empty(), "gitlab/pre-build.sh"),
            (!args.gitlab.is_empty(), "gitlab/post-build.sh"),
        ];
        for (_, script) in needed.iter().filter(|(needed, _)| *needed) {
            let path = Path::new(dir).join(script);
            if !path.is_file() {
                return Err(HookConfigError::MissingScript(path.display().to_string()));
            }
        }
    }
    Ok(dir.to_owned())
}

/// The file to edit: through a symlink to what it points at, so the link stays a link.
fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

fn github_target(
    runner_dir: &Path,
    hooks_dir: &str,
    mode: Mode,
) -> Result<Target, HookConfigError> {
    let shown = runner_dir.display().to_string();
    let metadata = std::fs::metadata(runner_dir).map_err(|source| HookConfigError::Io {
        action: "reading the runner directory",
        file: shown.clone(),
        source,
    })?;
    let is_runner = metadata.is_dir()
        && [".runner", "config.sh", "run.sh"]
            .iter()
            .any(|f| runner_dir.join(f).exists());
    if !is_runner {
        return Err(HookConfigError::File {
            file: shown,
            reason: "not a GitHub Actions runner directory (no .runner, config.sh or run.sh)"
                .to_owned(),
        });
    }
    let file = resolve(&runner_dir.join(".env"));
    let original = files::read(&file)?;
    let hooks = [
        EnvHook {
            key: github::JOB_STARTED,
            script: format!("{hooks_dir}/github/job-started.sh"),
            marker: "runner-monitor/hooks/github/job-started.sh",
        },
        EnvHook {
            key: github::JOB_COMPLETED,
            script: format!("{hooks_dir}/github/job-completed.sh"),
            marker: "runner-monitor/hooks/github/job-completed.sh",
        },
    ];
    let text = original.as_ref().map_or("", |o| o.text.as_str());
    let edit = github::edit_env(&file.display().to_string(), text, &hooks, mode)?;
    Ok(Target {
        file,
        original,
        // A new .env belongs to whoever owns the runner: the runner user reads it.
        new_owner: Ownership {
            mode: 0o644,
            ..Ownership::of(&metadata)
        },
        edit,
        after_change: "restart the runner (./svc.sh stop && ./svc.sh start) so that it reads .env \
                       again",
    })
}

fn gitlab_target(config: &Path, hooks_dir: &str, mode: Mode) -> Result<Target, HookConfigError> {
    let file = resolve(config);
    let Some(original) = files::read(&file)? else {
        return Err(HookConfigError::File {
            file: config.display().to_string(),
            reason: "no such file (the GitLab Runner config.toml)".to_owned(),
        });
    };
    let hooks = [
        BuildScriptHook::new(
            "pre_build_script",
            format!("{hooks_dir}/gitlab/pre-build.sh"),
            "runner-monitor/hooks/gitlab/pre-build.sh",
            Place::First,
        ),
        BuildScriptHook::new(
            "post_build_script",
            format!("{hooks_dir}/gitlab/post-build.sh"),
            "runner-monitor/hooks/gitlab/post-build.sh",
            Place::Last,
        ),
    ];
    let edit = gitlab::edit_config(&file.display().to_string(), &original.text, &hooks, mode)?;
    Ok(Target {
        file,
        new_owner: Ownership::of(&original.metadata),
        original: Some(original),
        edit,
        after_change: "GitLab Runner reloads config.toml by itself",
    })
}

fn apply(target: &Target, dry_run: bool) -> Result<(), HookConfigError> {
    let file = target.file.display();
    let edit = &target.edit;
    let old = target.original.as_ref().map_or("", |o| o.text.as_str());
    if edit.changes.is_empty() {
        println!("{file}: nothing to change");
    } else {
        let verb = if dry_run { "would change" } else { "changed" };
        println!("{file}: {verb}:");
        for change in &edit.changes {
            println!("  {change}");
        }
    }
    for note in &edit.notes {
        println!("  note: {note}");
    }
    if edit.changes.is_empty() {
        return Ok(());
    }
    if dry_run {
        for line in files::line_diff(old, &edit.text) {
            println!("    {line}");
        }
        return Ok(());
    }
    let owner = match &target.original {
        Some(original) => {
            let backup = files::backup(&target.file, original)?;
            println!("  backup: {}", backup.display());
            Ownership::of(&original.metadata)
        }
        None => target.new_owner,
    };
    files::write_atomically(&target.file, &edit.text, owner)?;
    println!("  {}", target.after_change);
    Ok(())
}
