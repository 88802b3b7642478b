//! Empty library target: lets the agent name this crate as a build dependency (so cargo rebuilds
//! the agent when the kernel programs change); the programs themselves are the binary.
#![no_std]
