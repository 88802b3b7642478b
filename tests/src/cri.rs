//! A real containerd with its CRI plugin, as the kubelet's runtime: Debian's containerd 1.6,
//! started by the test with its own root, state and socket under a directory the test owns, and
//! pods made over CRI as the kubelet makes them (RunPodSandbox, CreateContainer,
//! StartContainer), in the host's network namespace (no CNI), with a kubelet-like cgroup parent
//! (`/kubepods/besteffort/pod<uid>`). The image is built here: an OCI layout of a rootfs holding
//! Debian's static busybox, imported with `ctr` (nothing is pulled). Dropping it removes the
//! pods, stops containerd and removes its files and the pods' cgroups.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use runner_monitor::enrich::cri::{self, ContainerMetadata, ImageSpec, PodSandboxMetadata};
use tonic::transport::Channel;

/// The image every test containerd has; also the pods' sandbox image.
pub const IMAGE: &str = "docker.io/library/rm-busybox:test";

/// CRI's `NamespaceMode`.
const POD: i32 = 0;
const CONTAINER: i32 = 1;
const NODE: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<SecurityContext>,
}

/// `LinuxSandboxSecurityContext` (namespace options are field 1) and, for a container,
/// `LinuxContainerSecurityContext` (field 3): only the namespaces are set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SecurityContext {
    #[prost(message, optional, tag = "1")]
    pub sandbox_namespaces: Option<NamespaceOption>,
    #[prost(message, optional, tag = "3")]
    pub container_namespaces: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxIdMessage {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    pub envs: Vec<KeyValue>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
    #[prost(string, tag = "11")]
    pub log_path: String,
    #[prost(message, optional, tag = "15")]
    pub linux: Option<LinuxContainerConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerConfig {
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<SecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    #[prost(bool, tag = "3")]
    pub readonly: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerIdMessage {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, repeated, tag = "2")]
    pub cmd: Vec<String>,
    /// Seconds.
    #[prost(int64, tag = "3")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub stdout: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub stderr: Vec<u8>,
    #[prost(int32, tag = "3")]
    pub exit_code: i32,
}

/// A pod to make: its metadata, labels and annotations; it gets the kubelet's cgroup parent for
/// a best-effort pod and the host's network namespace.
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

pub struct Containerd {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// The pod sandboxes made.
    pods: Vec<String>,
    /// Their cgroups' names (`pod<uid>`), also of those that failed to start.
    pod_cgroups: Vec<String>,
}

