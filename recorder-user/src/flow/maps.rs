//! The only code that writes the XDP flow map.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap, PerCpuValues};
use recorder_ebpf::abi::{self, FlowKey, FlowStats, FlowValue};

use super::{FlowAction, FlowControl, FlowError, FlowSpec};
use crate::capture::loader::CaptureError;

/// A pinned flow as userspace knows it, with the kernel's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub spec: FlowSpec,
    pub generation: u32,
    pub stats: FlowStats,
}

/// The BPF flow map plus the per-flow stats map.
pub struct BpfFlowTable {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    stats: PerCpuHashMap<MapData, u64, FlowStats>,
    /// What we pinned, by local address (the map holds the same, this avoids syscalls to read).
    /// Starts as the kernel map's content: empty, or a previous daemon's flows when adopted.
    pinned: StdHashMap<SocketAddr, (FlowSpec, u32)>,
    /// Entries in `pinned` per flow id: a flow's counters go when its last entry goes (they
    /// leaked before, and a full stats map refused every new flow after ~65 000 of them).
    refs: StdHashMap<u64, u32>,
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
    pub(crate) fn new(flows: Map, stats: Map) -> Result<Self, CaptureError> {
        let flows = HashMap::try_from(flows).map_err(|source| CaptureError::Map {
            name: abi::MAP_FLOWS,
            source,
        })?;
        let stats = PerCpuHashMap::try_from(stats).map_err(|source| CaptureError::Map {
            name: abi::MAP_FLOW_STATS,
            source,
        })?;
        let mut table = Self {
            flows,
            stats,
            pinned: StdHashMap::new(),
            refs: StdHashMap::new(),
            cpus: crate::capture::loader::possible_cpus()?,
        };
        // An adopted map holds the previous daemon's flows: they are ours now.
        for (local, value) in table.kernel_entries() {
            table.pin(spec_of(local, &value), value.generation);
        }
        Ok(table)
    }

    /// The flow pinned at `local` and its generation (from the userspace mirror).
    pub fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        self.pinned.get(&local).copied()
    }

    /// The largest flow id in the table (adopted flows included), so new ids can follow it.
    pub fn max_flow_id(&self) -> Option<u64> {
        self.pinned.values().map(|(spec, _)| spec.flow_id).max()
    }

    /// Keeps the flows for which `keep(spec, generation)` is true and removes the others from
    /// the kernel map (after adoption: flows of sessions the new daemon does not restore).
    /// Counters of flow ids no longer pinned are dropped too. Returns the removed flows.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&FlowSpec, u32) -> bool,
    ) -> Result<Vec<FlowSpec>, FlowError> {
        let mut gone: Vec<FlowSpec> = self
            .pinned
            .values()
            .filter(|(spec, generation)| !keep(spec, *generation))
            .map(|(spec, _)| *spec)
            .collect();
        gone.sort_by_key(|s| s.local);
        for spec in &gone {
            self.remove(spec.local)?;
        }
        Ok(gone)
    }

    /// Records `spec` in the mirror (replacing what was at its address).
    fn pin(&mut self, spec: FlowSpec, generation: u32) {
        // Counted before the replaced entry is released: same flow id, same counters.
        *self.refs.entry(spec.flow_id).or_default() += 1;
        if let Some((old, _)) = self.pinned.insert(spec.local, (spec, generation)) {
            self.release(old.flow_id);
        }
    }

    /// Drops `local` from the mirror.
    fn unpin(&mut self, local: SocketAddr) -> Option<FlowSpec> {
        let (spec, _) = self.pinned.remove(&local)?;
        self.release(spec.flow_id);
        Some(spec)
    }

    /// One entry of `flow_id` fewer; the last one takes the flow's counters along.
    fn release(&mut self, flow_id: u64) {
        match self.refs.get_mut(&flow_id) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.refs.remove(&flow_id);
                self.forget_stats(flow_id);
            }
        }
    }

    /// Flow ids with counters in the kernel (tests: nothing leaks).
    pub fn stats_entries(&self) -> usize {
        self.stats.keys().count()
    }

    fn map_err(
        op: &'static str,
        local: SocketAddr,
    ) -> impl FnOnce(aya::maps::MapError) -> FlowError {
        move |source| FlowError::Map {
            op,
            local,
            source: Box::new(source),
        }
    }

    fn write(&mut self, spec: &FlowSpec, generation: u32) -> Result<(), FlowError> {
        self.flows
            .insert(flow_key(spec.local), flow_value(spec, generation), 0)
            .map_err(Self::map_err("insert", spec.local))
    }

    /// Summed kernel counters of a flow (zero if it has none yet).
    pub fn stats(&self, flow_id: u64) -> FlowStats {
        match self.stats.get(&flow_id, 0) {
            Ok(values) => values.iter().fold(FlowStats::default(), |mut sum, v| {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
                sum.ring_drops += v.ring_drops;
                sum.truncated += v.truncated;
                sum.wrong_source += v.wrong_source;
                sum
            }),
            Err(_) => FlowStats::default(),
        }
    }

    /// Forgets a flow's counters (after its recording has read them for the last time).
    pub fn forget_stats(&mut self, flow_id: u64) {
        let _ = self.stats.remove(&flow_id);
    }

    /// Every flow we pinned, with its counters, ordered by local address.
    pub fn list(&self) -> Vec<FlowEntry> {
        let mut entries: Vec<FlowEntry> = self
            .pinned
            .values()
            .map(|(spec, generation)| FlowEntry {
                spec: *spec,
                generation: *generation,
                stats: self.stats(spec.flow_id),
            })
            .collect();
        entries.sort_by_key(|e| e.spec.local);
        entries
    }

    /// The flow map as the kernel holds it (local address, value), for `recorder flows`.
    pub fn kernel_entries(&self) -> Vec<(SocketAddr, FlowValue)> {
        let mut out: Vec<(SocketAddr, FlowValue)> = self
            .flows
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (SocketAddr::new(unmapped(k.addr), k.port), v))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }
}

