//! The recorder's XDP program: parse Ethernet / VLAN / IPv4 / IPv6 / UDP, look the destination up
//! in the flow table (`FLOW_SLOTS` by port, else the `FLOWS` hash), and copy matching frames (from the Ethernet header, cut to `SNAPLEN`) into the ring
//! buffer of the current CPU. Layout and measurements: see `recorder-ebpf/README.md`.
//!
//! Verifier rules followed throughout: every packet read goes through [`ptr_at`] (bounds-checked
//! against `data_end` right before the dereference), every loop has a small constant bound, and no
//! panic is reachable (no indexing, no unwrap, wrapping arithmetic).
//!
//! The record layout is chosen at build time by `--cfg recorder_layout="..."` (only for the
//! measurements in the README): `scratch` (default), `classes` or `perf`.
// The measurement-only layouts leave parts of the default one unused.
#![cfg_attr(
    any(recorder_layout = "classes", recorder_layout = "perf"),
    allow(dead_code, unused_imports, unused_macros)
)]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
    },
    helpers::generated::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
    Global,
};
use recorder_ebpf::abi::{
    counter, flow_versions, FlowCtl, FlowKey, FlowLayout, FlowStats, FlowValue, RecordHeader,
    ACTION_DROP, DEFAULT_MAX_FLOWS, DEFAULT_SNAPLEN, MAX_FLOW_ADDRS, MAX_SNAPLEN,
    RECORD_F_TRUNCATED, RECORD_HEADER_LEN, SRC_MATCH_ADDR, SRC_MATCH_PORT,
};

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Snap length in bytes of frame; overridden by userspace with `EbpfLoader::override_global`.
#[unsafe(no_mangle)]
static SNAPLEN: Global<u32> = Global::new(DEFAULT_SNAPLEN);

/// Which destinations `FLOW_SLOTS` covers; overridden by userspace at load (read-only here).
/// Not a `Global`: the program loads single fields of it, each with a volatile read (which is
/// all `Global::load` does for the whole value).
#[unsafe(no_mangle)]
static FLOW_LAYOUT: FlowLayout = FlowLayout {
    addrs: [[0; 2]; MAX_FLOW_ADDRS],
    addr_count: 0,
    port_base: 0,
    port_span: 0,
    _pad: 0,
};

// The flow table. How a torn read is ruled out (see "Flow table" in the README):
//
// * What the program reads of a flow is one version `v`: `FLOW_VALUES[v]` (and it counts into
//   `FLOW_STATS[v]`). Userspace writes a version only while nothing refers to it and an RCU
//   grace period has passed since the last reference went (membarrier(MEMBARRIER_CMD_GLOBAL)
//   = synchronize_rcu; this program runs in an RCU read-side section, NAPI being softirq): no
//   run of this program can be reading it then. Once published it never changes.
// * The only thing that changes under a running program is which version a key refers to: a
//   slot word (one aligned 8-byte word, stored by userspace in one instruction through its
//   mmap of `FLOW_SLOTS`, read here with one 8-byte load), or a hash entry (the kernel swaps
//   whole elements under RCU, no prealloc). Either way the program sees the old version or
//   the new one, each complete: a packet is attributed to the flow and generation of the one it
//   saw, and a key stays mapped throughout a rewrite (make before break), so none is lost.

/// One word per (media address, port): 0 (no flow) or a version index. Mmapable: userspace
/// stores words atomically; `bpf_map_update_elem` would memcpy them.
#[map]
static FLOW_SLOTS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Fallback for destinations outside `FLOW_SLOTS`: key -> version index. No prealloc: an update
/// swaps the whole element under RCU (a preallocated hash recycles elements at once).
#[map]
static FLOWS: HashMap<FlowKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Flow values by version index (mmapable: userspace writes unpublished versions directly).
#[map]
static FLOW_VALUES: Array<FlowValue> =
    Array::with_max_entries(flow_versions(DEFAULT_MAX_FLOWS), BPF_F_MMAPABLE);

/// Per-flow counters by version index, zeroed by userspace before a version is reused.
#[map]
static FLOW_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(flow_versions(DEFAULT_MAX_FLOWS), 0);

/// The fallback flag (and the layout, for userspace).
#[map]
static FLOW_CTL: Array<FlowCtl> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Default ring size; userspace sets the real one with `EbpfLoader::map_max_entries`.
const RING_BYTES: u32 = 256 * 1024;

