//! A packet's IP and transport headers read straight from its linear data: loads the verifier
//! checks against `data_end`, no helper call. The `cgroup_skb` programs run on every packet the
//! host sends or receives; with this they let most packets go (a TCP segment is not DNS; an ACK
//! carries no ClientHello) for the cost of a few loads, before `bpf_skb_load_bytes` or a socket
//! look-up. Where the headers are not in the linear data, they are read with the helper.

use aya_ebpf::programs::SkBuffContext;
use runner_monitor_common::{AF_INET, AF_INET6};

pub const ETH_P_IP: u32 = 0x0800;
pub const ETH_P_IPV6: u32 = 0x86DD;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The packet's linear data: its start and end.
#[inline(always)]
fn linear(ctx: &SkBuffContext) -> (usize, usize) {
    // SAFETY: context field reads; the verifier turns them into packet pointers.
    unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    }
}

/// A packet's network and transport layer: the address family, the transport protocol and
/// where the transport header starts.
#[derive(Clone, Copy)]
pub struct Transport {
    pub family: u16,
    pub protocol: u8,
    pub l4: usize,
}

/// The packet's transport, from its linear data, else from `bpf_skb_load_bytes` (IPv6
/// extension headers are not followed: CI clients' TCP and DNS do not send them).
#[inline(always)]
pub fn transport(ctx: &SkBuffContext) -> Option<Transport> {
    let (data, end) = linear(ctx);
    match u16::from_be(ctx.skb.protocol() as u16) as u32 {
        ETH_P_IP => {
            let (vihl, protocol) = if data + 20 <= end {
                // SAFETY: within [data, data + 20), checked against data_end above.
                unsafe { (*(data as *const u8), *((data + 9) as *const u8)) }
            } else {
                (ctx.load::<u8>(0).ok()?, ctx.load::<u8>(9).ok()?)
            };
            Some(Transport {
                family: AF_INET,
                protocol,
                l4: usize::from(vihl & 0x0f) * 4,
            })
        }
        ETH_P_IPV6 => {
            let protocol = if data + 40 <= end {
                // SAFETY: as above.
                unsafe { *((data + 6) as *const u8) }
            } else {
                ctx.load::<u8>(6).ok()?
            };
            Some(Transport {
                family: AF_INET6,
                protocol,
                l4: 40,
            })
        }
        _ => None,
    }
}

/// The first 4 bytes of the transport header at `l4` (a UDP or TCP header's source and
/// destination ports, as the packet holds them), from the linear data, else in one helper read.
#[inline(always)]
pub fn ports(ctx: &SkBuffContext, l4: usize) -> Option<[u8; 4]> {
    let (data, end) = linear(ctx);
    // `l4` is at most 60 (IHL); the mask says so to the verifier.
    let at = data + (l4 & 0x3f);
    if at + 4 <= end {
        // SAFETY: checked against data_end above.
        return Some(unsafe { *(at as *const [u8; 4]) });
    }
    ctx.load::<[u8; 4]>(l4).ok()
}

/// Where the payload of the TCP segment whose header starts at `l4` begins, if it has one.
#[inline(always)]
pub fn tcp_payload(ctx: &SkBuffContext, l4: usize) -> Option<usize> {
    let (data, end) = linear(ctx);
    // As in `ports`.
    let at = data + (l4 & 0x3f) + 12;
    let offset_byte = if at < end {
        // SAFETY: checked against data_end above.
        unsafe { *(at as *const u8) }
    } else {
        ctx.load::<u8>(l4 + 12).ok()?
    };
    let payload = l4 + usize::from(offset_byte >> 4) * 4;
    (ctx.len() as usize > payload).then_some(payload)
}
