//! `[egress] mode` and a rule's `mode` / `metadata`: which jobs block mode refuses egress for,
//! and the plan the kernel enforces for one job (`EgressPlan`, compiled into its maps by
//! `sensor::egress`).

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::{Destination, JobSelector, Policy, PolicyError, Source, file};

/// What happens to a connection outside a job's allowlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Reported (`unexpected-egress`), not refused: the default.
    #[default]
    Audit,
    /// Refused in the kernel with EPERM, and reported with `"blocked": true`.
    Block,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Audit => "audit",
            EgressMode::Block => "block",
        }
    }
}

/// `[egress] on_agent_failure`: what a crashed agent leaves behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentFailure {
    /// A job's egress is not judged (and its DNS not redirected) once the agent has been gone
    /// for `AGENT_STALE_SECONDS`: jobs keep working, unwatched.
    #[default]
    Open,
    /// A job's egress is refused (loopback aside) once the agent has been gone for
    /// `AGENT_STALE_SECONDS`, until an agent is back: jobs fail rather than go unwatched.
    Closed,
}

/// `[egress]` beside the allowlist.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EgressSettings {
    pub mode: EgressMode,
    pub on_agent_failure: AgentFailure,
    /// `dns_upstream`: where the agent's resolver forwards the queries of jobs in block mode;
    /// empty: the nameservers of /etc/resolv.conf when the agent starts.
    pub dns_upstream: Vec<std::net::SocketAddr>,
}

/// What the kernel enforces for one job (or, as the global plan, for jobs without one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPlan {
    pub block: bool,
    /// The job may reach the metadata endpoints.
    pub metadata: bool,
    /// Allowed networks with their ports (empty: every port).
    pub nets: Vec<(IpNet, Vec<u16>)>,
    /// Allowed DNS names (`*.` wildcards) with their ports: the agent's resolver admits the
    /// addresses the job resolves for them (`sensor::resolver`).
    pub names: Vec<(String, Vec<u16>)>,
    /// A rule says `sni = true`: TLS must name a server in `names` (checked in the kernel).
    pub sni: bool,
}

impl EgressPlan {
    /// The ports `name` is allowed on (an empty list: every port), if it is allowed at all.
    pub fn name_ports(&self, name: &str) -> Option<Vec<u16>> {
        let mut ports = Vec::new();
        let mut any = false;
        for (pattern, p) in &self.names {
            if !super::name_matches(pattern, name) {
                continue;
            }
            if p.is_empty() {
                return Some(Vec::new());
            }
            any = true;
            ports.extend(p);
        }
        ports.sort_unstable();
        ports.dedup();
        any.then_some(ports)
    }

    /// Whether block mode's resolver may ask `server`, the DNS server a job process addressed,
    /// instead of the agent's upstream: an address the plan's own networks admit on that port
    /// (a cluster's DNS service, `{ cidr = "10.96.0.10", ports = [53] }`). Never loopback or
    /// the unspecified address: a job could run a server there that answers what it likes for
    /// an allowed name, and the answer would be admitted.
    pub fn asks_dns(&self, server: std::net::SocketAddr) -> bool {
        let ip = server.ip().to_canonical();
        !ip.is_loopback()
            && !ip.is_unspecified()
            && server.port() != 0
            && self.nets_admit(ip, server.port())
    }

    /// Whether the plan's own networks admit `ip` on `port` (0: on every port).
    pub fn nets_admit(&self, ip: std::net::IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|(net, ports)| {
            net.contains(&ip) && (ports.is_empty() || (port != 0 && ports.contains(&port)))
        })
    }
}

/// `audit` or `block`, `field` naming it in errors.
pub(super) fn mode(
    value: &Spanned<String>,
    field: &str,
    src: &Source<'_>,
) -> Result<EgressMode, PolicyError> {
    match value.get_ref().as_str() {
        "audit" => Ok(EgressMode::Audit),
        "block" => Ok(EgressMode::Block),
        other => Err(src.error(
            value.span(),
            field,
            format!("`audit` or `block`, not {other:?}"),
        )),
    }
}

/// A rule's `sni`, `at` naming the rule in errors: `true` needs DNS names in the rule's
/// allowlist (the names server names are checked against).
pub(super) fn sni(
    value: Option<&Spanned<bool>>,
    allow_egress: &[super::AllowedDestination],
    at: &str,
    src: &Source<'_>,
) -> Result<bool, PolicyError> {
    let Some(value) = value else {
        return Ok(false);
    };
    let names = allow_egress
        .iter()
        .any(|a| matches!(a.destination, Destination::Name(_)));
    if *value.get_ref() && !names {
        return Err(src.error(
            value.span(),
            &format!("{at}.sni"),
            "`sni = true` checks TLS server names against the DNS names of this rule's \
             `allow_egress`, and it has none: every TLS connection of these jobs would be refused \
             (block mode) or reported (audit mode)",
        ));
    }
    Ok(*value.get_ref())
}

