//! The only code that writes the XDP flow table.
//!
//! Kernel side (see `recorder-ebpf/src/abi.rs` and "Flow table" in `recorder-ebpf/README.md`): a
//! key (local address, port) refers to a *version*, an index into `FLOW_VALUES` (the entry:
//! flow id, generation, action, source filter) and `FLOW_STATS` (its per-CPU counters). Keys
//! of the configured media addresses and RTP port range are words of the `FLOW_SLOTS` array
//! (index = address block * span + port - base), others entries of the `FLOWS` hash.
//!
//! Torn reads are ruled out by never changing what the program may be reading: every insert or
//! rewrite writes a fresh version, which is published by storing its index into the key's slot
//! word (one aligned 8-byte store through our mmap of the array) or hash entry (the kernel
//! swaps the element under RCU). A version that lost its last key waits in `pending` until an
//! RCU grace period has passed (`membarrier(MEMBARRIER_CMD_GLOBAL)`, i.e. `synchronize_rcu`:
//! every program run that could have read its index has finished); only then are its final
//! counters added to its flow's, its counters zeroed and the version reused. Grace periods are
//! taken in batches, when no clean version is left (at least `VERSION_SPARE_MIN` versions are
//! spare), so a rewrite costs no wait in the common case.

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use recorder_ebpf::abi::{self, FlowCtl, FlowKey, FlowLayout, FlowStats, FlowValue};
use tracing::warn;

use super::{FlowAction, FlowControl, FlowError, FlowSpec};
use crate::capture::loader::{addr_words, CaptureError};

/// A pinned flow as userspace knows it, with the kernel's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub spec: FlowSpec,
    pub generation: u32,
    pub stats: FlowStats,
}

/// The flow table's maps, as taken from the loaded object.
pub struct FlowMaps {
    pub slots: Map,
    pub hash: Map,
    pub values: Map,
    pub stats: Map,
    pub ctl: Map,
}

/// Where a key lives in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Index into `FLOW_SLOTS`.
    Slot(u32),
    /// Key of the `FLOWS` hash.
    Hash(FlowKey),
}

/// What we pinned at a local address.
#[derive(Clone, Copy, Debug)]
struct Pinned {
    spec: FlowSpec,
    generation: u32,
    version: u32,
}

/// A flow id's counters: its versions still counted in the kernel (published or pending) plus
/// what versions already reused had counted.
#[derive(Debug, Default)]
struct FlowCounters {
    /// Told apart from an earlier flow of the same id whose counters were forgotten (its
    /// pending versions must not count for this one).
    incarnation: u64,
    /// Entries in the table with this flow id: the counters go with the last one.
    refs: u32,
    versions: Vec<u32>,
    retired: FlowStats,
}

/// A shared mapping of an mmapable BPF array.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through `&self`/`&mut self` methods of
// the owning table.
unsafe impl Send for Mmap {}

