//! Names of the kernel maps the agent opens.

pub const EVENTS: &str = "EVENTS";
pub const COUNTERS: &str = "COUNTERS";
pub const PROCESSES: &str = "PROCESSES";
pub const JOBS: &str = "JOBS";
pub const CONTAINER_CGROUPS: &str = "CONTAINER_CGROUPS";
pub const REQUESTED_CONTAINERS: &str = "REQUESTED_CONTAINERS";
pub const UNIX_CONNS: &str = "UNIX_CONNS";
pub const RUNTIME_TGIDS: &str = "RUNTIME_TGIDS";
pub const PENDING_STARTS: &str = "PENDING_STARTS";
pub const CONTAINER_IDS: &str = "CONTAINER_IDS";
pub const EXEC_TARGETS: &str = "EXEC_TARGETS";
pub const BUILDS: &str = "BUILDS";
pub const NAMES: &str = "NAMES";
pub const FILE_NAMES: &str = "FILE_NAMES";
pub const SETTINGS: &str = "SETTINGS";
pub const JOB_BUDGETS: &str = "JOB_BUDGETS";
pub const ENV_PREFIXES: &str = "ENV_PREFIXES";
pub const EGRESS_JOBS: &str = "EGRESS_JOBS";
pub const EGRESS_ALLOW4: &str = "EGRESS_ALLOW4";
pub const EGRESS_ALLOW6: &str = "EGRESS_ALLOW6";
pub const EGRESS_METADATA: &str = "EGRESS_METADATA";
pub const DNS_PORTS: &str = "DNS_PORTS";
pub const TLS_NAMES: &str = "TLS_NAMES";
pub const TLS_SOCKETS: &str = "TLS_SOCKETS";
pub const TLS_WATCHES: &str = "TLS_WATCHES";
