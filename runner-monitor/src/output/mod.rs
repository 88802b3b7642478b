//! Where findings and events go. (Metrics and the Alertmanager/webhook sinks build on this.)

pub mod alerts;
