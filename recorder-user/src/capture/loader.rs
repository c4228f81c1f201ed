//! Loading the XDP object, attaching it to interfaces, and handing out its maps.

use std::{
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData, MapInfo, MapType, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
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
    /// Capacity of the flow table (entries pinned at once).
    pub max_flows: u32,
    /// Media addresses whose ports `flow_ports` the program finds by array index (at most
    /// `abi::MAX_FLOW_ADDRS`, usually the one `media_address`). Flows at other addresses or
    /// ports go to the fallback hash.
    pub flow_addrs: Vec<IpAddr>,
    /// The port range (inclusive) the recorder allocates RTP/RTCP ports from; `None`: no
    /// array, every flow in the hash.
    pub flow_ports: Option<(u16, u16)>,
    pub attach_mode: AttachMode,
    /// Base directory (on bpffs) of pinned objects; they live in `<pin_dir>/<layout>/` (see
    /// [`layout_version`]). `None`: nothing is pinned or adopted.
    pub pin_dir: Option<PathBuf>,
    /// Create the pins when the layout directory holds none. Existing pins are adopted either
    /// way (a previous daemon left capture running for us).
    pub create_pins: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            snaplen: abi::DEFAULT_SNAPLEN,
            ring_bytes: 32 << 20,
            max_flows: abi::DEFAULT_MAX_FLOWS,
            flow_addrs: Vec::new(),
            flow_ports: None,
            attach_mode: AttachMode::Auto,
            pin_dir: None,
            create_pins: false,
        }
    }
}

/// Where production pins live (the usual bpffs mount point plus our directory).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/recorder";

/// Name of the directory under the pin base holding this build's pins: changes whenever the
/// kernel/user layout could change (`abi.rs` or the shared types' sizes), so pins of an
/// incompatible build are never reused.
pub fn layout_version() -> String {
    format!("v{}-{:016x}", abi::ABI_VERSION, abi::LAYOUT_HASH)
}

/// Every pinned map: the object's maps that carry state across a restart (the scratch map and
/// the read-only globals are recreated by each load).
fn pinned_map_names() -> impl Iterator<Item = &'static str> {
    [
        abi::MAP_FLOWS,
        abi::MAP_FLOW_SLOTS,
        abi::MAP_FLOW_VALUES,
        abi::MAP_FLOW_STATS,
        abi::MAP_FLOW_CTL,
        abi::MAP_COUNTERS,
    ]
    .into_iter()
    .chain(abi::RING_NAMES)
}

/// The `FlowLayout` for `config`: its addresses (v4-mapped), each with a block of the port
/// range.
pub fn flow_layout(config: &CaptureConfig) -> Result<abi::FlowLayout, CaptureError> {
    let bad = |why: String| Err(CaptureError::BadFlowLayout(why));
    let mut layout = abi::FlowLayout::default();
    let Some((lo, hi)) = config.flow_ports else {
        return Ok(layout);
    };
    if lo > hi {
        return bad(format!("port range {lo}-{hi} is empty"));
    }
    if config.flow_addrs.len() > abi::MAX_FLOW_ADDRS {
        return bad(format!(
            "{} media addresses, at most {}",
            config.flow_addrs.len(),
            abi::MAX_FLOW_ADDRS
        ));
    }
    for (i, ip) in config.flow_addrs.iter().enumerate() {
        if config.flow_addrs[..i].contains(ip) {
            return bad(format!("media address {ip} given twice"));
        }
        layout.addrs[i] = addr_words(crate::flow::maps::mapped(*ip));
    }
    layout.addr_count = config.flow_addrs.len() as u32;
    layout.port_base = u32::from(lo);
    layout.port_span = u32::from(hi) - u32::from(lo) + 1;
    if layout.addr_count == 0 {
        layout.port_span = 0;
    }
    Ok(layout)
}