impl FlowControl for BpfFlowTable {
    fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError> {
        if let Some((existing, _)) = self.pinned.get(&spec.local) {
            return Err(FlowError::Conflict {
                local: spec.local,
                existing: existing.flow_id,
            });
        }
        // Stats first, so the program's first packet finds the entry. Existing counters of the
        // same flow id (another port of the same stream) are kept.
        if self.stats.get(&spec.flow_id, 0).is_err() {
            let zeros = PerCpuValues::try_from(vec![FlowStats::default(); self.cpus])
                .expect("one value per possible CPU");
            self.stats
                .insert(spec.flow_id, zeros, 0)
                .map_err(Self::map_err("stats insert", spec.local))?;
        }
        self.write(&spec, 1)?;
        self.pin(spec, 1);
        Ok(1)
    }

    fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError> {
        let (_, generation) = *self
            .pinned
            .get(&old_local)
            .ok_or(FlowError::NotFound(old_local))?;
        if new.local != old_local {
            if let Some((existing, _)) = self.pinned.get(&new.local) {
                return Err(FlowError::Conflict {
                    local: new.local,
                    existing: existing.flow_id,
                });
            }
        }
        let generation = generation.wrapping_add(1);
        // Make before break: the new key is live before the old one goes, so a packet on
        // either is captured. Same key: the kernel swaps the value atomically (no-prealloc map).
        self.write(&new, generation)?;
        // The new entry is counted before the old one goes, so a flow id kept across the
        // rewrite keeps its counters.
        self.pin(new, generation);
        if new.local != old_local {
            self.flows
                .remove(&flow_key(old_local))
                .map_err(Self::map_err("remove", old_local))?;
            self.unpin(old_local);
        }
        Ok(generation)
    }

    fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError> {
        if !self.pinned.contains_key(&local) {
            return Err(FlowError::NotFound(local));
        }
        let removed = self
            .flows
            .remove(&flow_key(local))
            .map_err(Self::map_err("remove", local));
        self.unpin(local);
        removed
    }

    fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        self.pinned.get(&local).copied()
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
