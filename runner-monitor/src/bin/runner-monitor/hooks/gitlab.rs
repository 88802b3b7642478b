//! GitLab Runner's `config.toml`: every `[[runners]]` entry gets runner-monitor's line in its
//! `pre_build_script` (first) and `post_build_script` (last). GitLab pastes these into the job's
//! shell script, so each is shell text; a multi-line string runs line by line. Edited with
//! `toml_edit`, which keeps comments, order and formatting of everything it is not asked to
//! change.

use toml_edit::{Document, DocumentMut, Item, Table, Value};

use super::{Edit, HookConfigError, Mode};

/// One of runner-monitor's hook lines.
pub struct BuildScriptHook {
    /// `pre_build_script` or `post_build_script`.
    pub key: &'static str,
    /// The line runner-monitor puts in the script.
    pub line: String,
    /// The script's absolute path as it appears in `line`.
    pub script: String,
    /// What any runner-monitor install's path for this script ends with (older installs, or a
    /// line written by hand from docs/jobs.md).
    pub marker: &'static str,
    pub place: Place,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Before the runner's own lines: the job is named before anything else of it runs.
    First,
    /// After the runner's own lines: they still belong to the job.
    Last,
}

impl BuildScriptHook {
    /// The line GitLab's shell runs: sources the script if it is there. In a docker or
    /// kubernetes executor the job shell runs in a container without the script, and there the
    /// line does nothing instead of failing the job.
    pub fn new(key: &'static str, script: String, marker: &'static str, place: Place) -> Self {
        let quoted = shell_quote(&script);
        Self {
            key,
            line: format!("if [ -r {quoted} ]; then . {quoted}; fi"),
            script,
            marker,
            place,
        }
    }

    fn is_ours(&self, line: &str) -> bool {
        line.contains(&self.script) || line.contains(self.marker)
    }

    /// The script with our line where it belongs and any older line of ours gone; `None` when
    /// nothing is left (uninstall of a script that only had our line).
    fn rewrite(&self, script: &str, mode: Mode) -> Option<String> {
        let (body, newline) = match script.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (script, ""),
        };
        let theirs = body
            .split('\n')
            .filter(|l| !(l.is_empty() && body.is_empty()))
            .filter(|l| !self.is_ours(l));
        let lines: Vec<&str> = match (mode, self.place) {
            (Mode::Uninstall, _) => theirs.collect(),
            (Mode::Install, Place::First) => {
                std::iter::once(self.line.as_str()).chain(theirs).collect()
            }
            (Mode::Install, Place::Last) => {
                theirs.chain(std::iter::once(self.line.as_str())).collect()
            }
        };
        (!lines.is_empty()).then(|| lines.join("\n") + newline)
    }
}

