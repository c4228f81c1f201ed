//! The flow table: which local address/port the XDP program captures, for which flow id.
//!
//! [`FlowControl`] is what signaling uses; `maps::BpfFlowTable` (the only code that writes the
//! BPF flow map) implements it for real, [`MemoryFlows`] in memory for tests of signaling.

use std::{collections::HashMap, net::SocketAddr};

use thiserror::Error;

/// What happens to a captured packet afterwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowAction {
    /// Hand the packet on to the stack (default: harmless if the host also consumes it).
    #[default]
    Pass,
    /// Drop it after capture: the recorder is its final consumer.
    Drop,
}

/// A flow to pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSpec {
    /// Userspace id carried in every record of this flow.
    pub flow_id: u64,
    /// Local (destination) address and UDP port: the map key.
    pub local: SocketAddr,
    /// Expected source; `None` accepts any (the default: clients may send from other ports than
    /// their SDP says). With `Some`, a zero port means "any port from that address".
    pub remote: Option<SocketAddr>,
    pub action: FlowAction,
}

/// Errors of the flow table.
#[derive(Debug, Error)]
pub enum FlowError {
    /// The local address/port is already pinned to another flow.
    #[error("{local} is already pinned to flow {existing}")]
    Conflict { local: SocketAddr, existing: u64 },
    /// No flow is pinned at that address/port.
    #[error("no flow pinned at {0}")]
    NotFound(SocketAddr),
    /// The BPF map refused the operation.
    #[error("flow map {op} failed for {local}: {source}")]
    Map {
        op: &'static str,
        local: SocketAddr,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// Operations signaling performs on the flow table.
pub trait FlowControl: Send {
    /// Pins a new flow. Returns its generation (starts at 1).
    fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError>;
    /// Moves a flow to a new key/remote. The new entry is inserted before the old one is
    /// removed, so no packet falls between. Returns the new generation.
    fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError>;
    /// Unpins the flow at `local`.
    fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError>;
    /// The flow pinned at `local` and its generation, if any (a restarted daemon checks the
    /// flows its restored sessions own against the adopted table).
    fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)>;
    /// Packets captured so far for this flow id (signaling's idle timeout watches it change).
    /// Tables that do not count report 0, which reads as "no RTP".
    fn packets(&self, _flow_id: u64) -> u64 {
        0
    }
    /// Records of this flow id the XDP program could not put in a full ring (read before the
    /// flow's last entry goes: its counters go with it).
    fn ring_drops(&self, _flow_id: u64) -> u64 {
        0
    }
}

/// An in-memory flow table for tests of the signaling layer.
#[derive(Debug, Default)]
pub struct MemoryFlows {
    pub flows: HashMap<SocketAddr, (FlowSpec, u32)>,
}

impl FlowControl for MemoryFlows {
    fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError> {
        if let Some((existing, _)) = self.flows.get(&spec.local) {
            return Err(FlowError::Conflict {
                local: spec.local,
                existing: existing.flow_id,
            });
        }
        self.flows.insert(spec.local, (spec, 1));
        Ok(1)
    }

    fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError> {
        let (_, generation) = *self
            .flows
            .get(&old_local)
            .ok_or(FlowError::NotFound(old_local))?;
        if new.local != old_local {
            if let Some((existing, _)) = self.flows.get(&new.local) {
                return Err(FlowError::Conflict {
                    local: new.local,
                    existing: existing.flow_id,
                });
            }
        }
        self.flows.insert(new.local, (new, generation + 1));
        if new.local != old_local {
            self.flows.remove(&old_local);
        }
        Ok(generation + 1)
    }

    fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError> {
        self.flows
            .remove(&local)
            .map(|_| ())
            .ok_or(FlowError::NotFound(local))
    }

    fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        self.flows.get(&local).copied()
    }
}

pub mod maps;