impl Mmap {
    fn new(map: &MapData, bytes: usize) -> io::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The BPF flow table: slot array, fallback hash, versions and their counters.
pub struct BpfFlowTable {
    /// `FLOW_SLOTS`, mapped: `slot_count` aligned 8-byte words.
    slots: Mmap,
    slot_count: u32,
    /// `FLOW_VALUES`, mapped: `version_count` values.
    values: Mmap,
    version_count: u32,
    hash: HashMap<MapData, FlowKey, u32>,
    stats: PerCpuArray<MapData, FlowStats>,
    ctl: Array<MapData, FlowCtl>,
    /// The maps stay open as long as their mappings (the mappings would keep them alive anyway).
    _slots_map: MapData,
    _values_map: MapData,
    layout: FlowLayout,
    /// Entries pinned at once, at most (the hash's size: `max_flows`).
    capacity: usize,
    /// What we pinned, by local address (the maps hold the same; this avoids syscalls to read).
    /// Starts as the kernel's content: empty, or a previous daemon's flows when adopted.
    pinned: StdHashMap<SocketAddr, Pinned>,
    counters: StdHashMap<u64, FlowCounters>,
    next_incarnation: u64,
    /// Per version: the flow id (and incarnation) it counts for while published or pending.
    owner: Vec<Option<(u64, u64)>>,
    /// Versions free to write: never published, or reclaimed after a grace period.
    clean: Vec<u32>,
    /// Versions no key refers to any more, waiting for a grace period.
    pending: Vec<u32>,
    hash_entries: usize,
    fallback: bool,
    grace_periods: u64,
    cpus: usize,
}

/// IPv4 as v4-mapped IPv6, as the XDP program looks it up.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`mapped`].
pub fn unmapped(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The map key of a local address.
pub fn flow_key(local: SocketAddr) -> FlowKey {
    FlowKey {
        addr: mapped(local.ip()),
        port: local.port(),
        _pad: [0; 2],
    }
}

fn flow_value(spec: &FlowSpec, generation: u32) -> FlowValue {
    let (src_match, remote_addr, remote_port) = match spec.remote {
        None => (0, [0; 16], 0),
        Some(remote) => {
            let port_bit = if remote.port() != 0 {
                abi::SRC_MATCH_PORT
            } else {
                0
            };
            (
                abi::SRC_MATCH_ADDR | port_bit,
                mapped(remote.ip()),
                remote.port(),
            )
        }
    };
    FlowValue {
        flow_id: spec.flow_id,
        generation,
        action: match spec.action {
            FlowAction::Pass => abi::ACTION_PASS,
            FlowAction::Drop => abi::ACTION_DROP,
        },
        src_match,
        remote_port,
        remote_addr,
    }
}

/// Inverse of [`flow_value`]: the spec and generation a map entry was written from.
fn spec_of(local: SocketAddr, value: &FlowValue) -> FlowSpec {
    let remote = (value.src_match & abi::SRC_MATCH_ADDR != 0).then(|| {
        let port = if value.src_match & abi::SRC_MATCH_PORT != 0 {
            value.remote_port
        } else {
            0
        };
        SocketAddr::new(unmapped(value.remote_addr), port)
    });
    FlowSpec {
        flow_id: value.flow_id,
        local,
        remote,
        action: if value.action == abi::ACTION_DROP {
            FlowAction::Drop
        } else {
            FlowAction::Pass
        },
    }
}

impl BpfFlowTable {
    pub(crate) fn new(maps: FlowMaps, layout: FlowLayout) -> Result<Self, CaptureError> {
        let wrong = |name: &'static str| CaptureError::Map {
            name,
            source: MapError::InvalidMapType { map_type: 0 },
        };
        let map_err = |name: &'static str| move |source| CaptureError::Map { name, source };
        let Map::Array(slots_map) = maps.slots else {
            return Err(wrong(abi::MAP_FLOW_SLOTS));
        };
        let Map::Array(values_map) = maps.values else {
            return Err(wrong(abi::MAP_FLOW_VALUES));
        };
        let Map::HashMap(hash_map) = maps.hash else {
            return Err(wrong(abi::MAP_FLOWS));
        };
        let slot_count = slots_map
            .info()
            .map_err(map_err(abi::MAP_FLOW_SLOTS))?
            .max_entries();
        let version_count = values_map
            .info()
            .map_err(map_err(abi::MAP_FLOW_VALUES))?
            .max_entries();
        let capacity = hash_map
            .info()
            .map_err(map_err(abi::MAP_FLOWS))?
            .max_entries() as usize;
        if slot_count < crate::capture::loader::layout_slots(&layout) {
            return Err(CaptureError::BadFlowLayout(format!(
                "{} slots for a layout of {}",
                slot_count,
                crate::capture::loader::layout_slots(&layout)
            )));
        }
        let slots = Mmap::new(&slots_map, slot_count as usize * size_of::<u64>())
            .map_err(|e| map_err(abi::MAP_FLOW_SLOTS)(MapError::IoError(e)))?;
        let values = Mmap::new(&values_map, version_count as usize * size_of::<FlowValue>())
            .map_err(|e| map_err(abi::MAP_FLOW_VALUES)(MapError::IoError(e)))?;
        let hash = HashMap::try_from(Map::HashMap(hash_map)).map_err(map_err(abi::MAP_FLOWS))?;
        let stats = PerCpuArray::try_from(maps.stats).map_err(map_err(abi::MAP_FLOW_STATS))?;
        let ctl = Array::try_from(maps.ctl).map_err(map_err(abi::MAP_FLOW_CTL))?;
        let mut table = Self {
            slots,
            slot_count,
            values,
            version_count,
            hash,
            stats,
            ctl,
            _slots_map: slots_map,
            _values_map: values_map,
            layout,
            capacity,
            pinned: StdHashMap::new(),
            counters: StdHashMap::new(),
            next_incarnation: 0,
            owner: vec![None; version_count as usize],
            clean: Vec::new(),
            pending: Vec::new(),
            hash_entries: 0,
            fallback: false,
            grace_periods: 0,
            cpus: crate::capture::loader::possible_cpus()?,
        };
        table.fallback = table
            .ctl
            .get(&0, 0)
            .map_err(map_err(abi::MAP_FLOW_CTL))?
            .fallback
            != 0;
        // An adopted table holds the previous daemon's flows: they are ours now.
        let mut used = vec![false; version_count as usize];
        for (local, version) in table.kernel_refs() {
            let Some(value) = table.value(version) else {
                continue;
            };
            used[version as usize] = true;
            let spec = spec_of(local, &value);
            table.acquire(spec.flow_id);
            table.own(version, spec.flow_id);
            if matches!(table.place(local), Place::Hash(_)) {
                table.hash_entries += 1;
            }
            table.pinned.insert(
                local,
                Pinned {
                    spec,
                    generation: value.generation,
                    version,
                },
            );
        }
        // The rest: clean (never written, or reclaimed), or left pending by the previous daemon
        // (still counting for its flow if that is pinned; reclaimed after a grace period).
        for version in (1..version_count).rev() {
            if used[version as usize] {
                continue;
            }
            match table.value(version) {
                Some(v) if v != FlowValue::default() => {
                    if table.counters.contains_key(&v.flow_id) {
                        table.own(version, v.flow_id);
                    }
                    table.pending.push(version);
                }
                _ => table.clean.push(version),
            }
        }
        Ok(table)
    }

    /// The flow pinned at `local` and its generation (from the userspace mirror).
    pub fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        self.pinned.get(&local).map(|p| (p.spec, p.generation))
    }

