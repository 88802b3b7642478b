//! runner-monitor: an eBPF runtime monitor for CI runner hosts.
//!
//! Data flows one way: `sensor` (kernel programs, ring buffer, decoding) produces `event`s; the
//! job, engine and output layers consume them. `policy` is read by all.

pub mod attest;
pub mod baseline;
pub mod bounded;
pub mod cgroups;
pub mod clock;
pub mod docker_api;
pub mod engine;
pub mod enrich;
pub mod event;
pub mod fleet;
pub mod identity;
pub mod job;
pub mod jsonl;
pub mod mounts;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod privilege;
pub mod report;
pub mod rule;
pub mod sensor;
pub mod state;
#[cfg(test)]
mod test_log;
