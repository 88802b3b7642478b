//! The kubelet's cgroup layout: which pod and container a cgroup (v2 path) is, from its path
//! alone (docs/containers.md, "Kubernetes").
//!
//! - cgroupfs driver: `/kubepods[/besteffort|/burstable]/pod<uid>/<64-hex container id>`
//!   (containerd names the container's cgroup by its id; CRI-O `crio-<id>`).
//! - systemd driver: `/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _
//!   for ->.slice/cri-containerd-<id>.scope` (CRI-O `crio-<id>.scope`, cri-dockerd
//!   `docker-<id>.scope`).
//!
//! The `kubepods` root may sit below other cgroups (kind, a node in a container): only what
//! follows it is read. Read from inside a pod's cgroup namespace (the agent as a DaemonSet),
//! another pod's path starts with `..` up to the QoS class or `kubepods` itself, which is not
//! named: what follows the `..` is read the same way.

/// A cgroup of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeCgroup {
    /// The pod's uid, with dashes.
    pub pod_uid: String,
    /// The container's id (64 hex digits); `None` for the pod's own cgroup.
    pub container_id: Option<String>,
    /// The runtime the container cgroup's name shows (`containerd`, `cri-o`, `docker`), or
    /// `cri` when the name is the bare id (cgroupfs driver: containerd, or another CRI runtime).
    pub runtime: &'static str,
}

/// The pod and container of the cgroup at `path`, if it is in the kubelet's layout.
pub fn parse(path: &str) -> Option<KubeCgroup> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let rest = match parts
        .iter()
        .position(|p| *p == "kubepods" || *p == "kubepods.slice")
    {
        Some(root) => &parts[root + 1..],
        // Read inside a pod's cgroup namespace (the agent's DaemonSet): another pod's path
        // climbs out of the agent's own pod and QoS class, above `kubepods`.
        None => {
            let up = parts.iter().take_while(|p| **p == "..").count();
            if up == 0 {
                return None;
            }
            &parts[up..]
        }
    };
    let (at, pod_uid) = rest
        .iter()
        .enumerate()
        .take(2)
        .find_map(|(i, p)| pod_uid(p).map(|u| (i, u)))?;
    // Between the root and the pod, at most the QoS class.
    if at == 1 && !is_qos(rest[0]) {
        return None;
    }
    match &rest[at + 1..] {
        [] => Some(KubeCgroup {
            pod_uid,
            container_id: None,
            runtime: "cri",
        }),
        [name] => {
            let (id, runtime) = container_id(name)?;
            Some(KubeCgroup {
                pod_uid,
                container_id: Some(id),
                runtime,
            })
        }
        _ => None,
    }
}

fn is_qos(part: &str) -> bool {
    matches!(
        part,
        "besteffort" | "burstable" | "kubepods-besteffort.slice" | "kubepods-burstable.slice"
    )
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let uid = if let Some(slice) = part.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        part.strip_prefix("pod")?.to_owned()
    };
    // A uid (36 characters with dashes) or a static pod's hash (32 hex digits).
    let valid =
        (32..=36).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

/// A container cgroup's name: the bare id, or `<runtime>-<id>.scope`.
fn container_id(name: &str) -> Option<(String, &'static str)> {
    let (id, runtime) = match name.strip_suffix(".scope") {
        Some(scope) => {
            if let Some(id) = scope.strip_prefix("cri-containerd-") {
                (id, "containerd")
            } else if let Some(id) = scope.strip_prefix("crio-") {
                // `crio-conmon-<id>.scope` is CRI-O's monitor, not the container.
                (id, "cri-o")
            } else if let Some(id) = scope.strip_prefix("docker-") {
                (id, "docker")
            } else {
                return None;
            }
        }
        None => (name.strip_prefix("crio-").unwrap_or(name), "cri"),
    };
    let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| (id.to_owned(), runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4c5e06a2d1b7d9f4a0b55f2e8e5d7c1e3f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c";
    const UID: &str = "7a3e1b52-9c04-4d8e-a1f6-0b2c3d4e5f60";

    fn pod(container: Option<&str>, runtime: &'static str) -> Option<KubeCgroup> {
        Some(KubeCgroup {
            pod_uid: UID.into(),
            container_id: container.map(str::to_owned),
            runtime,
        })
    }

    #[test]
    fn the_cgroupfs_layout_for_each_qos_class() {
        for qos in ["", "/besteffort", "/burstable"] {
            let path = format!("/kubepods{qos}/pod{UID}/{ID}");
            assert_eq!(parse(&path), pod(Some(ID), "cri"), "{path}");
            assert_eq!(parse(&format!("/kubepods{qos}/pod{UID}")), pod(None, "cri"));
        }
        // CRI-O with the cgroupfs driver; kind's nodes nest the tree; inside a cgroup
        // namespace the path starts with `..`.
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/crio-{ID}")),
            pod(Some(ID), "cri")
        );
        assert_eq!(
            parse(&format!("/kubelet/kubepods/besteffort/pod{UID}/{ID}")),
            pod(Some(ID), "cri")
        );
        assert_eq!(
            parse(&format!("/../../kubepods/besteffort/pod{UID}/{ID}")),
            pod(Some(ID), "cri")
        );
        // From a burstable pod's cgroup namespace, and from a guaranteed one's.
        assert_eq!(
            parse(&format!("/../../../besteffort/pod{UID}/{ID}")),
            pod(Some(ID), "cri")
        );
        assert_eq!(
            parse(&format!("/../../pod{UID}/{ID}")),
            pod(Some(ID), "cri")
        );
        assert_eq!(
            parse(&format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
                UID.replace('-', "_")
            )),
            pod(Some(ID), "containerd")
        );
    }

    #[test]
    fn the_systemd_layout_for_each_runtime() {
        let u = UID.replace('-', "_");
        let best =
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice");
        assert_eq!(
            parse(&format!("{best}/cri-containerd-{ID}.scope")),
            pod(Some(ID), "containerd")
        );
        assert_eq!(
            parse(&format!("{best}/crio-{ID}.scope")),
            pod(Some(ID), "cri-o")
        );
        assert_eq!(
            parse(&format!("{best}/docker-{ID}.scope")),
            pod(Some(ID), "docker")
        );
        assert_eq!(parse(&best), pod(None, "cri"));
        // Guaranteed pods sit right under kubepods.slice.
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"
            )),
            pod(Some(ID), "containerd")
        );
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for path in [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            "/user.slice/user-1000.slice/session-3.scope".to_owned(),
            "/kubepods".to_owned(),
            format!("/../../system.slice/docker-{ID}.scope"),
            "/kubepods/besteffort".to_owned(),
            // Not a uid, not in the QoS place, CRI-O's monitor, a short id, too deep.
            format!("/kubepods/podnot-a-uid/{ID}"),
            format!("/kubepods/other/pod{UID}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope",
                UID.replace('-', "_")
            ),
            format!("/kubepods/pod{UID}/abc123"),
            format!("/kubepods/pod{UID}/{ID}/sub"),
            "/".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse(&path), None, "{path}");
        }
    }
}