    /// The largest flow id in the table (adopted flows included), so new ids can follow it.
    pub fn max_flow_id(&self) -> Option<u64> {
        self.pinned.values().map(|p| p.spec.flow_id).max()
    }

    /// Keeps the flows for which `keep(spec, generation)` is true and removes the others from
    /// the kernel (after adoption: flows of sessions the new daemon does not restore).
    /// Counters of flow ids no longer pinned are dropped too. Returns the removed flows.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&FlowSpec, u32) -> bool,
    ) -> Result<Vec<FlowSpec>, FlowError> {
        let mut gone: Vec<FlowSpec> = self
            .pinned
            .values()
            .filter(|p| !keep(&p.spec, p.generation))
            .map(|p| p.spec)
            .collect();
        gone.sort_by_key(|s| s.local);
        for spec in &gone {
            self.remove(spec.local)?;
        }
        Ok(gone)
    }

    /// Flow ids with counters kept (tests: nothing leaks).
    pub fn stats_entries(&self) -> usize {
        self.counters.len()
    }

    /// RCU grace periods waited for so far (each reclaims a batch of versions).
    pub fn grace_periods(&self) -> u64 {
        self.grace_periods
    }

    /// Whether `local` is found by array index (else it goes to the fallback hash).
    pub fn in_array(&self, local: SocketAddr) -> bool {
        matches!(self.place(local), Place::Slot(_))
    }

    /// Summed kernel counters of a flow (zero if it has none): over the CPUs and over every
    /// version the flow had (a rewrite starts a new version).
    pub fn stats(&self, flow_id: u64) -> FlowStats {
        let Some(c) = self.counters.get(&flow_id) else {
            return FlowStats::default();
        };
        c.versions
            .iter()
            .fold(c.retired, |sum, &v| add(sum, self.version_stats(v)))
    }

    /// Forgets a flow's counters (after its recording has read them for the last time).
    pub fn forget_stats(&mut self, flow_id: u64) {
        self.counters.remove(&flow_id);
    }

    /// Every flow we pinned, with its counters, ordered by local address.
    pub fn list(&self) -> Vec<FlowEntry> {
        let mut entries: Vec<FlowEntry> = self
            .pinned
            .values()
            .map(|p| FlowEntry {
                spec: p.spec,
                generation: p.generation,
                stats: self.stats(p.spec.flow_id),
            })
            .collect();
        entries.sort_by_key(|e| e.spec.local);
        entries
    }

    /// The flow table as the kernel holds it (local address, value), for `recorder flows`.
    pub fn kernel_entries(&self) -> Vec<(SocketAddr, FlowValue)> {
        let mut out: Vec<(SocketAddr, FlowValue)> = self
            .kernel_refs()
            .into_iter()
            .filter_map(|(local, v)| Some((local, self.value(v)?)))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Every key the kernel maps to a version: slot words, then hash entries.
    fn kernel_refs(&self) -> Vec<(SocketAddr, u32)> {
        let mut out = Vec::new();
        let span = self.layout.port_span;
        if span > 0 {
            for i in 0..(self.layout.addr_count * span).min(self.slot_count) {
                let word = self.slot(i).load(Ordering::Acquire);
                if word != 0 {
                    let addr = self.layout.addrs[(i / span) as usize];
                    let mut bytes = [0u8; 16];
                    bytes[..8].copy_from_slice(&addr[0].to_ne_bytes());
                    bytes[8..].copy_from_slice(&addr[1].to_ne_bytes());
                    let port = (self.layout.port_base + i % span) as u16;
                    out.push((SocketAddr::new(unmapped(bytes), port), word as u32));
                }
            }
        }
        out.extend(
            self.hash
                .iter()
                .filter_map(|r| r.ok())
                .map(|(k, v)| (SocketAddr::new(unmapped(k.addr), k.port), v)),
        );
        out
    }

    fn slot(&self, index: u32) -> &AtomicU64 {
        assert!(index < self.slot_count);
        // SAFETY: in bounds of the mapping (asserted); the kernel aligns array values to 8 bytes
        // and the mapping to a page; AtomicU64 has u64's layout.
        unsafe {
            &*self
                .slots
                .ptr
                .as_ptr()
                .cast::<AtomicU64>()
                .add(index as usize)
        }
    }

    /// `FLOW_VALUES[version]` as the kernel holds it.
    fn value(&self, version: u32) -> Option<FlowValue> {
        if version == 0 || version >= self.version_count {
            return None;
        }
        // SAFETY: in bounds of the mapping; FlowValue is plain data (any bits valid).
        Some(unsafe {
            std::ptr::read_volatile(
                self.values
                    .ptr
                    .as_ptr()
                    .cast::<FlowValue>()
                    .add(version as usize),
            )
        })
    }

    /// Writes `FLOW_VALUES[version]`. Only for versions no key refers to and no program run
    /// can still be reading (clean ones).
    fn set_value(&mut self, version: u32, value: FlowValue) {
        assert!(version > 0 && version < self.version_count);
        // SAFETY: in bounds of the mapping; no reader (see above).
        unsafe {
            std::ptr::write_volatile(
                self.values
                    .ptr
                    .as_ptr()
                    .cast::<FlowValue>()
                    .add(version as usize),
                value,
            )
        };
    }

    fn version_stats(&self, version: u32) -> FlowStats {
        match self.stats.get(&version, 0) {
            Ok(values) => values.iter().fold(FlowStats::default(), |s, v| add(s, *v)),
            Err(_) => FlowStats::default(),
        }
    }

    fn place(&self, local: SocketAddr) -> Place {
        let l = &self.layout;
        let off = u32::from(local.port()).wrapping_sub(l.port_base);
        if off < l.port_span {
            let words = addr_words(mapped(local.ip()));
            if let Some(block) = l.addrs[..l.addr_count as usize]
                .iter()
                .position(|a| *a == words)
            {
                return Place::Slot(block as u32 * l.port_span + off);
            }
        }
        Place::Hash(flow_key(local))
    }

    /// One more entry with `flow_id` (its counters start at zero if it had none).
    fn acquire(&mut self, flow_id: u64) {
        let next = &mut self.next_incarnation;
        let c = self.counters.entry(flow_id).or_insert_with(|| {
            *next += 1;
            FlowCounters {
                incarnation: *next,
                ..FlowCounters::default()
            }
        });
        c.refs += 1;
    }

    /// One entry of `flow_id` fewer; the last one takes the flow's counters along.
    fn release(&mut self, flow_id: u64) {
        if let Some(c) = self.counters.get_mut(&flow_id) {
            c.refs = c.refs.saturating_sub(1);
            if c.refs == 0 {
                self.counters.remove(&flow_id);
            }
        }
    }

    /// `version` counts for `flow_id` from now on.
    fn own(&mut self, version: u32, flow_id: u64) {
        if let Some(c) = self.counters.get_mut(&flow_id) {
            c.versions.push(version);
            self.owner[version as usize] = Some((flow_id, c.incarnation));
        }
    }

    /// A clean version for a new entry: waits for a grace period to reclaim the pending ones
    /// when none is left.
    fn alloc(&mut self, local: SocketAddr) -> Result<u32, FlowError> {
        if self.clean.is_empty() {
            self.reclaim().map_err(Self::map_err("reclaim", local))?;
        }
        self.clean.pop().ok_or_else(|| FlowError::Map {
            op: "insert",
            local,
            source: Box::new(MapError::IoError(io::Error::new(
                io::ErrorKind::StorageFull,
                "no flow version free",
            ))),
        })
    }

    /// Writes a new version of `spec` into a clean version index.
    fn write_version(&mut self, spec: &FlowSpec, generation: u32) -> Result<u32, FlowError> {
        let version = self.alloc(spec.local)?;
        self.set_value(version, flow_value(spec, generation));
        self.own(version, spec.flow_id);
        Ok(version)
    }

    /// Gives back a version that was never published (clean again at once).
    fn discard(&mut self, version: u32) {
        self.disown(version);
        self.set_value(version, FlowValue::default());
        self.clean.push(version);
    }

    fn disown(&mut self, version: u32) -> Option<&mut FlowCounters> {
        let (flow_id, incarnation) = self.owner[version as usize].take()?;
        let c = self
            .counters
            .get_mut(&flow_id)
            .filter(|c| c.incarnation == incarnation)?;
        c.versions.retain(|v| *v != version);
        Some(c)
    }

    /// Waits for an RCU grace period, then reclaims every pending version: adds its final
    /// counters to its flow's (nothing can count into it any more), zeroes them and its value.
    fn reclaim(&mut self) -> Result<(), MapError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.pending);
        synchronize_rcu();
        self.grace_periods += 1;
        let cpus = self.cpus;
        let zeros = move || {
            PerCpuValues::try_from(vec![FlowStats::default(); cpus])
                .expect("one value per possible CPU")
        };
        while let Some(version) = batch.pop() {
            let last = self.version_stats(version);
            if let Some(c) = self.disown(version) {
                c.retired = add(c.retired, last);
            }
            if let Err(e) = self.stats.set(version, zeros(), 0) {
                // Not reusable without zeroed counters: try again with the next batch.
                self.pending.push(version);
                self.pending.extend(batch);
                return Err(e);
            }
            // Zeroed value = clean, also for a daemon adopting the maps after us.
            self.set_value(version, FlowValue::default());
            self.clean.push(version);
        }
        Ok(())
    }

    fn map_err(op: &'static str, local: SocketAddr) -> impl FnOnce(MapError) -> FlowError {
        move |source| FlowError::Map {
            op,
            local,
            source: Box::new(source),
        }
    }

    /// Makes `place` refer to `version`. `replace`: the key refers to another version now.
    fn publish(&mut self, place: Place, version: u32, replace: bool) -> Result<(), MapError> {
        match place {
            Place::Slot(i) => {
                // Release: the version's value is visible before the index that names it.
                self.slot(i).store(u64::from(version), Ordering::Release);
                Ok(())
            }
            Place::Hash(key) => {
                // The flag first: a packet that finds the entry must be looking there.
                self.set_fallback(true)?;
                self.hash.insert(key, version, 0)?;
                if !replace {
                    self.hash_entries += 1;
                }
                Ok(())
            }
        }
    }

    /// Makes `place` refer to nothing.
    fn unpublish(&mut self, place: Place) -> Result<(), MapError> {
        match place {
            Place::Slot(i) => {
                self.slot(i).store(0, Ordering::Release);
                Ok(())
            }
            Place::Hash(key) => {
                self.hash.remove(&key)?;
                self.hash_entries = self.hash_entries.saturating_sub(1);
                if self.hash_entries == 0 {
                    self.set_fallback(false)?;
                }
                Ok(())
            }
        }
    }

    /// Sets `FLOW_CTL.fallback`. The update copies the whole element, but only this byte
    /// differs, so a concurrent reader sees every other byte unchanged.
    fn set_fallback(&mut self, on: bool) -> Result<(), MapError> {
        if self.fallback == on {
            return Ok(());
        }
        let mut ctl = self.ctl.get(&0, 0)?;
        ctl.fallback = u8::from(on);
        self.ctl.set(0, ctl, 0)?;
        self.fallback = on;
        Ok(())
    }
}

