//! runner-monitor: an eBPF runtime monitor for CI runner hosts.
//!
//! Data flows one way: `sensor` (kernel programs, ring buffer, decoding) produces `event`s; the
//! job, engine and output layers consume them. `policy` is read by all.

pub mod engine;
pub mod event;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod rule;
pub mod sensor;
