//! A report's steps: derived from the process tree the report records, with the engine's own
//! pure functions (`engine::step`), so a report and a finding name a step alike.

use super::{MAX_STEPS, Record, StepNode};
use crate::{
    engine::step::{of_step_process, on_reexec, stage_of_root},
    event::Event,
};

impl Record {
    /// An exec of a recorded process: a stage named on a root's command line, or the step a
    /// direct child of a root (one not in a named stage) starts or renames.
    pub(super) fn exec_step(&mut self, event: &Event, filename: &str, argv: &[String]) {
        let pid = event.process.pid;
        let Some(&at) = self.process_at.get(&pid) else {
            return;
        };
        if self.roots.contains(&pid) {
            if let Some(stage) = stage_of_root(argv) {
                self.report.processes[at].step = self.add_step(stage, pid, event.time_ns);
            }
            return;
        }
        let ppid = self.report.processes[at].ppid;
        let parent_unnamed = self
            .process_at
            .get(&ppid)
            .is_some_and(|&p| self.report.processes[p].step.is_none());
        if !self.roots.contains(&ppid) || !parent_unnamed {
            return;
        }
        let own = self.report.processes[at]
            .step
            .filter(|&s| self.report.steps.get(s).is_some_and(|s| s.pid == pid));
        match own {
            Some(s) => {
                let node = &mut self.report.steps[s];
                let next = of_step_process(filename, argv, node.step.index.unwrap_or(0));
                node.step = on_reexec(&node.step, next);
            }
            None => {
                let index = self.report.steps.len() as u32 + 1;
                let step = of_step_process(filename, argv, index);
                self.report.processes[at].step = self.add_step(step, pid, event.time_ns);
            }
        }
    }

    /// A new step; `None` when the list is full (counted).
    fn add_step(&mut self, step: crate::engine::Step, pid: u32, start_ns: u64) -> Option<usize> {
        if self.report.steps.len() >= MAX_STEPS {
            self.report.omitted.steps += 1;
            return None;
        }
        self.report.steps.push(StepNode {
            step,
            pid,
            start_ns,
        });
        Some(self.report.steps.len() - 1)
    }
}
