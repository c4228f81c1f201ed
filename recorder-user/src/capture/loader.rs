//! Loading the XDP object, attaching it to interfaces, and handing out its maps.

use std::fmt;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use recorder_ebpf::abi;
use thiserror::Error;
use tracing::{info, warn};

use crate::flow::maps::BpfFlowTable;

/// The XDP object built by `cargo xtask build`, embedded at compile time (empty if it was not
/// built; loading then fails with [`CaptureError::ObjectMissing`]).
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/recorder-xdp.o"));

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode with a warning.
    #[default]
    Auto,
    /// Native only.
    Native,
    /// Generic (skb) only.
    Generic,
}

/// The mode an interface ended up attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachedMode {
    Native,
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// Capture settings.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bytes of frame captured at most (1..=`abi::MAX_SNAPLEN`).
    pub snaplen: u32,
    /// Size of each CPU's ring buffer in bytes (rounded up to a power-of-two number of pages).
    pub ring_bytes: u32,
    /// Capacity of the flow map.
    pub max_flows: u32,
    pub attach_mode: AttachMode,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            snaplen: abi::DEFAULT_SNAPLEN,
            ring_bytes: 8 << 20,
            max_flows: abi::DEFAULT_MAX_FLOWS,
            attach_mode: AttachMode::Auto,
        }
    }
}

/// Errors of the capture layer.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("the XDP object was not built into this binary: run `cargo xtask build`")]
    ObjectMissing,
    #[error("snap length {0} is outside 1..={max}", max = abi::MAX_SNAPLEN)]
    BadSnaplen(u32),
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching XDP to {interface} ({mode}) failed: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name} missing from the XDP object")]
    MapMissing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("counting CPUs: {0}")]
    Cpus(String),
    #[error("epoll: {0}")]
    Epoll(#[source] std::io::Error),
}

/// The loaded XDP program and its attachments.
pub struct Capture {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId, AttachedMode)>,
}

/// Number of possible CPUs (ring `i` is written by CPUs `i, i + RING_COUNT, ...`).
pub fn possible_cpus() -> Result<usize, CaptureError> {
    aya::util::nr_cpus().map_err(|(what, e)| CaptureError::Cpus(format!("{what}: {e}")))
}

impl Capture {
    /// Loads the embedded object.
    pub fn load(config: &CaptureConfig) -> Result<Self, CaptureError> {
        Self::load_object(EMBEDDED_OBJECT, config)
    }

