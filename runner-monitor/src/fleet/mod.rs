//! The fleet: what agents publish to the fleet's NATS JetStream stream and what the fleet
//! correlator (`runner-monitor fleet`) consumes. `message` is the wire contract both sides share;
//! `ledger` is the correlator's pure core (fingerprints in, cross-host findings out), `keys`
//! which fingerprint key ids it accepts, `metrics` what it exports.

pub mod keys;
pub mod ledger;
pub mod message;
pub mod metrics;
