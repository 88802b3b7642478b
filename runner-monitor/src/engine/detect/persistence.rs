//! Persistence by proxy: a job that cannot outlive itself plants work for something that will (a
//! cron entry, a systemd unit, `/etc/ld.so.preload`, another user's profile, the runner's own
//! files, ...). A job process creating or changing such a path, renaming or linking a file onto
//! it, or making a symlink there (`ln -s /tmp/x /etc/ld.so.preload`), is `persistence-planted`.

use runner_monitor_common::LINK_SYMBOLIC;

use super::Engine;
use crate::{
    engine::finding::{Finding, Mitre, PersistenceRef},
    event::{Event, EventDetail, FileAccess},
    policy::technique_name,
    rule::{RuleId, Severity},
};

/// A file event of a job process: a planted persistence path, if it is one.
pub(super) fn file_event(engine: &Engine, event: &Event, f: &FileAccess, out: &mut Vec<Finding>) {
    if event.job.is_none() || f.result < 0 {
        return;
    }
    let (path, how) = match &event.detail {
        // A read is what cron and systemd do; planting is writing.
        EventDetail::FileOpen(_) if f.write => (f.path.as_str(), "created or changed"),
        EventDetail::FileRename(_) => match &f.new_path {
            Some(new) => (new.as_str(), "renamed a file onto"),
            None => return,
        },
        EventDetail::FileLink(_) => match &f.new_path {
            Some(new) if f.flags & LINK_SYMBOLIC != 0 => (new.as_str(), "made a symlink at"),
            Some(new) => (new.as_str(), "linked a file onto"),
            None => return,
        },
        _ => return,
    };
    let Some(kind) = engine.policy.persistence_of(path) else {
        return;
    };
    if !kind.applies_to(path, event.process.uid) {
        return;
    }
    let whose = if kind.runner {
        "the runner's own file"
    } else {
        "persistence path"
    };
    let mut finding = engine.raise(
        RuleId::PersistencePlanted,
        event,
        format!(
            "{how} {whose} {path} ({}){}",
            kind.kind,
            after_end(engine, event)
        ),
    );
    // `raise` names the step that did it (`finding.step`), like every finding of a job process.
    if kind.runner {
        finding.severity = Severity::Critical;
    }
    finding.mitre = Mitre {
        id: kind.technique.clone(),
        name: technique_name(&kind.technique)
            .unwrap_or_default()
            .to_owned(),
    };
    finding.persistence = Some(PersistenceRef {
        path: path.to_owned(),
        kind: kind.kind.clone(),
        how: how.to_owned(),
    });
    out.push(finding);
}

/// " 3 s after the job ended" for a survivor's plant; empty inside the job.
fn after_end(engine: &Engine, event: &Event) -> String {
    if super::is_ended(event) {
        format!(", {}", engine.after_end_text(event))
    } else {
        String::new()
    }
}