/// An address as `FlowLayout::addrs` stores it (two native-endian words, as the program loads
/// them from the packet).
pub fn addr_words(bytes: [u8; 16]) -> [u64; 2] {
    let mut w = [[0u8; 8]; 2];
    w[0].copy_from_slice(&bytes[..8]);
    w[1].copy_from_slice(&bytes[8..]);
    [u64::from_ne_bytes(w[0]), u64::from_ne_bytes(w[1])]
}

/// Slots of `FLOW_SLOTS` for a layout (at least one: a map cannot be empty).
pub fn layout_slots(layout: &abi::FlowLayout) -> u32 {
    (layout.addr_count * layout.port_span).max(1)
}

/// The layout kept in a pinned `FLOW_CTL` (zero if the map was never written).
fn pinned_layout(path: &Path) -> Result<abi::FlowLayout, CaptureError> {
    let bad = |e: aya::maps::MapError| CaptureError::IncompatiblePin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let data = MapData::from_pin(path).map_err(bad)?;
    let ctl: Array<MapData, abi::FlowCtl> = Array::try_from(Map::Array(data)).map_err(bad)?;
    Ok(ctl.get(&0, 0).map_err(bad)?.layout)
}

/// Name of the link pin of an interface, inside the layout directory.
fn link_pin_name(interface: &str) -> String {
    format!("link-{interface}")
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Errors of the capture layer.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("the XDP object was not built into this binary: run `cargo xtask build`")]
    ObjectMissing,
    #[error("snap length {0} is outside 1..={max}", max = abi::MAX_SNAPLEN)]
    BadSnaplen(u32),
    #[error("flow table layout: {0}")]
    BadFlowLayout(String),
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
    #[error("pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {} is not on a BPF file system (mount it: mount -t bpf bpf /sys/fs/bpf)", .0.display())]
    NotBpffs(PathBuf),
    #[error("pinned map {} does not fit this build ({reason}); remove it or its directory", path.display())]
    IncompatiblePin { path: PathBuf, reason: String },
    #[error("pinned XDP link {}: {source}", path.display())]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning the XDP link of {interface} at {}: {source}", path.display())]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("XDP on {interface} was attached through netlink (kernel without XDP bpf_link, < 5.9): it cannot be pinned; run without a pin directory")]
    NotFdLink { interface: String },
    #[error(
        "nothing is pinned (no pin directory configured, or create_pins off and no pins found)"
    )]
    NotPinning,
}

/// How an attachment is held.
enum LinkHandle {
    /// Owned by the program; detached when dropped (no pinning).
    Owned(XdpLinkId),
    /// Pinned at `path`: closing the fd leaves it attached, removing the pin detaches it.
    Pinned { link: FdLink, path: PathBuf },
}

struct Attachment {
    interface: String,
    mode: AttachedMode,
    link: LinkHandle,
}

/// The pin directory state of a loaded capture.
struct Pins {
    base: PathBuf,
    /// `<base>/<layout_version()>`.
    layout_dir: PathBuf,
    /// Maps are pinned in `layout_dir` and links get pinned on attach.
    pinning: bool,
}

/// A link pin left by a previous daemon for an interface this one has not attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleLink {
    pub interface: String,
    pub path: PathBuf,
}

