//! Path normalisation and working-directory following (`sensor::paths`), driven by a script of
//! the steps the decoder feeds it, one per line (the seeds are readable):
//!
//!     fork PARENT CHILD        exit PID
//!     chdir PID PATH           fchdir PID FD
//!     open PID PATH            openat PID DIRFD PATH
//!     join BASE<TAB>PATH
//!
//! checked against a model of the working directories.
//!
//! Properties: a normalised path is absolute, has no `.`, `..`, empty or trailing components
//! (so no `/../`), is never longer than its input plus the leading `/`, and normalising it again
//! changes nothing; resolving follows exactly the working directories the model expects (there is
//! no `/proc` here, so only what the steps said); an unresolved path is reported exactly as given.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use runner_monitor::sensor::paths::{WorkingDirectories, join, normalize};
use runner_monitor_common::AT_FDCWD;

fn assert_normal(path: &str, input: &str) {
    assert!(path.starts_with('/'), "{input:?} -> {path:?}");
    if path != "/" {
        for part in path.split('/').skip(1) {
            assert!(!matches!(part, "" | "." | ".."), "{input:?} -> {path:?}");
        }
    }
    assert_eq!(normalize(path), path, "normalising {path:?} again");
}

fuzz_target!(|script: &[u8]| {
    let script = String::from_utf8_lossy(script);
    let mut dirs = WorkingDirectories::with_proc_root("/nonexistent");
    let mut model: HashMap<u32, String> = HashMap::new();
    for line in script.lines() {
        let mut words = line.splitn(2, ' ');
        let (Some(op), rest) = (words.next(), words.next().unwrap_or("")) else {
            continue;
        };
        let mut args = rest.splitn(2, ' ');
        let mut number = || args.next().and_then(|a| a.parse::<u32>().ok());
        match op {
            "fork" => {
                let (Some(parent), Some(child)) = (number(), number()) else {
                    continue;
                };
                dirs.fork(parent, child);
                if let Some(cwd) = model.get(&parent).cloned() {
                    model.insert(child, cwd);
                }
            }
            "exit" => {
                let Some(pid) = number() else { continue };
                dirs.exit(pid);
                model.remove(&pid);
            }
            "chdir" | "fchdir" => {
                let Some(pid) = number() else { continue };
                let (fd, path) = if op == "fchdir" {
                    let Some(fd) = number() else { continue };
                    (fd.min(i32::MAX as u32) as i32, String::new())
                } else {
                    (-1, args.next().unwrap_or("").to_owned())
                };
                let got = dirs.chdir(pid, fd, &path);
                let expected = if fd >= 0 {
                    None // fchdir needs /proc, which is not there
                } else if path.starts_with('/') {
                    Some(normalize(&path))
                } else {
                    model.get(&pid).map(|cwd| join(cwd, &path))
                };
                assert_eq!(got, expected, "{line:?}");
                match got {
                    Some(dir) => {
                        assert_normal(&dir, &path);
                        model.insert(pid, dir);
                    }
                    None => {
                        model.remove(&pid);
                    }
                }
            }
            "open" | "openat" => {
                let Some(pid) = number() else { continue };
                let dirfd = if op == "openat" {
                    let Some(fd) = number() else { continue };
                    fd.min(i32::MAX as u32) as i32
                } else {
                    AT_FDCWD
                };
                let path = args.next().unwrap_or("");
                let (got, resolved) = dirs.resolve(pid, dirfd, path);
                if resolved {
                    assert_normal(&got, path);
                }
                if path.starts_with('/') {
                    assert_eq!((got.as_str(), resolved), (normalize(path).as_str(), true));
                    assert!(got.len() <= path.len(), "{path:?} -> {got:?}");
                } else if let (AT_FDCWD, Some(cwd)) = (dirfd, model.get(&pid)) {
                    assert_eq!((got, resolved), (join(cwd, path), true), "{line:?}");
                } else {
                    assert_eq!((got.as_str(), resolved), (path, false), "{line:?}");
                }
            }
            "join" => {
                let (base, path) = rest.split_once('\t').unwrap_or((rest, ""));
                let joined = join(base, path);
                assert_normal(&joined, path);
                assert!(
                    joined.len() <= base.len() + path.len() + 2,
                    "{base:?} + {path:?}"
                );
            }
            _ => {}
        }
    }
});
