//! The GitHub Actions runner's `.env`: `KEY=VALUE` lines the runner sets in its own environment
//! at start (`Runner.Listener`'s `LoadAndSetEnv`), which is where the runner reads
//! `ACTIONS_RUNNER_HOOK_JOB_STARTED` / `_COMPLETED` from. The runner splits each line at its
//! first `=` and takes both halves as they are, so every other line is kept byte for byte.

use super::{Edit, HookConfigError, Mode};

pub const JOB_STARTED: &str = "ACTIONS_RUNNER_HOOK_JOB_STARTED";
pub const JOB_COMPLETED: &str = "ACTIONS_RUNNER_HOOK_JOB_COMPLETED";

/// One of runner-monitor's hooks: the `.env` key and the script it names.
pub struct EnvHook {
    pub key: &'static str,
    /// The script's absolute path.
    pub script: String,
    /// What any runner-monitor install's path for this script ends with (an older install may
    /// have used another hooks directory).
    pub marker: &'static str,
}

impl EnvHook {
    fn is_ours(&self, value: &str) -> bool {
        value == self.script || value.ends_with(self.marker)
    }
}

enum Line<'a> {
    /// Blank, a comment, or a `KEY=VALUE` for a key that is not ours.
    Kept,
    Entry {
        key: &'a str,
        value: &'a str,
    },
}

/// Classifies one line (without its line ending). Errors never quote the line: a `.env` can
/// hold secrets.
fn classify<'a>(file: &str, number: usize, line: &'a str) -> Result<Line<'a>, HookConfigError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Line::Kept);
    }
    let Some((key, value)) = line.split_once('=') else {
        return Err(HookConfigError::EnvLine {
            file: file.to_owned(),
            line: number,
            reason: "not a KEY=VALUE line, a comment or a blank line".to_owned(),
        });
    };
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(HookConfigError::EnvLine {
            file: file.to_owned(),
            line: number,
            reason: format!(
                "{key:?} is not a variable name (the runner would set a variable with exactly \
                 that name: no spaces, no `export`)"
            ),
        });
    }
    Ok(Line::Entry { key, value })
}

/// Installs or removes runner-monitor's hook entries in the text of a `.env`.
pub fn edit_env(
    file: &str,
    text: &str,
    hooks: &[EnvHook],
    mode: Mode,
) -> Result<Edit, HookConfigError> {
    let mut out = String::with_capacity(text.len() + 256);
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let mut present = vec![false; hooks.len()];
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let content = raw.strip_suffix('\n').unwrap_or(raw);
        let ending = &raw[content.len()..];
        // The runner reads lines as .NET's ReadAllLines does: `\r\n` ends a line too.
        let (content, ending) = match content.strip_suffix('\r') {
            Some(c) => (c, &raw[c.len()..]),
            None => (content, ending),
        };
        let number = index + 1;
        let Line::Entry { key, value } = classify(file, number, content)? else {
            out.push_str(raw);
            continue;
        };
        let Some(at) = hooks.iter().position(|h| h.key == key) else {
            out.push_str(raw);
            continue;
        };
        let hook = &hooks[at];
        present[at] = true;
        match mode {
            Mode::Install if value == hook.script => out.push_str(raw),
            Mode::Install => {
                out.push_str(&format!("{key}={}{ending}", hook.script));
                changes.push(format!(
                    "line {number}: {key} was {value:?}, now {:?}{}",
                    hook.script,
                    if hook.is_ours(value) {
                        ""
                    } else {
                        " (the hook it named no longer runs; the backup keeps the line)"
                    }
                ));
            }
            Mode::Uninstall if hook.is_ours(value) => {
                changes.push(format!("line {number}: removed {key}={value}"));
            }
            Mode::Uninstall => {
                out.push_str(raw);
                notes.push(format!(
                    "line {number}: kept {key}: it names {value:?}, not runner-monitor's hook"
                ));
            }
        }
    }
    if mode == Mode::Install {
        for (hook, _) in hooks.iter().zip(&present).filter(|(_, p)| !**p) {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("{}={}\n", hook.key, hook.script));
            changes.push(format!("added {}={}", hook.key, hook.script));
        }
    }
    Ok(Edit {
        text: out,
        changes,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(dir: &str) -> Vec<EnvHook> {
        vec![
            EnvHook {
                key: JOB_STARTED,
                script: format!("{dir}/github/job-started.sh"),
                marker: "runner-monitor/hooks/github/job-started.sh",
            },
            EnvHook {
                key: JOB_COMPLETED,
                script: format!("{dir}/github/job-completed.sh"),
                marker: "runner-monitor/hooks/github/job-completed.sh",
            },
        ]
    }

    const DIR: &str = "/usr/share/runner-monitor/hooks";

    #[test]
    fn missing_keys_are_appended_after_a_last_line_without_newline() {
        let edit = edit_env(".env", "LANG=C.UTF-8\n# c\nX=1", &hooks(DIR), Mode::Install).unwrap();
        assert_eq!(
            edit.text,
            "LANG=C.UTF-8\n# c\nX=1\n\
             ACTIONS_RUNNER_HOOK_JOB_STARTED=/usr/share/runner-monitor/hooks/github/job-started.sh\n\
             ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/usr/share/runner-monitor/hooks/github/job-completed.sh\n"
        );
        assert_eq!(edit.changes.len(), 2);
    }

    #[test]
    fn a_key_pointing_elsewhere_is_replaced_in_place_keeping_its_crlf_and_said_so() {
        let text = "A=1\r\nACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/mine.sh\r\nB=2\r\n";
        let edit = edit_env(".env", text, &hooks(DIR), Mode::Install).unwrap();
        assert!(edit.text.starts_with(
            "A=1\r\nACTIONS_RUNNER_HOOK_JOB_STARTED=/usr/share/runner-monitor/hooks/github/job-started.sh\r\nB=2\r\n"
        ));
        assert!(
            edit.changes[0].contains("was \"/opt/mine.sh\"")
                && edit.changes[0].contains("no longer runs"),
            "{:?}",
            edit.changes
        );
    }

    #[test]
    fn uninstall_keeps_a_hook_that_is_not_ours() {
        let text = "ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/mine.sh\n\
                    ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/runner-monitor/hooks/github/job-completed.sh\n";
        let edit = edit_env(".env", text, &hooks(DIR), Mode::Uninstall).unwrap();
        assert_eq!(edit.text, "ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/mine.sh\n");
        assert_eq!(edit.notes.len(), 1);
    }

    #[test]
    fn export_lines_and_bare_words_are_refused_naming_the_line_without_quoting_its_value() {
        let err = edit_env(".env", "A=1\nexport B=secret\n", &hooks(DIR), Mode::Install)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(".env:2: \"export B\" is not a variable name"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        let err = edit_env(".env", "A=1\n\nhunter2\n", &hooks(DIR), Mode::Install)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            ".env:3: not a KEY=VALUE line, a comment or a blank line"
        );
    }
}