/// The loaded XDP program and its attachments.
///
/// Without pinning, dropping it detaches every interface. With pinning (a pin directory and
/// either existing pins or `create_pins`), the maps and links live in bpffs: end with
/// [`release_pinned`](Self::release_pinned) (capture goes on without us) or
/// [`detach_and_unpin`](Self::detach_and_unpin) (clean stop). A plain drop then behaves like
/// `release_pinned`, with a warning: captured packets are never thrown away implicitly (unless
/// no link is pinned at all, e.g. attaching failed: nothing could capture, the pins go).
pub struct Capture {
    ebpf: Ebpf,
    /// The layout the program and `FLOW_SLOTS` were made for (the adopted one when adopted).
    layout: abi::FlowLayout,
    links: Vec<Attachment>,
    pins: Option<Pins>,
    adopted: bool,
    /// Set by `release_pinned`/`detach_and_unpin`: Drop has nothing left to do.
    finished: bool,
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
    ///
    /// With a pin directory holding this layout's pins, the maps are adopted as they are: flows,
    /// per-flow stats and counters carry on, and the rings keep their unread records and
    /// positions. Their sizes are the adopted ones (a configured size that differs is logged).
    pub fn load_object(object: &[u8], config: &CaptureConfig) -> Result<Self, CaptureError> {
        if object.is_empty() {
            return Err(CaptureError::ObjectMissing);
        }
        if config.snaplen == 0 || config.snaplen > abi::MAX_SNAPLEN {
            return Err(CaptureError::BadSnaplen(config.snaplen));
        }
        let cpus = possible_cpus()?;
        let mut layout = flow_layout(config)?;
        let pins = match &config.pin_dir {
            Some(base) => Some(Pins::open(base, config.create_pins)?),
            None => None,
        };
        // Adopted slots were laid out by the previous daemon: index them its way.
        let ctl_pin = pins
            .as_ref()
            .filter(|p| p.pinning)
            .map(|p| p.layout_dir.join(abi::MAP_FLOW_CTL))
            .filter(|p| p.exists());
        if let Some(path) = &ctl_pin {
            let pinned = pinned_layout(path)?;
            if pinned != abi::FlowLayout::default() && pinned != layout {
                warn!(
                    pinned = ?pinned,
                    configured = ?layout,
                    "pinned flow table has another layout (media addresses, RTP ports) than configured; keeping the pinned one (flows outside it go to the fallback hash; restart without pins to change it)"
                );
                layout = pinned;
            }
        }
        let mut loader = EbpfLoader::new();
        loader
            .override_global(abi::GLOBAL_SNAPLEN, &config.snaplen, true)
            .override_global(abi::GLOBAL_FLOW_LAYOUT, &layout, true)
            .map_max_entries(abi::MAP_FLOW_SLOTS, layout_slots(&layout))
            .map_max_entries(abi::MAP_FLOWS, config.max_flows)
            // One version per entry, plus versions waiting out a grace period before reuse.
            .map_max_entries(abi::MAP_FLOW_VALUES, abi::flow_versions(config.max_flows))
            .map_max_entries(abi::MAP_FLOW_STATS, abi::flow_versions(config.max_flows));
        for (i, name) in abi::RING_NAMES.iter().enumerate() {
            // Rings no CPU writes to get the minimum size (one page).
            let bytes = if i < cpus { config.ring_bytes } else { 4096 };
            loader.map_max_entries(name, bytes);
        }
        let mut adopted = false;
        if let Some(pins) = pins.as_ref().filter(|p| p.pinning) {
            let mut found = Vec::new();
            for name in pinned_map_names() {
                let path = pins.layout_dir.join(name);
                if path.exists() {
                    let info = check_pinned_map(name, &path)?;
                    let configured = match name {
                        abi::MAP_FLOWS => Some(config.max_flows),
                        _ => abi::RING_NAMES.iter().position(|r| *r == name).map(|i| {
                            let bytes = if i < cpus { config.ring_bytes } else { 4096 };
                            // The kernel rounds ring sizes up to a power-of-two page count.
                            bytes.next_power_of_two().max(4096)
                        }),
                    };
                    if let Some(configured) = configured.filter(|c| *c != info.max_entries()) {
                        warn!(
                            map = name,
                            configured,
                            adopted = info.max_entries(),
                            "pinned map has another size than configured; keeping the pinned one (restart without pins to resize)"
                        );
                    }
                    // aya sizes a ring's mapping from the object, not from the adopted map.
                    loader.map_max_entries(name, info.max_entries());
                    found.push(name);
                }
                loader.map_pin_path(name, path);
            }
            adopted = found.contains(&abi::MAP_FLOWS);
            if adopted {
                if found.len() < pinned_map_names().count() {
                    warn!(dir = %pins.layout_dir.display(), found = found.len(), "some pinned maps are missing; they are created empty");
                }
                info!(dir = %pins.layout_dir.display(), "adopting pinned capture maps");
            } else {
                info!(dir = %pins.layout_dir.display(), "pinning capture maps");
            }
        }
        let loaded = loader
            .load(object)
            .map_err(CaptureError::from)
            .and_then(|mut ebpf| load_program(&mut ebpf).map(|()| ebpf));
        let ebpf =
            match loaded.and_then(|mut ebpf| write_flow_ctl(&mut ebpf, &layout).map(|()| ebpf)) {
                Ok(ebpf) => ebpf,
                Err(error) => {
                    // Pins we just created would be adopted as empty maps next time: remove them.
                    // Adopted pins stay: the previous program still captures through them.
                    if let Some(pins) = pins.as_ref().filter(|p| p.pinning && !adopted) {
                        let _ = remove_dir_all_if_exists(&pins.layout_dir);
                    }
                    return Err(error);
                }
            };
        Ok(Self {
            ebpf,
            layout,
            links: Vec::new(),
            pins,
            adopted,
            finished: false,
        })
    }