/// `[egress] mode` and `on_agent_failure`.
pub(super) fn compile(
    section: &file::EgressSection,
    src: &Source<'_>,
) -> Result<EgressSettings, PolicyError> {
    let mut settings = EgressSettings::default();
    if let Some(m) = &section.mode {
        settings.mode = mode(m, "egress.mode", src)?;
    }
    if let Some(f) = &section.on_agent_failure {
        settings.on_agent_failure = match f.get_ref().as_str() {
            "open" => AgentFailure::Open,
            "closed" => AgentFailure::Closed,
            other => {
                return Err(src.error(
                    f.span(),
                    "egress.on_agent_failure",
                    format!("`open` or `closed`, not {other:?}"),
                ));
            }
        };
    }
    for (i, upstream) in section.dns_upstream.iter().enumerate() {
        let text = upstream.get_ref();
        let parsed = text
            .parse::<std::net::SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| (ip, 53).into()));
        match parsed {
            Ok(addr) => settings.dns_upstream.push(addr),
            Err(_) => {
                return Err(src.error(
                    upstream.span(),
                    &format!("egress.dns_upstream[{i}]"),
                    format!("an IP address with an optional port (`10.0.0.2:53`), not {text:?}"),
                ));
            }
        }
    }
    Ok(settings)
}

fn names_of(list: &[super::AllowedDestination]) -> impl Iterator<Item = (String, Vec<u16>)> + '_ {
    list.iter().filter_map(|a| match &a.destination {
        Destination::Name(name) => Some((name.clone(), a.ports.clone())),
        Destination::Net(_) => None,
    })
}

fn nets_of(list: &[super::AllowedDestination]) -> impl Iterator<Item = (IpNet, Vec<u16>)> + '_ {
    list.iter().filter_map(|a| match &a.destination {
        Destination::Net(net) => Some((*net, a.ports.clone())),
        Destination::Name(_) => None,
    })
}

impl Policy {
    /// A job's egress mode: that of the last rule selecting it that sets one, else `[egress]`'s.
    pub fn egress_mode_for(&self, job: JobSelector<'_>) -> EgressMode {
        self.rules_for(job)
            .filter_map(|r| r.mode)
            .last()
            .unwrap_or(self.egress.mode)
    }

    /// How many rules put their jobs in block mode.
    pub fn blocking_rules(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.mode == Some(EgressMode::Block))
            .count()
    }

    /// Whether anything is in block mode: `[egress] mode` or a rule.
    pub fn wants_block(&self) -> bool {
        self.egress.mode == EgressMode::Block || self.blocking_rules() > 0
    }

    /// Whether a rule checks TLS server names (`sni = true`).
    pub fn checks_sni(&self) -> bool {
        self.rules.iter().any(|r| r.sni)
    }

    /// Whether a rule selecting the job entitles it to the cloud metadata endpoints.
    pub fn metadata_entitled(&self, job: JobSelector<'_>) -> bool {
        self.rules_for(job).any(|r| r.metadata)
    }

    /// What the kernel enforces for jobs it has no plan of their own for: `[egress]` alone.
    pub fn global_egress_plan(&self) -> EgressPlan {
        EgressPlan {
            block: self.egress.mode == EgressMode::Block,
            metadata: false,
            nets: nets_of(&self.egress_allow).collect(),
            names: names_of(&self.egress_allow).collect(),
            sni: false,
        }
    }

    /// What the kernel enforces for a job: its mode, its metadata entitlement, and the global
    /// and its rules' allowed networks.
    pub fn egress_plan(&self, job: JobSelector<'_>) -> EgressPlan {
        let mut nets: Vec<(IpNet, Vec<u16>)> = nets_of(&self.egress_allow).collect();
        let mut names: Vec<(String, Vec<u16>)> = names_of(&self.egress_allow).collect();
        for rule in self.rules_for(job) {
            nets.extend(nets_of(&rule.allow_egress));
            names.extend(names_of(&rule.allow_egress));
        }
        EgressPlan {
            block: self.egress_mode_for(job) == EgressMode::Block,
            metadata: self.metadata_entitled(job),
            nets,
            names,
            sni: self.rules_for(job).any(|r| r.sni),
        }
    }
}

/// The address a connection to `ip` reaches, as the kernel's egress check sees it: an
/// IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) address is the IPv4 address.
pub fn egress_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mapped = o[..10].iter().all(|b| *b == 0) && o[10] == 0xff && o[11] == 0xff;
            let nat64 = o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];
            if mapped || nat64 {
                IpAddr::from([o[12], o[13], o[14], o[15]])
            } else {
                ip
            }
        }
        v4 => v4,
    }
}
