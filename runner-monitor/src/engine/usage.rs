//! What a job used, as the engine judged it: the connections it made (with the names it resolved
//! them from), the secret sockets it opened, the credential kinds it read or wrote. A learned
//! baseline is made of these (`crate::baseline`), and `baseline-deviation` compares them with it.

use std::net::IpAddr;

use crate::event::JobKey;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Used {
    /// A connection out. `names`: what the job resolved the address from, the first one the name
    /// findings show.
    Egress {
        ip: IpAddr,
        port: u16,
        names: Vec<String>,
    },
    /// A connection to a secret socket.
    SecretSocket { kind: String, path: String },
    /// A credential read or written (successfully; the runner's own credentials never count).
    Credential { kind: String, path: String },
}

impl Used {
    /// What a baseline is about: a destination (`name:port`, or `ip:port` without a name), a
    /// secret socket kind, a credential kind. One `baseline-deviation` per job and object.
    pub fn object(&self) -> String {
        match self {
            Used::Egress { ip, port, names } => match names.first() {
                Some(name) => format!("egress {name}:{port}"),
                None => format!("egress {ip}:{port}"),
            },
            Used::SecretSocket { kind, .. } => format!("secret socket {kind}"),
            Used::Credential { kind, .. } => format!("credential {kind}"),
        }
    }
}

/// One use by one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub job: JobKey,
    pub used: Used,
}