    /// Loads a given object (tests pass the freshly built one).
    pub fn load_object(object: &[u8], config: &CaptureConfig) -> Result<Self, CaptureError> {
        if object.is_empty() {
            return Err(CaptureError::ObjectMissing);
        }
        if config.snaplen == 0 || config.snaplen > abi::MAX_SNAPLEN {
            return Err(CaptureError::BadSnaplen(config.snaplen));
        }
        let cpus = possible_cpus()?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(abi::GLOBAL_SNAPLEN, &config.snaplen, true)
            .map_max_entries(abi::MAP_FLOWS, config.max_flows);
        for (i, name) in abi::RING_NAMES.iter().enumerate() {
            // Rings no CPU writes to get the minimum size (one page).
            let bytes = if i < cpus { config.ring_bytes } else { 4096 };
            loader.map_max_entries(name, bytes);
        }
        let mut ebpf = loader.load(object)?;
        let program: &mut Xdp = ebpf
            .program_mut(abi::PROGRAM_NAME)
            .ok_or(CaptureError::Program {
                name: abi::PROGRAM_NAME,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| CaptureError::Program {
                name: abi::PROGRAM_NAME,
                source,
            })?;
        program.load().map_err(|source| CaptureError::Program {
            name: abi::PROGRAM_NAME,
            source,
        })?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
        })
    }

    fn program(&mut self) -> &mut Xdp {
        // Checked in load_object: the program exists and is an XDP program.
        self.ebpf
            .program_mut(abi::PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("program checked at load")
    }

    /// Attaches to `interface`. In `Auto` mode native is tried first, then generic with a
    /// logged warning.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachedMode, CaptureError> {
        let attempt =
            |this: &mut Self, xdp_mode: XdpMode| this.program().attach(interface, xdp_mode);
        let (id, attached) = match mode {
            AttachMode::Native => (
                attempt(self, XdpMode::Driver).map_err(|source| CaptureError::Attach {
                    interface: interface.into(),
                    mode: "native",
                    source,
                })?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                attempt(self, XdpMode::Skb).map_err(|source| CaptureError::Attach {
                    interface: interface.into(),
                    mode: "generic",
                    source,
                })?,
                AttachedMode::Generic,
            ),
            AttachMode::Auto => match attempt(self, XdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Native),
                Err(native_err) => {
                    warn!(interface, error = %native_err, "native XDP attach failed; falling back to generic mode (slower)");
                    let id =
                        attempt(self, XdpMode::Skb).map_err(|source| CaptureError::Attach {
                            interface: interface.into(),
                            mode: "generic",
                            source,
                        })?;
                    (id, AttachedMode::Generic)
                }
            },
        };
        info!(interface, mode = %attached, "XDP attached");
        self.links.push((interface.to_string(), id, attached));
        Ok(attached)
    }

    /// Interfaces attached and their modes.
    pub fn attachments(&self) -> Vec<(String, AttachedMode)> {
        self.links.iter().map(|(i, _, m)| (i.clone(), *m)).collect()
    }

    /// Detaches from every interface (also done on drop by aya; explicit for clean logs).
    pub fn detach_all(&mut self) {
        for (interface, id, _) in std::mem::take(&mut self.links) {
            match self.program().detach(id) {
                Ok(()) => info!(interface, "XDP detached"),
                Err(error) => warn!(interface, %error, "XDP detach failed"),
            }
        }
    }

    fn take(&mut self, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
        self.ebpf
            .take_map(name)
            .ok_or(CaptureError::MapMissing { name })
    }

    /// Takes the flow map and the per-flow stats (once).
    pub fn take_flow_table(&mut self) -> Result<BpfFlowTable, CaptureError> {
        let flows = self.take(abi::MAP_FLOWS)?;
        let stats = self.take(abi::MAP_FLOW_STATS)?;
        BpfFlowTable::new(flows, stats)
    }

    /// Takes the ring buffers of the CPUs that exist (once).
    pub fn take_rings(&mut self) -> Result<Vec<RingBuf<MapData>>, CaptureError> {
        let cpus = possible_cpus()?.min(abi::RING_COUNT);
        abi::RING_NAMES[..cpus]
            .iter()
            .map(|name| {
                let map = self.take(name)?;
                RingBuf::try_from(map).map_err(|source| CaptureError::Map { name, source })
            })
            .collect()
    }

    /// Takes the per-CPU counters (once).
    pub fn take_counters(&mut self) -> Result<Counters, CaptureError> {
        let map = self.take(abi::MAP_COUNTERS)?;
        let array = PerCpuArray::try_from(map).map_err(|source| CaptureError::Map {
            name: abi::MAP_COUNTERS,
            source,
        })?;
        Ok(Counters { array })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The XDP program's per-CPU counters.
pub struct Counters {
    array: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Sums over CPUs, indexed by `abi::counter::*`.
    pub fn read(&self) -> Result<[u64; abi::counter::COUNT as usize], CaptureError> {
        let mut out = [0u64; abi::counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .array
                .get(&(i as u32), 0)
                .map_err(|source| CaptureError::Map {
                    name: abi::MAP_COUNTERS,
                    source,
                })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Counter values with their names.
    pub fn named(&self) -> Result<Vec<(&'static str, u64)>, CaptureError> {
        Ok(abi::counter::NAMES
            .iter()
            .copied()
            .zip(self.read()?)
            .collect())
    }
}
