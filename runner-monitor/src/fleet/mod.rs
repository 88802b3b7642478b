//! The fleet: what agents publish to the fleet's NATS JetStream stream and what the fleet
//! correlator (`runner-monitor fleet`) consumes. `message` is the wire contract both sides share.

pub mod message;
