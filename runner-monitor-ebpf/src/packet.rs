//! A packet's IP and transport headers read straight from its linear data: loads the verifier
//! checks against `data_end`, no helper call. The `cgroup_skb` programs run on every packet the
//! host sends or receives; with this they let most packets go (a TCP segment is not DNS; an ACK
//! carries no ClientHello) for the cost of a few loads, before `bpf_skb_load_bytes` or a socket
//! look-up. Where the headers are not in the linear data (`None`), the programs read them with
//! the helper as before.

use aya_ebpf::programs::SkBuffContext;

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

/// The transport protocol and the offset of the transport header, if the IP header is in the
/// linear data (IPv6 extension headers are not followed: the programs do not either).
#[inline(always)]
pub fn transport(ctx: &SkBuffContext) -> Option<(u8, usize)> {
    let (data, end) = linear(ctx);
    match u16::from_be(ctx.skb.protocol() as u16) as u32 {
        ETH_P_IP => {
            if data + 20 > end {
                return None;
            }
            // SAFETY: within [data, data + 20), checked against data_end above.
            let (vihl, proto) = unsafe { (*(data as *const u8), *((data + 9) as *const u8)) };
            Some((proto, usize::from(vihl & 0x0f) * 4))
        }
        ETH_P_IPV6 => {
            if data + 40 > end {
                return None;
            }
            // SAFETY: as above.
            Some((unsafe { *((data + 6) as *const u8) }, 40))
        }
        _ => None,
    }
}

/// The first 4 bytes of the transport header at `l4` (a UDP or TCP header's source and
/// destination ports, as the packet holds them); `None` when they are not in the linear data.
#[inline(always)]
pub fn ports(ctx: &SkBuffContext, l4: usize) -> Option<[u8; 4]> {
    let (data, end) = linear(ctx);
    // `l4` is at most 60 (IHL); the mask says so to the verifier.
    let at = data + (l4 & 0x3f);
    if at + 4 > end {
        return None;
    }
    // SAFETY: checked against data_end above.
    Some(unsafe { *(at as *const [u8; 4]) })
}

/// Whether a TCP segment whose header starts at `l4` carries no payload; `None` when its data
/// offset is not in the linear data.
#[inline(always)]
pub fn tcp_without_payload(ctx: &SkBuffContext, l4: usize) -> Option<bool> {
    let (data, end) = linear(ctx);
    // `l4` is at most 60 (IHL); the mask says so to the verifier.
    let at = data + (l4 & 0x3f) + 12;
    if at + 1 > end {
        return None;
    }
    // SAFETY: checked against data_end above.
    let data_offset = usize::from(unsafe { *(at as *const u8) } >> 4) * 4;
    Some(ctx.len() as usize <= (l4 & 0x3f) + data_offset)
}
