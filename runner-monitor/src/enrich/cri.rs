//! A client of Kubernetes' Container Runtime Interface (CRI) on a runtime's unix socket
//! (containerd's, by default): the container's pod sandbox, name and image, and the sandbox's
//! metadata, labels and annotations, which is what the kubelet gave the runtime.
//!
//! CRI is gRPC. The messages below are the few fields used, with their numbers from CRI's
//! `api.proto` (runtime.v1; runtime.v1alpha2 numbers them the same); protobuf skips the fields
//! a message does not declare. containerd 1.6 serves both versions, 1.5 only v1alpha2 and 2.x
//! only v1: v1 is asked first, v1alpha2 when v1 is not implemented.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use tonic::{
    Code, Status,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint, Uri},
};

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ContainerFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerFilter {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<ImageSpec>,
    /// `CONTAINER_CREATED` (0), `_RUNNING` (1), `_EXITED` (2), `_UNKNOWN` (3).
    #[prost(int32, tag = "6")]
    pub state: i32,
    #[prost(map = "string, string", tag = "8")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(map = "string, string", tag = "7")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "8")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// `SANDBOX_READY` (0) or `SANDBOX_NOTREADY` (1).
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(map = "string, string", tag = "5")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    /// With `verbose`, containerd's `info`: JSON with the task's `pid` and the OCI
    /// `runtimeSpec` (its `linux.cgroupsPath`).
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

/// A channel to the CRI socket at `socket` (gRPC over HTTP/2 on a unix socket), each request
/// bounded by `timeout`.
pub async fn connect(
    socket: PathBuf,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://cri.invalid")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// One CRI call: `RuntimeService/<method>`, in runtime.v1, or v1alpha2 if the runtime does not
/// implement v1.
pub async fn call<Q, A>(channel: &Channel, method: &str, request: Q) -> Result<A, Status>
where
    Q: prost::Message + Clone + 'static,
    A: prost::Message + Default + 'static,
{
    match call_in(channel, "runtime.v1", method, request.clone()).await {
        Err(s) if s.code() == Code::Unimplemented => {
            call_in(channel, "runtime.v1alpha2", method, request).await
        }
        answer => answer,
    }
}

async fn call_in<Q, A>(
    channel: &Channel,
    package: &str,
    method: &str,
    request: Q,
) -> Result<A, Status>
where
    Q: prost::Message + 'static,
    A: prost::Message + Default + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(format!("/{package}.RuntimeService/{method}"))
        .map_err(|e| Status::internal(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Q, A>::default();
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// What the CRI says about a container and its pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// The runtime's name for itself (`containerd`).
    pub runtime: String,
    pub container: String,
    pub image: String,
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
    pub pod_labels: HashMap<String, String>,
    pub pod_annotations: HashMap<String, String>,
}

/// The container `id`'s names: its entry in the container list (filtered by id), then its pod
/// sandbox's status. `Ok(None)`: the runtime has no such container.
pub async fn name(channel: &Channel, runtime: &str, id: &str) -> Result<Option<Named>, Status> {
    let list: ListContainersResponse = call(
        channel,
        "ListContainers",
        ListContainersRequest {
            filter: Some(ContainerFilter {
                id: id.to_owned(),
                ..Default::default()
            }),
        },
    )
    .await?;
    let Some(c) = list.containers.into_iter().find(|c| c.id == id) else {
        return Ok(None);
    };
    let sandbox: PodSandboxStatusResponse = call(
        channel,
        "PodSandboxStatus",
        PodSandboxStatusRequest {
            pod_sandbox_id: c.pod_sandbox_id.clone(),
            verbose: false,
        },
    )
    .await?;
    let status = sandbox.status.unwrap_or_default();
    let meta = status.metadata.unwrap_or_default();
    Ok(Some(Named {
        runtime: runtime.to_owned(),
        container: c.metadata.map(|m| m.name).unwrap_or_default(),
        image: c.image.map(|i| i.image).unwrap_or_default(),
        pod: meta.name,
        namespace: meta.namespace,
        pod_uid: meta.uid,
        pod_labels: status.labels,
        pod_annotations: status.annotations,
    }))
}
