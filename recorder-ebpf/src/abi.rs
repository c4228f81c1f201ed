//! Types and constants shared by the XDP program and userspace.
//!
//! Byte order: every multi-byte integer field is in host byte order (little-endian on every
//! target we build for) unless its doc says otherwise; addresses are raw network-order bytes.
//! IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so one map serves both families.

/// Bumped whenever a type or map in this file changes layout or meaning. Userspace pins maps in
/// a directory named after it, so an incompatible layout is never silently reused.
pub const ABI_VERSION: u32 = 2;

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "recorder_xdp";

/// Map names (must match the statics in `src/xdp.rs`).
///
/// The flow table (see "Flow table" in `recorder-ebpf/README.md`): `FLOW_SLOTS` (array, one
/// 8-byte word per (media address, port) of the configured range, holding a version index or
/// 0), `FLOWS` (fallback hash for keys outside the range, [`FlowKey`] -> version index),
/// `FLOW_VALUES` (array of [`FlowValue`] by version index), `FLOW_STATS` (per-CPU array of
/// [`FlowStats`] by version index), `FLOW_CTL` (one [`FlowCtl`]).
pub const MAP_FLOW_SLOTS: &str = "FLOW_SLOTS";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_FLOW_VALUES: &str = "FLOW_VALUES";
pub const MAP_FLOW_STATS: &str = "FLOW_STATS";
pub const MAP_FLOW_CTL: &str = "FLOW_CTL";
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the global holding the snap length (bytes of frame captured at most).
pub const GLOBAL_SNAPLEN: &str = "SNAPLEN";
/// Name of the global holding the [`FlowLayout`] of `FLOW_SLOTS`.
pub const GLOBAL_FLOW_LAYOUT: &str = "FLOW_LAYOUT";

/// Number of ring buffers. The XDP program writes to ring `cpu % RING_COUNT`, so on hosts with
/// up to this many CPUs producers never share a ring (and its reservation spinlock).
pub const RING_COUNT: usize = 16;
/// Ring map names, indexed by `cpu % RING_COUNT`.
pub const RING_NAMES: [&str; RING_COUNT] = [
    "RING_0", "RING_1", "RING_2", "RING_3", "RING_4", "RING_5", "RING_6", "RING_7", "RING_8",
    "RING_9", "RING_10", "RING_11", "RING_12", "RING_13", "RING_14", "RING_15",
];

/// Default snap length: bytes of frame (from the Ethernet header) captured at most.
pub const DEFAULT_SNAPLEN: u32 = 1500;
/// Largest snap length the program supports (size of its per-CPU scratch area).
pub const MAX_SNAPLEN: u32 = 2048;
/// Default capacity of the flow table (entries pinned at once).
pub const DEFAULT_MAX_FLOWS: u32 = 65536;
/// Media addresses `FLOW_SLOTS` has a block of ports for, at most.
pub const MAX_FLOW_ADDRS: usize = 4;
/// Largest `FLOW_SLOTS`: every port of every media address.
pub const MAX_FLOW_SLOTS: u32 = MAX_FLOW_ADDRS as u32 * 65536;
/// Version indices reserved beyond the capacity for versions waiting out an RCU grace period
/// before reuse: `max(capacity / VERSION_SPARE_DIV, VERSION_SPARE_MIN)`.
pub const VERSION_SPARE_DIV: u32 = 8;
pub const VERSION_SPARE_MIN: u32 = 256;

/// Entries of `FLOW_VALUES` and `FLOW_STATS` for a flow table of `max_flows` entries: index 0
/// (never used: 0 means "no flow"), the capacity, and the spare versions.
pub const fn flow_versions(max_flows: u32) -> u32 {
    let spare = max_flows / VERSION_SPARE_DIV;
    let spare = if spare < VERSION_SPARE_MIN {
        VERSION_SPARE_MIN
    } else {
        spare
    };
    1 + max_flows + spare
}

/// Which destinations `FLOW_SLOTS` covers: `addr_count` media addresses, each with a block of
/// `port_span` consecutive ports from `port_base`. The slot of (address `i`, port `p`) is
/// `i * port_span + (p - port_base)`. Set once at load (global `FLOW_LAYOUT`, read-only for the
/// program) and kept in `FLOW_CTL` so that a daemon adopting pinned maps indexes them alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLayout {
    /// Media addresses (v4-mapped for IPv4) as two native-endian words each, so the program
    /// compares them with two 8-byte loads. Unused entries are zero.
    pub addrs: [[u64; 2]; MAX_FLOW_ADDRS],
    pub addr_count: u32,
    pub port_base: u32,
    /// Ports per address; 0: no array, every flow is in the `FLOWS` hash.
    pub port_span: u32,
    pub _pad: u32,
}

/// `FLOW_CTL`'s one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtl {
    /// The layout `FLOW_SLOTS` was created for (zero until userspace writes it after creating
    /// the maps).
    pub layout: FlowLayout,
    /// Non-zero while the `FLOWS` hash holds an entry: a packet outside the array is looked up
    /// there only then. One byte, so a concurrent update can never be read half-done.
    pub fallback: u8,
    pub _pad: [u8; 7],
}

/// Key of the flow map: the local (destination) address and UDP port of a pinned stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Destination address, IPv6 or v4-mapped IPv4, network byte order.
    pub addr: [u8; 16],
    /// Destination UDP port.
    pub port: u16,
    /// Must be zero: the kernel hashes the key's raw bytes.
    pub _pad: [u8; 2],
}

/// Forward the packet to the stack after capture (the host also consumes it, or it is routed on).
pub const ACTION_PASS: u8 = 0;
/// Drop the packet after capture: this host is its final consumer.
pub const ACTION_DROP: u8 = 1;

