//! Frame builder for tests: Ethernet, VLAN tags, IPv4 (options, fragments), IPv6 (extension
//! headers), UDP, with correct lengths and checksums, so the same frames can be fed to
//! `BPF_PROG_TEST_RUN` and sent for real on a veth pair.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_QINQ: u16 = 0x9100;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ETH_HDR_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const UDP_HDR_LEN: usize = 8;

/// One 802.1Q/802.1ad tag.
#[derive(Clone, Copy, Debug)]
pub struct Vlan {
    /// Tag protocol identifier: `ETH_P_8021Q`, `ETH_P_8021AD` or `ETH_P_QINQ`.
    pub tpid: u16,
    pub vid: u16,
}

/// IPv4 header fields the tests vary.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Raw option bytes; padded with zeros (end of options) to a multiple of 4.
    pub options: Vec<u8>,
    pub id: u16,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub ttl: u8,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src,
            dst,
            options: Vec::new(),
            id: 1,
            frag_offset: 0,
            more_fragments: false,
            ttl: 64,
        }
    }
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options; `len8` = extra 8-byte units after the first 8 bytes.
    HopByHop { len8: u8 },
    /// Routing header (type 0 payload zeroed); `len8` as above.
    Routing { len8: u8 },
    /// Destination options; `len8` as above.
    DestOpts { len8: u8 },
    /// Authentication header; `len4` = total length in 4-byte units minus 2.
    Ah { len4: u8 },
    /// Fragment header; `offset` in 8-byte units.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    fn proto(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => 0,
            Ext::Routing { .. } => 43,
            Ext::Fragment { .. } => 44,
            Ext::Ah { .. } => 51,
            Ext::DestOpts { .. } => 60,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop { len8 } | Ext::Routing { len8 } | Ext::DestOpts { len8 } => {
                let mut b = vec![0u8; (usize::from(len8) + 1) * 8];
                b[0] = next;
                b[1] = len8;
                if let Ext::HopByHop { .. } | Ext::DestOpts { .. } = self {
                    // PadN option filling the rest, so the header is valid for the stack too.
                    b[2] = 1;
                    b[3] = (b.len() - 4) as u8;
                }
                b
            }
            Ext::Ah { len4 } => {
                let mut b = vec![0u8; (usize::from(len4) + 2) * 4];
                b[0] = next;
                b[1] = len4;
                b
            }
            Ext::Fragment { offset, more, id } => {
                let mut b = vec![0u8; 8];
                b[0] = next;
                let fo = (offset << 3) | u16::from(more);
                b[2..4].copy_from_slice(&fo.to_be_bytes());
                b[4..8].copy_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

/// IPv6 header fields the tests vary.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub exts: Vec<Ext>,
    pub hop_limit: u8,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            src,
            dst,
            exts: Vec::new(),
            hop_limit: 64,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

/// A complete Ethernet frame carrying an IP packet.
#[derive(Clone, Debug)]
pub struct Frame {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    /// Outermost first.
    pub vlans: Vec<Vlan>,
    pub ip: Ip,
    /// IP protocol / last next-header value.
    pub proto: u8,
    /// Layer-4 bytes (header included).
    pub l4: Vec<u8>,
}

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

impl Frame {
    /// UDP over IPv4 with a correct checksum.
    pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Self {
        Self::udp(Ip::V4(Ipv4::new(src, dst)), sport, dport, payload)
    }

    /// UDP over IPv6 with a correct checksum.
    pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Self {
        Self::udp(Ip::V6(Ipv6::new(src, dst)), sport, dport, payload)
    }

    /// UDP over `ip`; the checksum covers the pseudo header of `ip`'s addresses.
    pub fn udp(ip: Ip, sport: u16, dport: u16, payload: &[u8]) -> Self {
        let l4 = udp_datagram(&ip, sport, dport, payload);
        Self {
            eth_dst: MAC_B,
            eth_src: MAC_A,
            vlans: Vec::new(),
            ip,
            proto: IPPROTO_UDP,
            l4,
        }
    }

    /// Any other protocol over `ip` (TCP, ICMP, ...), `l4` taken as is.
    pub fn other(ip: Ip, proto: u8, l4: &[u8]) -> Self {
        Self {
            eth_dst: MAC_B,
            eth_src: MAC_A,
            vlans: Vec::new(),
            ip,
            proto,
            l4: l4.to_vec(),
        }
    }

    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push(Vlan { tpid, vid });
        self
    }

    /// Bytes before the IP header.
    pub fn l2_len(&self) -> usize {
        ETH_HDR_LEN + VLAN_TAG_LEN * self.vlans.len()
    }

    /// Bytes of IP header, IPv4 options and IPv6 extension headers included.
    pub fn l3_len(&self) -> usize {
        match &self.ip {
            Ip::V4(v4) => IPV4_HDR_LEN + v4.options.len().div_ceil(4) * 4,
            Ip::V6(v6) => IPV6_HDR_LEN + v6.exts.iter().map(|e| e.bytes(0).len()).sum::<usize>(),
        }
    }

    /// Offset of the UDP payload in the built frame.
    pub fn payload_offset(&self) -> usize {
        self.l2_len() + self.l3_len() + UDP_HDR_LEN
    }

    pub fn build(&self) -> Vec<u8> {
        let ether_type = match self.ip {
            Ip::V4(_) => ETH_P_IPV4,
            Ip::V6(_) => ETH_P_IPV6,
        };
        let ip = match &self.ip {
            Ip::V4(v4) => ipv4_packet(v4, self.proto, &self.l4),
            Ip::V6(v6) => ipv6_packet(v6, self.proto, &self.l4),
        };
        ethernet(self.eth_dst, self.eth_src, &self.vlans, ether_type, &ip)
    }
}