#[map]
static RING_0: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_1: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_2: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_3: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_4: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_5: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_6: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_7: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_8: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_9: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_10: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_11: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_12: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_13: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_14: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
#[map]
static RING_15: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
/// QinQ: an outer service tag and an inner customer tag.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (counted as a parse failure).
const MAX_IPV6_EXT: usize = 6;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Pre-standard QinQ tag some switches still emit.
const ETH_P_QINQ1: u16 = 0x9100;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// Mask that bounds a copy length to `1..=MAX_SNAPLEN` in a form the verifier can follow.
const SNAP_MASK: u32 = MAX_SNAPLEN - 1;
const _: () = assert!(MAX_SNAPLEN.is_power_of_two());

#[xdp]
pub fn recorder_xdp(ctx: XdpContext) -> u32 {
    bump(counter::SEEN);
    match parse(&ctx) {
        Ok(udp) => on_udp(&ctx, &udp),
        Err(Skip::ParseFailed) => {
            bump(counter::PARSE_FAILED);
            XDP_PASS
        }
        Err(Skip::NotUdp) => {
            bump(counter::NOT_UDP);
            XDP_PASS
        }
        Err(Skip::Fragment) => {
            bump(counter::FRAGMENT_SKIPPED);
            XDP_PASS
        }
    }
}

/// Why a frame is not looked up.
enum Skip {
    ParseFailed,
    NotUdp,
    Fragment,
}

/// The fields of a UDP datagram the program matches on.
struct Udp {
    /// Destination and source, IPv6 or v4-mapped.
    dst: [u8; 16],
    src: [u8; 16],
    dport: u16,
    sport: u16,
    /// Offset of the UDP payload from the start of the frame.
    payload_off: usize,
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, XDP runs to completion on one CPU.
        unsafe { *p = (*p).wrapping_add(1) };
    }
}

/// Pointer to a `T` at `off` bytes into the frame, if the frame holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Skip> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Skip::ParseFailed);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, Skip> {
    // SAFETY: bounds-checked by `ptr_at`; every T used here is a byte array (alignment 1).
    Ok(unsafe { *ptr_at::<T>(ctx, off)? })
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Udp, Skip> {
    let mut off = ETH_LEN;
    let mut ether_type = u16::from_be_bytes(read::<[u8; 2]>(ctx, 12)?);
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD && ether_type != ETH_P_QINQ1 {
            break;
        }
        // Tag = TCI (2) + encapsulated EtherType (2).
        let tag = read::<[u8; VLAN_LEN]>(ctx, off)?;
        ether_type = u16::from_be_bytes([tag[2], tag[3]]);
        off += VLAN_LEN;
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        // Includes a third VLAN tag: deeper stacks are not walked.
        _ => Err(Skip::NotUdp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Result<Udp, Skip> {
    let h = read::<[u8; IPV4_LEN]>(ctx, off)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < IPV4_LEN {
        return Err(Skip::ParseFailed);
    }
    // Fragment offset (13 bits, in 8-byte units): non-zero means no L4 header in this packet.
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Err(Skip::Fragment);
    }
    if h[9] != IPPROTO_UDP {
        return Err(Skip::NotUdp);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[10] = 0xff;
    src[11] = 0xff;
    dst[10] = 0xff;
    dst[11] = 0xff;
    src[12..16].copy_from_slice(&h[12..16]);
    dst[12..16].copy_from_slice(&h[16..20]);
    parse_udp(ctx, off + ihl, src, dst)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Result<Udp, Skip> {
    let h = read::<[u8; IPV6_LEN]>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return Err(Skip::ParseFailed);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = off + IPV6_LEN;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            IPPROTO_UDP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e = read::<[u8; 2]>(ctx, off)?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let e = read::<[u8; 2]>(ctx, off)?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e = read::<[u8; 8]>(ctx, off)?;
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    return Err(Skip::Fragment);
                }
                next = e[0];
                off += 8;
            }
            _ => return Err(Skip::NotUdp),
        }
    }
    match next {
        IPPROTO_UDP => parse_udp(ctx, off, src, dst),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            // Longer chain than we walk.
            Err(Skip::ParseFailed)
        }
        _ => Err(Skip::NotUdp),
    }
}

#[inline(always)]
fn parse_udp(ctx: &XdpContext, off: usize, src: [u8; 16], dst: [u8; 16]) -> Result<Udp, Skip> {
    let u = read::<[u8; UDP_LEN]>(ctx, off)?;
    Ok(Udp {
        dst,
        src,
        sport: u16::from_be_bytes([u[0], u[1]]),
        dport: u16::from_be_bytes([u[2], u[3]]),
        payload_off: off + UDP_LEN,
    })
}

#[inline(always)]
fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // Two 8-byte compares instead of a memcmp the BPF backend may not inline.
    words(a) == words(b)
}