/// `FlowValue::src_match` bit: the source address must equal `remote_addr`.
pub const SRC_MATCH_ADDR: u8 = 1;
/// `FlowValue::src_match` bit: the source port must equal `remote_port`.
pub const SRC_MATCH_PORT: u8 = 2;

/// A version of a flow entry (`FLOW_VALUES[v]`). Written by userspace only while no slot or
/// hash entry refers to `v` and no program run that could have read such a reference is still
/// going (an RCU grace period has passed since the last one was removed): immutable while the
/// program can see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Userspace's id of the stream; copied into every record.
    pub flow_id: u64,
    /// Bumped by userspace on every rewrite of this flow (re-INVITE), copied into every record.
    pub generation: u32,
    /// `ACTION_PASS` or `ACTION_DROP`.
    pub action: u8,
    /// `SRC_MATCH_*` bits; 0 accepts any source ("any" until learned).
    pub src_match: u8,
    /// Expected source port (when `SRC_MATCH_PORT`).
    pub remote_port: u16,
    /// Expected source address, v4-mapped for IPv4 (when `SRC_MATCH_ADDR`).
    pub remote_addr: [u8; 16],
}

/// Per-flow counters (`FLOW_STATS[v]`, per CPU, counted for version `v` of a flow; userspace
/// sums the CPUs and the versions of a flow).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets that matched the flow (right source) and were offered to the ring.
    pub packets: u64,
    /// Wire bytes of those packets.
    pub bytes: u64,
    /// Records lost because the ring was full.
    pub ring_drops: u64,
    /// Packets captured truncated to the snap length.
    pub truncated: u64,
    /// Packets to this flow's port from an unexpected source (counted, not recorded).
    pub wrong_source: u64,
}

/// `RecordHeader::flags` bit: the frame was longer than the snap length.
pub const RECORD_F_TRUNCATED: u16 = 1;

/// Header of every ring record. `cap_len` bytes of the frame follow it, starting at the
/// Ethernet header (the whole frame, so userspace writes an Ethernet-linktype pcap as is).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    pub flow_id: u64,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub generation: u32,
    /// Length of the frame on the wire.
    pub wire_len: u32,
    /// Bytes of frame that follow the header (`min(wire_len, snaplen)`).
    pub cap_len: u32,
    /// Offset of the UDP payload (the RTP header) within the frame.
    pub payload_offset: u16,
    /// `RECORD_F_*` bits.
    pub flags: u16,
}

/// Size of `RecordHeader` in bytes.
pub const RECORD_HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Every frame the program ran on.
    pub const SEEN: u32 = 0;
    /// UDP packets whose destination is in the flow map (any source).
    pub const MATCHED: u32 = 1;
    /// Records written to a ring.
    pub const CAPTURED: u32 = 2;
    /// Records lost because the ring was full.
    pub const RING_FULL: u32 = 3;
    /// Records whose frame was cut to the snap length.
    pub const TRUNCATED: u32 = 4;
    /// Frames whose headers were cut short or malformed.
    pub const PARSE_FAILED: u32 = 5;
    /// Non-first IPv4/IPv6 fragments (no UDP header to match on).
    pub const FRAGMENT_SKIPPED: u32 = 6;
    /// Packets to a pinned port from an unexpected source.
    pub const WRONG_SOURCE: u32 = 7;
    /// Frames that are not IPv4/IPv6 UDP (ARP, TCP, ICMP, ...).
    pub const NOT_UDP: u32 = 8;
    /// Copying packet bytes failed (should never happen; counted to prove it).
    pub const COPY_FAILED: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;
    /// Names, indexed by counter, for logs, metrics and the CLI.
    pub const NAMES: [&str; COUNT as usize] = [
        "seen",
        "matched",
        "captured",
        "ring_full",
        "truncated",
        "parse_failed",
        "fragment_skipped",
        "wrong_source",
        "not_udp",
        "copy_failed",
    ];
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 20);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 32);
const _: () = assert!(core::mem::size_of::<FlowStats>() == 40);
const _: () = assert!(core::mem::size_of::<RecordHeader>() == 32);
const _: () = assert!(core::mem::size_of::<FlowLayout>() == 80);
const _: () = assert!(core::mem::size_of::<FlowCtl>() == 88);
// Userspace maps FLOW_VALUES and FLOW_SLOTS into memory: the kernel strides mmapable arrays by
// the value size rounded up to 8 bytes.
const _: () = assert!(core::mem::size_of::<FlowValue>().is_multiple_of(8));

/// FNV-1a over `bytes`, folded into `hash` (usable in constants).
const fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Fingerprint of the kernel/user layout: this file's text (every type, map name and constant
/// the two sides share) plus the sizes of the shared types. Any edit here, even a comment, gives
/// a new value: pins of an older layout are then never reused by mistake (the kernel does not
/// check a reused pin's key/value sizes against the program's expectations).
pub const LAYOUT_HASH: u64 = {
    let mut h = fnv1a(0xcbf2_9ce4_8422_2325, include_bytes!("abi.rs"));
    let sizes = [
        core::mem::size_of::<FlowKey>() as u32,
        core::mem::size_of::<FlowValue>() as u32,
        core::mem::size_of::<FlowStats>() as u32,
        core::mem::size_of::<RecordHeader>() as u32,
        core::mem::size_of::<FlowLayout>() as u32,
        core::mem::size_of::<FlowCtl>() as u32,
        ABI_VERSION,
        RING_COUNT as u32,
        counter::COUNT,
    ];
    let mut i = 0;
    while i < sizes.len() {
        h = fnv1a(h, &sizes[i].to_le_bytes());
        i += 1;
    }
    h
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all six are repr(C), made only of integers and byte arrays, with no implicit
    // padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::FlowLayout {}
    unsafe impl aya::Pod for super::FlowCtl {}
}