    /// The flow table layout in use (the adopted one when adopted).
    pub fn flow_layout(&self) -> abi::FlowLayout {
        self.layout
    }

    /// The maps were adopted from a previous daemon's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Maps and links are pinned (adopted, or created because `create_pins` was set).
    pub fn pinning(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.pinning)
    }

    /// The directory holding this layout's pins, when pinning.
    pub fn layout_dir(&self) -> Option<&Path> {
        self.pins
            .as_ref()
            .filter(|p| p.pinning)
            .map(|p| p.layout_dir.as_path())
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
    ///
    /// When pinning: a link pinned for `interface` by a previous daemon is taken over, its
    /// program atomically replaced by ours (no packet goes uncaptured; the mode stays the one
    /// it was attached in); otherwise the new link is pinned. Link pins of other layout
    /// versions on `interface` would block the attach: they are removed (their directory too
    /// once it holds no link), losing what their rings held.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachedMode, CaptureError> {
        if let Some(pins) = &self.pins {
            pins.remove_foreign_links(interface)?;
        }
        let pin_path = self
            .layout_dir()
            .map(|dir| dir.join(link_pin_name(interface)));
        if let Some(path) = pin_path.as_ref().filter(|p| p.exists()) {
            match self.adopt_link(interface, path) {
                Ok(attachment) => {
                    let attached = attachment.mode;
                    if !mode_matches(mode, attached) {
                        warn!(interface, adopted = %attached, requested = ?mode, "keeping the adopted link's XDP mode; detach to change it");
                    }
                    info!(interface, mode = %attached, "XDP link adopted, program replaced");
                    self.links.push(attachment);
                    return Ok(attached);
                }
                Err(error) => {
                    // E.g. the interface was deleted and recreated: the old link is defunct.
                    warn!(interface, %error, path = %path.display(), "pinned XDP link unusable; removing it and attaching afresh");
                    std::fs::remove_file(path).map_err(|source| CaptureError::PinDir {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
        }
        let (id, attached) = self.attach_new(interface, mode)?;
        let link = match pin_path {
            None => LinkHandle::Owned(id),
            Some(path) => {
                let link = self
                    .program()
                    .take_link(id)
                    .map_err(|source| CaptureError::Attach {
                        interface: interface.into(),
                        mode: "pin",
                        source,
                    })?;
                let fd = FdLink::try_from(link).map_err(|_| CaptureError::NotFdLink {
                    interface: interface.into(),
                })?;
                let pinned = fd.pin(&path).map_err(|source| CaptureError::PinLink {
                    interface: interface.into(),
                    path: path.clone(),
                    source,
                })?;
                LinkHandle::Pinned {
                    link: pinned.into(),
                    path,
                }
            }
        };
        info!(interface, mode = %attached, pinned = matches!(link, LinkHandle::Pinned { .. }), "XDP attached");
        self.links.push(Attachment {
            interface: interface.to_string(),
            mode: attached,
            link,
        });
        Ok(attached)
    }

    /// Takes over the link pinned at `path`, replacing its program by ours.
    fn adopt_link(&mut self, interface: &str, path: &Path) -> Result<Attachment, CaptureError> {
        let link_err = |source| CaptureError::PinnedLink {
            path: path.to_path_buf(),
            source,
        };
        // `into()` keeps the pin file (only `unpin` would remove it).
        let fd: FdLink = PinnedLink::from_pin(path).map_err(link_err)?.into();
        let xdp_link = XdpLink::try_from(fd).map_err(link_err)?;
        let program = self.program();
        let id = program
            .attach_to_link(xdp_link)
            .map_err(|source| CaptureError::Attach {
                interface: interface.into(),
                mode: "replace",
                source,
            })?;
        let link = program
            .take_link(id)
            .map_err(|source| CaptureError::Attach {
                interface: interface.into(),
                mode: "replace",
                source,
            })?;
        let link = FdLink::try_from(link).map_err(link_err)?;
        let mode = match xdp_mode_of(interface) {
            Ok(Some(mode)) => mode,
            other => {
                warn!(interface, result = ?other, "cannot tell the adopted link's XDP mode; reporting native");
                AttachedMode::Native
            }
        };
        Ok(Attachment {
            interface: interface.to_string(),
            mode,
            link: LinkHandle::Pinned {
                link,
                path: path.to_path_buf(),
            },
        })
    }

    fn attach_new(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(XdpLinkId, AttachedMode), CaptureError> {
        let attempt =
            |this: &mut Self, xdp_mode: XdpMode| this.program().attach(interface, xdp_mode);
        Ok(match mode {
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
        })
    }

    /// Interfaces attached and their modes.
    pub fn attachments(&self) -> Vec<(String, AttachedMode)> {
        self.links
            .iter()
            .map(|a| (a.interface.clone(), a.mode))
            .collect()
    }

    /// Link pins of this layout for interfaces not attached by this capture (a previous daemon
    /// attached them; XDP still runs there). Left alone: the caller decides
    /// ([`unpin_stale_link`](Self::unpin_stale_link)).
    pub fn stale_links(&self) -> Vec<StaleLink> {
        let Some(dir) = self.layout_dir() else {
            return Vec::new();
        };
        let mut out: Vec<StaleLink> = link_pins(dir)
            .into_iter()
            .filter(|(interface, _)| !self.links.iter().any(|a| &a.interface == interface))
            .map(|(interface, path)| StaleLink { interface, path })
            .collect();
        out.sort_by(|a, b| a.interface.cmp(&b.interface));
        out
    }

    /// Removes a stale link pin, detaching XDP from its interface (unless another process
    /// holds the link).
    pub fn unpin_stale_link(&self, stale: &StaleLink) -> Result<(), CaptureError> {
        std::fs::remove_file(&stale.path).map_err(|source| CaptureError::PinDir {
            path: stale.path.clone(),
            source,
        })?;
        info!(
            interface = stale.interface,
            "stale pinned XDP link removed (detached)"
        );
        Ok(())
    }

    /// Detaches from every interface (pinned links too: their pins are removed). Maps stay
    /// pinned until [`detach_and_unpin`](Self::detach_and_unpin).
    pub fn detach_all(&mut self) {
        for attachment in std::mem::take(&mut self.links) {
            let interface = attachment.interface;
            match attachment.link {
                LinkHandle::Owned(id) => match self.program().detach(id) {
                    Ok(()) => info!(interface, "XDP detached"),
                    Err(error) => warn!(interface, %error, "XDP detach failed"),
                },
                LinkHandle::Pinned { link, path } => {
                    // The link goes when its last reference does: the pin, then our fd.
                    match std::fs::remove_file(&path) {
                        Ok(()) => info!(interface, "XDP detached (pin removed)"),
                        Err(error) => {
                            warn!(interface, %error, path = %path.display(), "removing the XDP link pin failed; XDP stays attached")
                        }
                    }
                    drop(link);
                }
            }
        }
    }

    /// Leaves capture running without us: links stay attached and every map stays pinned (the
    /// rings keep filling until a new daemon adopts them). Only our file descriptors close.
    /// Without pinning, returns [`CaptureError::NotPinning`] and detaches as a drop would.
    pub fn release_pinned(mut self) -> Result<(), CaptureError> {
        let Some(dir) = self.layout_dir().map(Path::to_path_buf) else {
            return Err(CaptureError::NotPinning);
        };
        self.finished = true;
        let interfaces: Vec<String> = std::mem::take(&mut self.links)
            .into_iter()
            .map(|a| a.interface)
            .collect();
        info!(dir = %dir.display(), ?interfaces, "capture released: XDP stays attached, maps stay pinned");
        Ok(())
    }

    /// Clean stop: detaches every interface, removes every pin of this layout and its
    /// directory (and the base directory if that leaves it empty). What the rings still hold
    /// is readable through rings already taken, until they are dropped.
    pub fn detach_and_unpin(mut self) -> Result<(), CaptureError> {
        self.finished = true;
        self.detach_all();
        let Some(pins) = self.pins.as_ref().filter(|p| p.pinning) else {
            return Ok(());
        };
        remove_dir_all_if_exists(&pins.layout_dir)?;
        // Another layout's directory or a stale link may still be there: keep the base then.
        if std::fs::remove_dir(&pins.base).is_ok() {
            info!(dir = %pins.base.display(), "pin directory removed");
        }
        info!(dir = %pins.layout_dir.display(), "capture pins removed");
        Ok(())
    }

    fn take(&mut self, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
        self.ebpf
            .take_map(name)
            .ok_or(CaptureError::MapMissing { name })
    }

    /// Takes the flow table's maps (once). When adopted, the table starts with the flows the
    /// kernel maps hold.
    pub fn take_flow_table(&mut self) -> Result<BpfFlowTable, CaptureError> {
        let maps = crate::flow::maps::FlowMaps {
            slots: self.take(abi::MAP_FLOW_SLOTS)?,
            hash: self.take(abi::MAP_FLOWS)?,
            values: self.take(abi::MAP_FLOW_VALUES)?,
            stats: self.take(abi::MAP_FLOW_STATS)?,
            ctl: self.take(abi::MAP_FLOW_CTL)?,
        };
        BpfFlowTable::new(maps, self.layout)
    }

    /// Takes the ring buffers of the CPUs that exist (once). Adopted rings resume at the
    /// previous consumer's position: the first drain hands out what arrived while no daemon ran.
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

    /// Takes the per-CPU counters (once). Adopted counters simply continue from the previous
    /// daemon's values (they count since the maps were first created, not since this load).
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
        if self.finished {
            return;
        }
        if let Some(dir) = self.layout_dir().map(Path::to_path_buf) {
            if link_pins(&dir).is_empty() {
                // Nothing captures into these maps (e.g. attaching failed): don't leave them.
                if remove_dir_all_if_exists(&dir).is_ok() {
                    info!(dir = %dir.display(), "no XDP link pinned: capture pins removed");
                }
            } else {
                warn!(dir = %dir.display(), "capture dropped while pinned: XDP stays attached and the maps pinned (detach_and_unpin is the clean stop)");
            }
            return;
        }
        self.detach_all();
    }
}

impl Pins {
    /// Checks the base directory, notes other layouts, and decides whether we pin.
    fn open(base: &Path, create: bool) -> Result<Self, CaptureError> {
        let layout_dir = base.join(layout_version());
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaptureError::PinDir { path, source }
        };
        if !base.exists() {
            if !create {
                return Ok(Self {
                    base: base.to_path_buf(),
                    layout_dir,
                    pinning: false,
                });
            }
            std::fs::create_dir_all(base).map_err(dir_err(base))?;
        }
        check_bpffs(base)?;
        let this = Self {
            base: base.to_path_buf(),
            pinning: create || layout_dir.join(abi::MAP_FLOWS).exists(),
            layout_dir,
        };
        for dir in this.foreign_dirs() {
            let links = link_pins(&dir);
            if links.is_empty() {
                warn!(dir = %dir.display(), "removing pins of another layout version (nothing attached through them); packets they buffered are lost");
                remove_dir_all_if_exists(&dir)?;
            } else {
                let interfaces: Vec<&String> = links.iter().map(|(i, _)| i).collect();
                warn!(dir = %dir.display(), ?interfaces, "pins of another layout version; they are removed when these interfaces are attached");
            }
        }
        if this.pinning {
            std::fs::create_dir_all(&this.layout_dir).map_err(dir_err(&this.layout_dir))?;
        }
        Ok(this)
    }

    /// Directories of other layout versions under the base.
    fn foreign_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|p| *p != self.layout_dir)
            .collect()
    }

    /// Removes other layouts' link pins on `interface` (they would make attaching fail), and
    /// those layouts' directories once no link is left in them.
    fn remove_foreign_links(&self, interface: &str) -> Result<(), CaptureError> {
        for dir in self.foreign_dirs() {
            let pin = dir.join(link_pin_name(interface));
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(|source| CaptureError::PinDir {
                    path: pin.clone(),
                    source,
                })?;
                warn!(interface, path = %pin.display(), "removed an XDP link pinned by another layout version");
            }
            if link_pins(&dir).is_empty() {
                warn!(dir = %dir.display(), "removing pins of another layout version; packets they buffered are lost");
                remove_dir_all_if_exists(&dir)?;
            }
        }
        Ok(())
    }
}

