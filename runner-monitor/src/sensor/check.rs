//! `runner-monitor check`: what this kernel supports, and the sensor set the agent would use.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use serde::Serialize;

use super::attach::{cgroup2_root, ensure_tracefs};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Support {
    Yes,
    No,
    /// The kernel refused (e.g. EPERM for fentry or BPF LSM).
    Refused,
}

#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub support: Support,
    pub detail: String,
    /// The agent cannot run without it.
    pub required: bool,
}

fn program(name: &'static str, kind: ProgramType, required: bool) -> Feature {
    let (support, detail) = match is_program_supported(kind) {
        Ok(true) => (Support::Yes, "loads".to_owned()),
        Ok(false) => (Support::No, "not supported by this kernel".to_owned()),
        Err(e) => (Support::Refused, super::attach::error_chain(&e)),
    };
    Feature {
        name,
        support,
        detail,
        required,
    }
}

/// Probes the kernel. Loads trivial programs only; attaches nothing.
pub fn probe_kernel() -> Vec<Feature> {
    let mut out = Vec::new();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(Feature {
        name: "btf",
        support: if btf { Support::Yes } else { Support::No },
        detail: if btf {
            "/sys/kernel/btf/vmlinux".into()
        } else {
            "no /sys/kernel/btf/vmlinux (only needed by tp_btf, fentry and LSM extras)".into()
        },
        required: false,
    });
    let ring = is_map_supported(MapType::RingBuf);
    out.push(Feature {
        name: "ring_buffer",
        support: match ring {
            Ok(true) => Support::Yes,
            Ok(false) => Support::No,
            Err(_) => Support::Refused,
        },
        detail: match ring {
            Ok(true) => "BPF_MAP_TYPE_RINGBUF".into(),
            Ok(false) => "needs Linux 5.8".into(),
            Err(e) => e.to_string(),
        },
        required: true,
    });
    let tracefs = ensure_tracefs();
    out.push(Feature {
        name: "tracefs",
        support: if tracefs.is_ok() {
            Support::Yes
        } else {
            Support::No
        },
        detail: match &tracefs {
            Ok(p) => p.display().to_string(),
            Err(e) => e.clone(),
        },
        required: true,
    });
    out.push(program("tracepoint", ProgramType::TracePoint, true));
    out.push(program("raw_tracepoint", ProgramType::RawTracePoint, false));
    // tp_btf needs BTF and raw tracepoints. (aya's probe for ProgramType::Tracing attaches an
    // fentry program, so it answers for fentry, not tp_btf.)
    let raw_tp = out.last().is_some_and(|f| f.support == Support::Yes);
    out.push(Feature {
        name: "tp_btf",
        support: if btf && raw_tp {
            Support::Yes
        } else {
            Support::No
        },
        detail: if btf {
            "BTF present".into()
        } else {
            "needs BTF".into()
        },
        required: false,
    });
    out.push(program("fentry", ProgramType::Tracing, false));
    out.push(program(
        "lsm",
        ProgramType::Lsm(aya::programs::LsmAttachType::Mac),
        false,
    ));
    let kprobe_pmu = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let mut kprobe = program("kprobe", ProgramType::KProbe, false);
    if !kprobe_pmu && kprobe.support == Support::Yes {
        kprobe.support = Support::No;
        kprobe.detail = "program type loads, but the kernel has no kprobe support".into();
    }
    out.push(kprobe);
    out.push(program(
        "cgroup_sock_addr",
        ProgramType::CgroupSockAddr,
        false,
    ));
    out.push(program("cgroup_skb", ProgramType::CgroupSkb, false));
    let cgroup = cgroup2_root();
    out.push(Feature {
        name: "cgroup_v2",
        support: if cgroup.is_some() {
            Support::Yes
        } else {
            Support::No
        },
        detail: cgroup.map_or("no cgroup2 mount (DNS sensor unavailable)".into(), |p| {
            p.display().to_string()
        }),
        required: false,
    });
    out
}