impl Containerd {
    /// Starts containerd with the CRI plugin and its files in a fresh directory named after
    /// `name`, and imports `IMAGE`.
    pub fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rm-cri-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{s}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # The sandbox's oom_score_adj is -998, and this host refuses any process a value below its
  # own (runc init: "failed to update /proc/self/oom_score_adj: Permission denied"): containerd
  # clamps it to its own instead, as it does when it runs in a container itself.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
"#,
                d = dir.display(),
                s = socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = crate::spawn_with_parent_death(
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log),
            libc::SIGTERM,
        )
        .expect("starting containerd (Debian's containerd; `cargo xtask setup` installs it)");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                log_of(&dir)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let channel = runtime
            .block_on(cri::connect(socket.clone(), Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("CRI not reached: {e}\n{}", log_of(&dir)));
        let containerd = Self {
            child,
            dir,
            socket,
            runtime,
            channel,
            pods: Vec::new(),
            pod_cgroups: Vec::new(),
        };
        containerd.import_busybox();
        containerd
    }

    pub fn log(&self) -> String {
        log_of(&self.dir)
    }

    fn call<Q, A>(&self, method: &str, request: Q) -> A
    where
        Q: prost::Message + Clone + 'static,
        A: prost::Message + Default + 'static,
    {
        self.runtime
            .block_on(cri::call(&self.channel, method, request))
            .unwrap_or_else(|e| panic!("CRI {method}: {e}\n{}", self.log()))
    }

    /// Makes `pod` and in it a container `name` running `sh -c script` with `env` and the host's
    /// `mounts` (host path, container path; read-only, as the kubelet mounts secrets); returns
    /// the container's id once started.
    pub fn run(
        &mut self,
        pod: &PodSpec,
        name: &str,
        env: &[(&str, &str)],
        mounts: &[(&Path, &str)],
        script: &str,
    ) -> String {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // The host's network namespace, hence its UTS namespace: no hostname of the pod's
            // (the kubelet sends none for hostNetwork pods).
            hostname: String::new(),
            log_directory: self.dir.join("logs").display().to_string(),
            labels: pod.labels.clone(),
            annotations: pod.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/kubepods/besteffort/pod{}", pod.uid),
                security_context: Some(SecurityContext {
                    sandbox_namespaces: Some(NamespaceOption {
                        network: NODE,
                        pid: POD,
                        ipc: POD,
                    }),
                    container_namespaces: None,
                }),
            }),
        };
        self.pod_cgroups.push(format!("pod{}", pod.uid));
        let sandbox: PodSandboxIdMessage = self.call(
            "RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(config.clone()),
            },
        );
        self.pods.push(sandbox.pod_sandbox_id.clone());
        let container_config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_owned(),
            }),
            command: vec!["sh".into(), "-c".into(), script.to_owned()],
            envs: env
                .iter()
                .map(|(k, v)| KeyValue {
                    key: (*k).to_owned(),
                    value: (*v).to_owned(),
                })
                .collect(),
            mounts: mounts
                .iter()
                .map(|(host, container)| Mount {
                    container_path: (*container).to_owned(),
                    host_path: host.display().to_string(),
                    readonly: true,
                })
                .collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(SecurityContext {
                    sandbox_namespaces: None,
                    container_namespaces: Some(NamespaceOption {
                        network: NODE,
                        pid: CONTAINER,
                        ipc: POD,
                    }),
                }),
            }),
        };
        let created: ContainerIdMessage = self.call(
            "CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: sandbox.pod_sandbox_id.clone(),
                config: Some(container_config),
                sandbox_config: Some(config),
            },
        );
        let _: Empty = self.call(
            "StartContainer",
            ContainerIdMessage {
                container_id: created.container_id.clone(),
            },
        );
        created.container_id
    }

    /// Runs `sh -c script` in container `id` as the kubelet runs a `kubectl exec` (CRI
    /// `ExecSync`: containerd-shim starts it in the container); returns its exit code.
    pub fn exec(&self, id: &str, script: &str) -> i32 {
        let out: ExecSyncResponse = self.call(
            "ExecSync",
            ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: vec!["sh".into(), "-c".into(), script.to_owned()],
                timeout: 30,
            },
        );
        out.exit_code
    }

    /// An OCI image layout of a busybox-static rootfs whose entrypoint sleeps (it is also the
    /// sandbox's "pause"), imported into the CRI's namespace.
    fn import_busybox(&self) {
        let root = self.dir.join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "etc", "tmp", "builds"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        for applet in ["sh", "cat", "sleep", "true", "ls"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let oci = self.dir.join("oci");
        let blobs = oci.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let layer = self.dir.join("layer.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&layer)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "tar of the busybox rootfs failed");
        let blob = |content: &[u8]| -> (String, usize) {
            let file = self.dir.join("blob");
            std::fs::write(&file, content).unwrap();
            let digest = sha256(&file);
            std::fs::rename(&file, blobs.join(&digest)).unwrap();
            (digest, content.len())
        };
        let (layer_digest, layer_size) = blob(&std::fs::read(&layer).unwrap());
        let (config, config_size) = blob(
            format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sleep","1000000"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
            )
            .as_bytes(),
        );
        let (manifest, manifest_size) = blob(
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{layer_size}}}]}}"#
            )
            .as_bytes(),
        );
        std::fs::write(
            oci.join("index.json"),
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest}","size":{manifest_size},"annotations":{{"org.opencontainers.image.ref.name":"{IMAGE}"}}}}]}}"#
            ),
        )
        .unwrap();
        std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let image = self.dir.join("image.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&oci)
            .arg("-cf")
            .arg(&image)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "tar of the OCI layout failed");
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for sandbox in &self.pods {
            for method in ["StopPodSandbox", "RemovePodSandbox"] {
                let request = PodSandboxIdMessage {
                    pod_sandbox_id: sandbox.clone(),
                };
                let _: Result<Empty, _> = self.runtime.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(20),
                        cri::call(&self.channel, method, request),
                    )
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(method)))
                });
            }
        }
        crate::terminate(&mut self.child, Duration::from_secs(20));
        for sub in ["state", "root"] {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(self.dir.join(sub))
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The pods' cgroups (the kubelet would remove them), in every hierarchy.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                for pod in &self.pod_cgroups {
                    let _ = std::fs::remove_dir(h.path().join("kubepods/besteffort").join(pod));
                }
                let _ = std::fs::remove_dir(h.path().join("kubepods/besteffort"));
                let _ = std::fs::remove_dir(h.path().join("kubepods"));
            }
        }
    }
}