#[inline(always)]
fn on_udp(ctx: &XdpContext, udp: &Udp) -> u32 {
    let Some(version) = flow_version(udp) else {
        return XDP_PASS;
    };
    let flow = match FLOW_VALUES.get_ptr(version) {
        // SAFETY: array element; immutable while any key refers to this version (see above).
        Some(p) => unsafe { core::ptr::read(p) },
        None => return XDP_PASS,
    };
    bump(counter::MATCHED);
    let stats = FLOW_STATS.get_ptr_mut(version);

    let addr_bad = flow.src_match & SRC_MATCH_ADDR != 0 && !eq16(&udp.src, &flow.remote_addr);
    let port_bad = flow.src_match & SRC_MATCH_PORT != 0 && udp.sport != flow.remote_port;
    if addr_bad || port_bad {
        bump(counter::WRONG_SOURCE);
        if let Some(s) = stats {
            // SAFETY: per-CPU value.
            unsafe { (*s).wrong_source = (*s).wrong_source.wrapping_add(1) };
        }
        return XDP_PASS;
    }

    let wire_len = (ctx.data_end() - ctx.data()) as u32;
    let snaplen = SNAPLEN.load().clamp(1, MAX_SNAPLEN);
    let cap_len = if wire_len < snaplen {
        wire_len
    } else {
        snaplen
    };
    let truncated = cap_len < wire_len;
    if let Some(s) = stats {
        // SAFETY: per-CPU value.
        unsafe {
            (*s).packets = (*s).packets.wrapping_add(1);
            (*s).bytes = (*s).bytes.wrapping_add(u64::from(wire_len));
        }
    }
    let hdr = RecordHeader {
        flow_id: flow.flow_id,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        generation: flow.generation,
        wire_len,
        cap_len,
        payload_offset: udp.payload_off as u16,
        flags: if truncated { RECORD_F_TRUNCATED } else { 0 },
    };
    match emit(ctx, &hdr) {
        Ok(()) => {
            bump(counter::CAPTURED);
            if truncated {
                bump(counter::TRUNCATED);
                if let Some(s) = stats {
                    // SAFETY: per-CPU value.
                    unsafe { (*s).truncated = (*s).truncated.wrapping_add(1) };
                }
            }
        }
        Err(EmitError::RingFull) => {
            bump(counter::RING_FULL);
            if let Some(s) = stats {
                // SAFETY: per-CPU value.
                unsafe { (*s).ring_drops = (*s).ring_drops.wrapping_add(1) };
            }
        }
        Err(EmitError::CopyFailed) => bump(counter::COPY_FAILED),
    }
    if flow.action == ACTION_DROP {
        XDP_DROP
    } else {
        XDP_PASS
    }
}

/// The version index the destination refers to, if any. A destination the array covers (one of
/// the layout's addresses, a port in its span) is looked up there only; others in the `FLOWS`
/// hash, and only while it holds an entry.
#[inline(always)]
fn flow_version(udp: &Udp) -> Option<u32> {
    let layout = &FLOW_LAYOUT;
    // SAFETY: reads of a read-only global (volatile: its value is the one set at load, which
    // the compiler must not fold to the initialiser).
    let (span, base, count) = unsafe {
        (
            core::ptr::read_volatile(&layout.port_span),
            core::ptr::read_volatile(&layout.port_base),
            core::ptr::read_volatile(&layout.addr_count),
        )
    };
    let off = u32::from(udp.dport).wrapping_sub(base);
    if off < span {
        let dst = words(&udp.dst);
        // Constant bound; the verifier knows `count` (read-only map) and prunes the rest.
        for i in 0..MAX_FLOW_ADDRS {
            if i as u32 >= count {
                break;
            }
            // SAFETY: as above (`i < MAX_FLOW_ADDRS`: no panic path).
            let addr = unsafe { core::ptr::read_volatile(&layout.addrs[i]) };
            if addr == dst {
                let slot = FLOW_SLOTS.get_ptr((i as u32).wrapping_mul(span).wrapping_add(off))?;
                // SAFETY: array element; one aligned 8-byte load (userspace stores it whole).
                let word = unsafe { core::ptr::read_volatile(slot) };
                return if word == 0 { None } else { Some(word as u32) };
            }
        }
    }
    let ctl = FLOW_CTL.get_ptr(0)?;
    // SAFETY: array element; a single byte.
    if unsafe { core::ptr::read_volatile(&(*ctl).fallback) } == 0 {
        return None;
    }
    let key = FlowKey {
        addr: udp.dst,
        port: udp.dport,
        _pad: [0; 2],
    };
    // SAFETY: no-prealloc hash: the element stays valid (RCU) while we read it.
    FLOWS.get_ptr(key).map(|p| unsafe { core::ptr::read(p) })
}