/// Ethernet header (+ tags) followed by `payload`.
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    vlans: &[Vlan],
    ether_type: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HDR_LEN + vlans.len() * VLAN_TAG_LEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for v in vlans {
        f.extend_from_slice(&v.tpid.to_be_bytes());
        f.extend_from_slice(&(v.vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request frame (who-has `target` tell `sender`).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    a.extend_from_slice(&MAC_A);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet([0xff; 6], MAC_A, &[], ETH_P_ARP, &a)
}

/// IPv4 header (with checksum) followed by `payload`.
pub fn ipv4_packet(h: &Ipv4, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut opts = h.options.clone();
    opts.resize(opts.len().div_ceil(4) * 4, 0);
    let hlen = IPV4_HDR_LEN + opts.len();
    let total = (hlen + payload.len()) as u16;
    let frags = (u16::from(h.more_fragments) << 13) | (h.frag_offset & 0x1fff);
    let mut p = Vec::with_capacity(usize::from(total));
    p.push(0x40 | (hlen / 4) as u8);
    p.push(0);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&h.id.to_be_bytes());
    p.extend_from_slice(&frags.to_be_bytes());
    p.push(h.ttl);
    p.push(proto);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&h.src.octets());
    p.extend_from_slice(&h.dst.octets());
    p.extend_from_slice(&opts);
    let csum = checksum(&[&p]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// IPv6 header and extension headers followed by `payload` (`proto` = upper-layer protocol).
pub fn ipv6_packet(h: &Ipv6, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut exts = Vec::new();
    for (i, e) in h.exts.iter().enumerate() {
        let next = h.exts.get(i + 1).map_or(proto, Ext::proto);
        exts.extend_from_slice(&e.bytes(next));
    }
    let first = h.exts.first().map_or(proto, Ext::proto);
    let plen = (exts.len() + payload.len()) as u16;
    let mut p = Vec::with_capacity(IPV6_HDR_LEN + usize::from(plen));
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&plen.to_be_bytes());
    p.push(first);
    p.push(h.hop_limit);
    p.extend_from_slice(&h.src.octets());
    p.extend_from_slice(&h.dst.octets());
    p.extend_from_slice(&exts);
    p.extend_from_slice(payload);
    p
}

/// UDP header + payload with the checksum over `ip`'s pseudo header.
pub fn udp_datagram(ip: &Ip, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (UDP_HDR_LEN + payload.len()) as u16;
    let mut u = Vec::with_capacity(usize::from(len));
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let pseudo = match ip {
        Ip::V4(h) => {
            let mut s = Vec::with_capacity(12);
            s.extend_from_slice(&h.src.octets());
            s.extend_from_slice(&h.dst.octets());
            s.extend_from_slice(&[0, IPPROTO_UDP]);
            s.extend_from_slice(&len.to_be_bytes());
            s
        }
        Ip::V6(h) => {
            let mut s = Vec::with_capacity(40);
            s.extend_from_slice(&h.src.octets());
            s.extend_from_slice(&h.dst.octets());
            s.extend_from_slice(&u32::from(len).to_be_bytes());
            s.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
            s
        }
    };
    let mut csum = checksum(&[&pseudo, &u]);
    if csum == 0 {
        csum = 0xffff;
    }
    u[6..8].copy_from_slice(&csum.to_be_bytes());
    u
}

/// Internet checksum over the concatenation of `parts` (each part even-length except the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `a.b.c.d` as the v4-mapped `::ffff:a.b.c.d` bytes used by the flow map.
pub fn v4_mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

/// A 12-byte RTP header (version 2, PCMU) followed by `len` payload bytes of `fill`.
pub fn rtp(seq: u16, ts: u32, ssrc: u32, len: usize, fill: u8) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + len);
    r.extend_from_slice(&[0x80, 0x00]);
    r.extend_from_slice(&seq.to_be_bytes());
    r.extend_from_slice(&ts.to_be_bytes());
    r.extend_from_slice(&ssrc.to_be_bytes());
    r.resize(12 + len, fill);
    r
}