/// Quotes a path for the shell when it needs it.
fn shell_quote(path: &str) -> String {
    if path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c))
    {
        path.to_owned()
    } else {
        format!("'{}'", path.replace('\'', r"'\''"))
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Shells whose scripts are not POSIX shell text: runner-monitor's line would be a syntax error.
const NOT_POSIX_SHELLS: &[&str] = &["pwsh", "powershell", "cmd"];

/// Installs or removes runner-monitor's lines in every `[[runners]]` entry of a `config.toml`.
pub fn edit_config(
    file: &str,
    text: &str,
    hooks: &[BuildScriptHook],
    mode: Mode,
) -> Result<Edit, HookConfigError> {
    let parsed = Document::parse(text).map_err(|e| {
        let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
        HookConfigError::Toml {
            file: file.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    let field_error = |span: Option<std::ops::Range<usize>>, field: String, reason: &str| {
        let (line, column) = line_column(text, span.map_or(0, |s| s.start));
        HookConfigError::Field {
            file: file.to_owned(),
            line,
            column,
            field,
            reason: reason.to_owned(),
        }
    };
    // Checked on the parsed document, which still knows where each value is.
    match parsed.get("runners") {
        None if mode == Mode::Uninstall => {
            return Ok(Edit::unchanged(text));
        }
        None => {
            return Err(HookConfigError::File {
                file: file.to_owned(),
                reason: "no [[runners]] entry: register a runner first (gitlab-runner register)"
                    .to_owned(),
            });
        }
        Some(Item::ArrayOfTables(runners)) => {
            for (index, runner) in runners.iter().enumerate() {
                for hook in hooks {
                    match runner.get(hook.key) {
                        None => {}
                        Some(item) if item.is_str() => {}
                        Some(item) => {
                            return Err(field_error(
                                item.span(),
                                format!("runners[{index}].{}", hook.key),
                                "must be a string (shell commands)",
                            ));
                        }
                    }
                }
            }
        }
        Some(item) => {
            return Err(field_error(
                item.span()
                    .or_else(|| parsed.key("runners").and_then(|k| k.span())),
                "runners".to_owned(),
                "must be [[runners]] tables",
            ));
        }
    }
    let mut document: DocumentMut = parsed.into_mut();
    let Some(runners) = document
        .get_mut("runners")
        .and_then(Item::as_array_of_tables_mut)
    else {
        unreachable!("checked above: runners is an array of tables");
    };
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    for (index, runner) in runners.iter_mut().enumerate() {
        let name = match runner.get("name").and_then(Item::as_str) {
            Some(name) => format!("runners[{index}] ({name:?})"),
            None => format!("runners[{index}]"),
        };
        let shell = runner.get("shell").and_then(Item::as_str).unwrap_or("");
        if mode == Mode::Install && NOT_POSIX_SHELLS.contains(&shell) {
            notes.push(format!(
                "{name}: skipped, its shell {shell} does not run POSIX shell scripts"
            ));
            continue;
        }
        for hook in hooks {
            if let Some(change) = edit_runner(runner, hook, mode) {
                changes.push(format!("{name}: {}: {change}", hook.key));
            }
        }
    }
    let edited = document.to_string();
    // A change the summary names must be a change in the text, and the other way round.
    debug_assert_eq!(changes.is_empty(), edited == text);
    Ok(Edit {
        text: edited,
        changes,
        notes,
    })
}

/// `new` as a multi-line literal string if `old` is one and `new` can be one (no `'''`, no
/// control characters but tab and newline).
fn literal_like(old: &Value, new: &str) -> Option<Value> {
    let Value::String(old) = old else {
        return None;
    };
    let raw = old.as_repr()?.as_raw().as_str()?;
    let fits = !new.contains("'''")
        && new
            .chars()
            .all(|c| c == '\n' || c == '\t' || !c.is_control());
    if !(raw.starts_with("'''") && fits) {
        return None;
    }
    format!("'''\n{new}'''").parse().ok()
}

/// Applies one hook to one `[[runners]]` table; says what it changed, if anything.
fn edit_runner(runner: &mut Table, hook: &BuildScriptHook, mode: Mode) -> Option<String> {
    let Some(item) = runner.get_mut(hook.key) else {
        if mode == Mode::Uninstall {
            return None;
        }
        // A new key is indented like the entry's other keys (gitlab-runner writes two spaces).
        let indent = runner
            .iter()
            .filter(|(_, item)| item.is_value())
            .find_map(|(key, _)| runner.key(key)?.leaf_decor().prefix()?.as_str())
            .map(str::to_owned);
        runner.insert(hook.key, toml_edit::value(hook.line.as_str()));
        if let (Some(indent), Some(mut key)) = (indent, runner.key_mut(hook.key)) {
            key.leaf_decor_mut().set_prefix(indent);
        }
        return Some("added".to_owned());
    };
    let Some(value) = item.as_value_mut() else {
        unreachable!("checked before editing: {} is a string", hook.key);
    };
    let old = value.as_str().unwrap_or_default().to_owned();
    let Some(new) = hook.rewrite(&old, mode) else {
        runner.remove(hook.key);
        return Some("removed (only runner-monitor's line was in it)".to_owned());
    };
    if new == old {
        return None;
    }
    // The comment after the value, and the spacing around it, stay; so does a multi-line
    // literal string (three single quotes) where the new text can be one.
    let mut replacement = literal_like(value, &new).unwrap_or_else(|| Value::from(new.as_str()));
    *replacement.decor_mut() = value.decor().clone();
    *value = replacement;
    let older = old.split('\n').any(|l| hook.is_ours(l) && l != hook.line);
    let kept = old
        .split('\n')
        .filter(|l| !l.is_empty() && !hook.is_ours(l))
        .count();
    let kept = match kept {
        1 => "the 1 line".to_owned(),
        n => format!("the {n} lines"),
    };
    Some(match (mode, hook.place) {
        (Mode::Uninstall, _) => format!("removed runner-monitor's line, kept {kept} already there"),
        (Mode::Install, _) if old.split('\n').all(|l| l.is_empty() || hook.is_ours(l)) => {
            "replaced an older runner-monitor line".to_owned()
        }
        (Mode::Install, place) => format!(
            "{}runner-monitor's line runs {} {kept} already there",
            if older {
                "replaced an older line; "
            } else {
                ""
            },
            if place == Place::First {
                "before"
            } else {
                "after"
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks() -> Vec<BuildScriptHook> {
        vec![
            BuildScriptHook::new(
                "pre_build_script",
                "/usr/share/runner-monitor/hooks/gitlab/pre-build.sh".to_owned(),
                "runner-monitor/hooks/gitlab/pre-build.sh",
                Place::First,
            ),
            BuildScriptHook::new(
                "post_build_script",
                "/usr/share/runner-monitor/hooks/gitlab/post-build.sh".to_owned(),
                "runner-monitor/hooks/gitlab/post-build.sh",
                Place::Last,
            ),
        ]
    }

    #[test]
    fn a_hooks_dir_with_a_space_is_quoted_for_the_shell() {
        let hook = BuildScriptHook::new("k", "/opt/my hooks/it's.sh".to_owned(), "x", Place::First);
        assert_eq!(
            hook.line,
            r"if [ -r '/opt/my hooks/it'\''s.sh' ]; then . '/opt/my hooks/it'\''s.sh'; fi"
        );
    }

    #[test]
    fn an_older_runner_monitor_line_is_replaced_and_the_others_keep_their_order() {
        let pre = &hooks()[0];
        let old = "echo one\n. /opt/runner-monitor/hooks/gitlab/pre-build.sh\necho two\n";
        assert_eq!(
            pre.rewrite(old, Mode::Install).unwrap(),
            format!("{}\necho one\necho two\n", pre.line)
        );
        let post = &hooks()[1];
        assert_eq!(
            post.rewrite("echo done", Mode::Install).unwrap(),
            format!("echo done\n{}", post.line)
        );
        assert_eq!(post.rewrite(&post.line, Mode::Uninstall), None);
    }

    #[test]
    fn a_value_that_is_not_a_string_is_refused_with_its_line_and_column() {
        let text = "[[runners]]\n  name = \"a\"\n[[runners]]\n  name = \"b\"\n  pre_build_script = [\"echo\"]\n";
        let err = edit_config("config.toml", text, &hooks(), Mode::Install)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "config.toml:5:22: runners[1].pre_build_script: must be a string (shell commands)"
        );
    }

    #[test]
    fn a_config_without_runners_is_refused_on_install_and_left_alone_on_uninstall() {
        let text = "concurrent = 1\n";
        let err = edit_config("c.toml", text, &hooks(), Mode::Install)
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("c.toml: no [[runners]] entry"),
            "{err}"
        );
        let edit = edit_config("c.toml", text, &hooks(), Mode::Uninstall).unwrap();
        assert_eq!(edit.text, text);
    }

    #[test]
    fn a_powershell_runner_is_skipped_with_a_note() {
        let text = "[[runners]]\n  name = \"win\"\n  shell = \"pwsh\"\n";
        let edit = edit_config("c.toml", text, &hooks(), Mode::Install).unwrap();
        assert_eq!(edit.text, text);
        assert!(edit.notes[0].contains("pwsh"), "{:?}", edit.notes);
    }
}