/// An address as two native-endian words, as `FlowLayout::addrs` stores it.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u64; 2] {
    let (a0, a1) = a.split_at(8);
    let word = |s: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(s);
        u64::from_ne_bytes(w)
    };
    [word(a0), word(a1)]
}

enum EmitError {
    RingFull,
    CopyFailed,
}

/// `cap_len` as a copy length the verifier can bound to `1..=MAX_SNAPLEN` after optimisation
/// (a plain `if n == 0` comparison is folded away by LLVM, which knows `cap_len >= 1`).
#[inline(always)]
fn bounded_len(cap_len: u32) -> u32 {
    (cap_len.wrapping_sub(1) & SNAP_MASK) + 1
}

/// Calls `$f(&RING_n)` for `n = cpu % RING_COUNT`. One call per arm keeps LLVM from building a
/// table of map pointers (relocations in `.rodata` that no loader resolves).
macro_rules! with_ring {
    ($idx:expr, $f:expr) => {
        match $idx {
            0 => $f(&RING_0),
            1 => $f(&RING_1),
            2 => $f(&RING_2),
            3 => $f(&RING_3),
            4 => $f(&RING_4),
            5 => $f(&RING_5),
            6 => $f(&RING_6),
            7 => $f(&RING_7),
            8 => $f(&RING_8),
            9 => $f(&RING_9),
            10 => $f(&RING_10),
            11 => $f(&RING_11),
            12 => $f(&RING_12),
            13 => $f(&RING_13),
            14 => $f(&RING_14),
            _ => $f(&RING_15),
        }
    };
}

#[inline(always)]
fn ring_index() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_get_smp_processor_id() }) % recorder_ebpf::abi::RING_COUNT as u32
}

// ---------------------------------------------------------------------------------------------
// Layout (a), the default: per-CPU scratch record + bpf_ringbuf_output of header + cap_len bytes.

/// One record as built in the per-CPU scratch area before it is copied into the ring.
#[cfg(not(any(recorder_layout = "classes", recorder_layout = "perf")))]
#[repr(C, align(8))]
struct Scratch {
    hdr: RecordHeader,
    data: [u8; MAX_SNAPLEN as usize],
}

#[cfg(not(any(recorder_layout = "classes", recorder_layout = "perf")))]
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[cfg(not(any(recorder_layout = "classes", recorder_layout = "perf")))]
#[inline(always)]
fn emit(ctx: &XdpContext, hdr: &RecordHeader) -> Result<(), EmitError> {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return Err(EmitError::CopyFailed);
    };
    let len = bounded_len(hdr.cap_len);
    // SAFETY: `rec` is this CPU's scratch slot; `len <= MAX_SNAPLEN` = size of `data`.
    let rc = unsafe {
        (*rec).hdr = *hdr;
        bpf_xdp_load_bytes(ctx.ctx, 0, (*rec).data.as_mut_ptr().cast(), len)
    };
    if rc != 0 {
        return Err(EmitError::CopyFailed);
    }
    // SAFETY: the first RECORD_HEADER_LEN + len bytes of the slot were written above.
    let bytes =
        unsafe { core::slice::from_raw_parts(rec.cast::<u8>(), RECORD_HEADER_LEN + len as usize) };
    let out = |ring: &RingBuf| ring.output::<[u8]>(bytes, wake_flags(ring, bytes.len()));
    with_ring!(ring_index(), out).map_err(|_| EmitError::RingFull)
}

/// Wakes the consumer only when this record makes the unread data cross 1/8 of the ring.
///
/// The kernel's default (wake whenever the consumer had caught up) costs a self-IPI, an
/// irq_work and a context switch many times per millisecond at high rates: a quarter of the
/// NAPI thread's time in the bench profile. The consumer also drains on a short timer, which
/// bounds the latency of records below the threshold.
#[inline(always)]
fn wake_flags(ring: &RingBuf, len: usize) -> u64 {
    let wake_at = ring.query(u64::from(BPF_RB_RING_SIZE)) >> 3;
    let avail = ring.query(u64::from(BPF_RB_AVAIL_DATA));
    // The record's room in the ring: an 8-byte kernel header, then the data, padded to 8 bytes
    // (without the padding, a ring filling by 256-byte steps stepped over the mark unseen).
    let room = (len as u64 + 8 + 7) & !7;
    if avail < wake_at && avail + room >= wake_at {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[cfg(any(recorder_layout = "classes", recorder_layout = "perf"))]
mod layouts;
#[cfg(any(recorder_layout = "classes", recorder_layout = "perf"))]
use layouts::emit;