/// Link pins in a directory, as (interface, path).
fn link_pins(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let interface = name.strip_prefix("link-")?.to_string();
            Some((interface, e.path()))
        })
        .collect()
}

fn remove_dir_all_if_exists(dir: &Path) -> Result<(), CaptureError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CaptureError::PinDir {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Records the layout in `FLOW_CTL` (fresh maps; an adopted one holds it already, the fallback
/// flag is left as it is).
fn write_flow_ctl(ebpf: &mut Ebpf, layout: &abi::FlowLayout) -> Result<(), CaptureError> {
    let err = |source| CaptureError::Map {
        name: abi::MAP_FLOW_CTL,
        source,
    };
    let map = ebpf
        .map_mut(abi::MAP_FLOW_CTL)
        .ok_or(CaptureError::MapMissing {
            name: abi::MAP_FLOW_CTL,
        })?;
    let mut ctl: Array<&mut MapData, abi::FlowCtl> = Array::try_from(map).map_err(err)?;
    let mut value = ctl.get(&0, 0).map_err(err)?;
    if value.layout != *layout {
        value.layout = *layout;
        ctl.set(0, value, 0).map_err(err)?;
    }
    Ok(())
}

/// Loads (verifies) the XDP program of a loaded object.
fn load_program(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
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
    })
}