/// Waits for an RCU grace period: every XDP program run that started before the call has
/// finished when it returns (XDP runs in softirq or with bottom halves off: an RCU read-side
/// section). `MEMBARRIER_CMD_GLOBAL` is `synchronize_rcu()` (the BPF selftests' kern_sync_rcu
/// relies on the same); it fails on nohz_full kernels, where we sleep instead: a program run
/// takes microseconds.
fn synchronize_rcu() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: no pointers involved.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let error = io::Error::last_os_error();
        WARNED.call_once(|| {
            warn!(%error, "membarrier(MEMBARRIER_CMD_GLOBAL) failed: flow versions are reused after a 100 ms sleep instead of an RCU grace period");
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn add(a: FlowStats, b: FlowStats) -> FlowStats {
    FlowStats {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        ring_drops: a.ring_drops + b.ring_drops,
        truncated: a.truncated + b.truncated,
        wrong_source: a.wrong_source + b.wrong_source,
    }
}

impl FlowControl for BpfFlowTable {
    fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError> {
        if let Some(existing) = self.pinned.get(&spec.local) {
            return Err(FlowError::Conflict {
                local: spec.local,
                existing: existing.spec.flow_id,
            });
        }
        if self.pinned.len() >= self.capacity {
            return Err(FlowError::Map {
                op: "insert",
                local: spec.local,
                source: Box::new(MapError::IoError(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("flow table full ({} entries)", self.capacity),
                ))),
            });
        }
        // Counted first: existing counters of the same flow id (another port of the same
        // stream) are kept.
        self.acquire(spec.flow_id);
        let version = match self.write_version(&spec, 1) {
            Ok(v) => v,
            Err(e) => {
                self.release(spec.flow_id);
                return Err(e);
            }
        };
        if let Err(e) = self.publish(self.place(spec.local), version, false) {
            self.discard(version);
            self.release(spec.flow_id);
            return Err(Self::map_err("insert", spec.local)(e));
        }
        self.pinned.insert(
            spec.local,
            Pinned {
                spec,
                generation: 1,
                version,
            },
        );
        Ok(1)
    }

    fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError> {
        let old = *self
            .pinned
            .get(&old_local)
            .ok_or(FlowError::NotFound(old_local))?;
        let same_key = new.local == old_local;
        if !same_key {
            if let Some(existing) = self.pinned.get(&new.local) {
                return Err(FlowError::Conflict {
                    local: new.local,
                    existing: existing.spec.flow_id,
                });
            }
        }
        let generation = old.generation.wrapping_add(1);
        // The new entry is counted before the old one goes, so a flow id kept across the
        // rewrite keeps its counters.
        self.acquire(new.flow_id);
        let version = match self.write_version(&new, generation) {
            Ok(v) => v,
            Err(e) => {
                self.release(new.flow_id);
                return Err(e);
            }
        };
        // Make before break: the new key (or the same key's new version) is live before the
        // old one goes, so a packet on either is captured, with the generation of the version
        // it found.
        if let Err(e) = self.publish(self.place(new.local), version, same_key) {
            self.discard(version);
            self.release(new.flow_id);
            return Err(Self::map_err("insert", new.local)(e));
        }
        self.pinned.insert(
            new.local,
            Pinned {
                spec: new,
                generation,
                version,
            },
        );
        if !same_key {
            self.unpublish(self.place(old_local))
                .map_err(Self::map_err("remove", old_local))?;
            self.pinned.remove(&old_local);
        }
        self.pending.push(old.version);
        self.release(old.spec.flow_id);
        Ok(generation)
    }

    fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError> {
        let old = *self.pinned.get(&local).ok_or(FlowError::NotFound(local))?;
        let removed = self
            .unpublish(self.place(local))
            .map_err(Self::map_err("remove", local));
        self.pinned.remove(&local);
        if removed.is_ok() {
            self.pending.push(old.version);
        }
        // (If the kernel refused, the version may still be referenced: it is never reused.)
        self.release(old.spec.flow_id);
        removed
    }

    fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        BpfFlowTable::lookup(self, local)
    }

    fn packets(&self, flow_id: u64) -> u64 {
        self.stats(flow_id).packets
    }

    fn ring_drops(&self, flow_id: u64) -> u64 {
        self.stats(flow_id).ring_drops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_v4_mapped_with_zero_padding() {
        let key = flow_key("10.1.2.3:40000".parse().unwrap());
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(key.port, 40000);
        assert_eq!(key._pad, [0, 0]);
        assert_eq!(unmapped(key.addr), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(unmapped(mapped(v6)), v6);
    }

    #[test]
    fn values_decode_back_to_their_spec() {
        let local: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        for remote in [None, Some("10.0.0.1:0"), Some("[fd00::1]:5004")] {
            for action in [FlowAction::Pass, FlowAction::Drop] {
                let spec = FlowSpec {
                    flow_id: 42,
                    local,
                    remote: remote.map(|r| r.parse().unwrap()),
                    action,
                };
                let value = flow_value(&spec, 7);
                assert_eq!(spec_of(local, &value), spec);
                assert_eq!(value.generation, 7);
            }
        }
    }

    #[test]
    fn values_encode_source_matching() {
        let any = FlowSpec {
            flow_id: 9,
            local: "10.0.0.2:4000".parse().unwrap(),
            remote: None,
            action: FlowAction::Drop,
        };
        let v = flow_value(&any, 3);
        assert_eq!(
            (v.flow_id, v.generation, v.src_match, v.action),
            (9, 3, 0, abi::ACTION_DROP)
        );
        let addr_only = FlowSpec {
            remote: Some("10.0.0.1:0".parse().unwrap()),
            ..any
        };
        assert_eq!(flow_value(&addr_only, 1).src_match, abi::SRC_MATCH_ADDR);
        let both = FlowSpec {
            remote: Some("10.0.0.1:5004".parse().unwrap()),
            ..any
        };
        let v = flow_value(&both, 1);
        assert_eq!(v.src_match, abi::SRC_MATCH_ADDR | abi::SRC_MATCH_PORT);
        assert_eq!(v.remote_port, 5004);
    }
}
