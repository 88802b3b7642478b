//! Reading and replacing a runner's configuration file: a backup before the first change, the
//! new text written beside it and renamed over it (a runner reading the file sees the old or
//! the new one, never half), with the original's mode and owner. Both files are created
//! owner-only before they get the original's mode: a GitLab `config.toml` holds runner tokens.

use std::{
    fs::{self, File, Metadata, OpenOptions},
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::HookConfigError;

/// A configuration file as found: its text and who owns it.
pub struct Original {
    pub text: String,
    pub metadata: Metadata,
}

fn io_error(action: &'static str, file: &Path) -> impl FnOnce(std::io::Error) -> HookConfigError {
    let file = file.display().to_string();
    move |source| HookConfigError::Io {
        action,
        file,
        source,
    }
}

/// Reads a configuration file; `None` when it does not exist.
pub fn read(path: &Path) -> Result<Option<Original>, HookConfigError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", path)(e)),
    };
    let metadata = fs::metadata(path).map_err(io_error("reading", path))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        HookConfigError::File {
            file: path.display().to_string(),
            reason: format!(
                "line {}: not UTF-8 text",
                before.iter().filter(|b| **b == b'\n').count() + 1
            ),
        }
    })?;
    Ok(Some(Original { text, metadata }))
}

/// Who a new or replaced file belongs to, and its permission bits.
#[derive(Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Ownership {
    pub fn of(metadata: &Metadata) -> Self {
        Self {
            uid: metadata.uid(),
            gid: metadata.gid(),
            mode: metadata.mode() & 0o7777,
        }
    }
}

/// Creates `path` (which must not exist) owner-only, writes it, then gives it `owner`.
fn create_new(path: &Path, contents: &[u8], owner: Ownership) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    let created = file.metadata()?;
    if (created.uid(), created.gid()) != (owner.uid, owner.gid) {
        std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))?;
    }
    file.set_permissions(fs::Permissions::from_mode(owner.mode))?;
    file.sync_all()
}

/// Copies the original beside itself as `NAME.runner-monitor-YYYYMMDDTHHMMSSZ.bak` (a number
/// added if that exists): an earlier backup is never overwritten.
pub fn backup(path: &Path, original: &Original) -> Result<PathBuf, HookConfigError> {
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let name = file_name(path);
    for attempt in 0..100 {
        let suffix = if attempt == 0 {
            String::new()
        } else {
            format!("-{attempt}")
        };
        let backup = path.with_file_name(format!("{name}.runner-monitor-{stamp}{suffix}.bak"));
        match create_new(
            &backup,
            original.text.as_bytes(),
            Ownership::of(&original.metadata),
        ) {
            Ok(()) => return Ok(backup),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                let _ = fs::remove_file(&backup);
                return Err(io_error("writing the backup", &backup)(e));
            }
        }
    }
    Err(HookConfigError::File {
        file: path.display().to_string(),
        reason: "100 backups from this second already exist".to_owned(),
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Replaces `path` with `contents` through a temporary file in the same directory and a rename.
pub fn write_atomically(
    path: &Path,
    contents: &str,
    owner: Ownership,
) -> Result<(), HookConfigError> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let temporary = path.with_file_name(format!(
        ".{}.runner-monitor-{}.tmp",
        file_name(path),
        std::process::id()
    ));
    let written = create_new(&temporary, contents.as_bytes(), owner)
        .and_then(|()| fs::rename(&temporary, path))
        // The rename itself is durable once the directory is.
        .and_then(|()| File::open(directory)?.sync_all());
    written.map_err(|e| {
        let _ = fs::remove_file(&temporary);
        io_error("writing", path)(e)
    })
}

/// The lines that differ between two texts, as `-N: old` / `+N: new` with line numbers of the
/// old and new text: what `--dry-run` shows.
pub fn line_diff(old: &str, new: &str) -> Vec<String> {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    // Longest common subsequence, table from the end. Runner configurations are small: a few
    // hundred lines at most.
    let mut common = vec![vec![0u32; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] = if old[i] == new[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            i += 1;
            j += 1;
        } else if i < old.len() && (j == new.len() || common[i + 1][j] >= common[i][j + 1]) {
            out.push(format!("-{}: {}", i + 1, old[i]));
            i += 1;
        } else {
            out.push(format!("+{}: {}", j + 1, new[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diff_names_only_the_lines_that_changed() {
        assert_eq!(
            line_diff("a\nb\nc\nd\n", "a\nB\nc\nd\ne\n"),
            ["-2: b", "+2: B", "+5: e"]
        );
        assert!(line_diff("same\n", "same\n").is_empty());
    }
}