/// Fails unless `path` is on bpffs (pins anywhere else fail with obscure errors).
fn check_bpffs(path: &Path) -> Result<(), CaptureError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CaptureError::NotBpffs(path.to_path_buf()))?;
    // SAFETY: zeroed statfs is a valid out-buffer; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; statfs only writes into `stat`.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(CaptureError::PinDir {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        return Err(CaptureError::NotBpffs(path.to_path_buf()));
    }
    Ok(())
}

/// Checks that a pinned map has the type and key/value sizes this build uses (aya would take
/// any map a pin names).
fn check_pinned_map(name: &str, path: &Path) -> Result<MapInfo, CaptureError> {
    let bad = |reason: String| CaptureError::IncompatiblePin {
        path: path.to_path_buf(),
        reason,
    };
    let info = MapInfo::from_pin(path).map_err(|e| bad(e.to_string()))?;
    let (ty, key, value) = match name {
        abi::MAP_FLOWS => (MapType::Hash, size_of::<abi::FlowKey>(), size_of::<u32>()),
        abi::MAP_FLOW_SLOTS => (MapType::Array, size_of::<u32>(), size_of::<u64>()),
        abi::MAP_FLOW_VALUES => (
            MapType::Array,
            size_of::<u32>(),
            size_of::<abi::FlowValue>(),
        ),
        abi::MAP_FLOW_STATS => (
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<abi::FlowStats>(),
        ),
        abi::MAP_FLOW_CTL => (MapType::Array, size_of::<u32>(), size_of::<abi::FlowCtl>()),
        abi::MAP_COUNTERS => (MapType::PerCpuArray, size_of::<u32>(), size_of::<u64>()),
        _ => (MapType::RingBuf, 0, 0),
    };
    let actual_ty = info.map_type().map_err(|e| bad(e.to_string()))?;
    let mmapable = matches!(name, abi::MAP_FLOW_SLOTS | abi::MAP_FLOW_VALUES);
    if mmapable && info.map_flags() & BPF_F_MMAPABLE == 0 {
        return Err(bad("not mmapable".into()));
    }
    if actual_ty != ty || info.key_size() as usize != key || info.value_size() as usize != value {
        return Err(bad(format!(
            "{actual_ty:?} key {} value {}, expected {ty:?} key {key} value {value}",
            info.key_size(),
            info.value_size()
        )));
    }
    Ok(info)
}

