//! The cookie of a TCP socket of this network namespace, found by its addresses through the
//! kernel's `sock_diag` netlink interface (`NETLINK_SOCK_DIAG`, one exact look-up). Block mode's
//! resolver uses it for the job's end of a DNS-over-TCP connection it accepted: the kernel keeps
//! where that socket was going under its cookie (`DNS_REDIRECTS`).

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// "Any socket with these addresses": no cookie to check (`INET_DIAG_NOCOOKIE`).
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// The cookie of the TCP socket whose own address is `local` and whose peer is `remote`, in the
/// calling thread's network namespace.
pub fn tcp_socket_cookie(local: SocketAddr, remote: SocketAddr) -> io::Result<u64> {
    let family = match local.ip() {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    let mut socket_id = SocketId {
        source_port: local.port(),
        destination_port: remote.port(),
        source_address: local.ip(),
        destination_address: remote.ip(),
        ..SocketId::new_v4()
    };
    socket_id.cookie = NO_COOKIE;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    socket.send(&out, 0)?;
    let mut answer = vec![0u8; 4096];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            let c = response.header.socket_id.cookie;
            let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
            Ok(u64::from(high) << 32 | u64::from(low))
        }
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::other(format!(
            "sock_diag answered {:?}",
            other.message_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_sockets_cookie_is_the_one_the_socket_gives() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let cookie = super::super::resolver::socket_cookie(&client, libc::SO_COOKIE).unwrap();
        assert_eq!(tcp_socket_cookie(local, remote).unwrap(), cookie);
        // The accepted end is another socket, with a cookie of its own.
        assert_ne!(tcp_socket_cookie(remote, local).unwrap(), cookie);
        drop(server);
        // No such socket: an error, not a cookie.
        let gone = SocketAddr::new(local.ip(), 1);
        assert!(tcp_socket_cookie(gone, remote).is_err());
    }
}