fn mode_matches(requested: AttachMode, actual: AttachedMode) -> bool {
    !matches!(
        (requested, actual),
        (AttachMode::Native, AttachedMode::Generic) | (AttachMode::Generic, AttachedMode::Native)
    )
}

/// The XDP mode a program is attached in on `interface` (in the calling thread's network
/// namespace), from rtnetlink's `IFLA_XDP_ATTACHED`; `None` when nothing is attached.
fn xdp_mode_of(interface: &str) -> io::Result<Option<AttachedMode>> {
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const XDP_ATTACHED_DRV: u8 = 1;
    const XDP_ATTACHED_SKB: u8 = 2;

    let c_if = std::ffi::CString::new(interface)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_if.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket syscall; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);

    // nlmsghdr (16) + ifinfomsg (16): RTM_GETLINK for one interface index.
    let mut request = [0u8; 32];
    request[0..4].copy_from_slice(&32u32.to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[20..24].copy_from_slice(&(index as i32).to_ne_bytes());
    // SAFETY: valid buffer and length.
    if unsafe { libc::send(raw, request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid writable buffer and length.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    if msg.len() < 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short reply"));
    }
    if u16_at(msg, 4) == libc::NLMSG_ERROR as u16 {
        let errno = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let len = (u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize).min(msg.len());
    for (ty, payload) in nl_attrs(&msg[32..len]) {
        if ty != IFLA_XDP {
            continue;
        }
        for (ty, value) in nl_attrs(payload) {
            if ty == IFLA_XDP_ATTACHED {
                return Ok(match value.first() {
                    Some(&XDP_ATTACHED_DRV) => Some(AttachedMode::Native),
                    Some(&XDP_ATTACHED_SKB) => Some(AttachedMode::Generic),
                    Some(0) | None => None,
                    // Hardware or several programs: not a mode we attach in.
                    Some(_) => Some(AttachedMode::Native),
                });
            }
        }
    }
    Ok(None)
}

/// Netlink attributes (type without the nested/byte-order flags, payload) of a buffer.
fn nl_attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    const NLA_TYPE_MASK: u16 = 0x3fff;
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            return None;
        }
        let item = (u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK, &b[4..len]);
        b = &b[((len + 3) & !3).min(b.len())..];
        Some(item)
    })
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
