//! Classic pcap (nanosecond timestamps, `LINKTYPE_ETHERNET`): records encoded into a buffer in
//! memory, appended to the file by the file thread in chunks.

use std::{
    fs::OpenOptions,
    io::{self, Read},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::writer::fileio::PcapChunk;

/// Magic of nanosecond-resolution pcap files (host byte order).
const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// Magic of microsecond-resolution pcap files.
const MAGIC_US: u32 = 0xa1b2_c3d4;
/// Snap length written in the header: larger than any frame the XDP program captures.
const SNAPLEN: u32 = 65535;
const LINKTYPE_ETHERNET: u32 = 1;
pub(crate) const GLOBAL_HEADER_LEN: u64 = 24;
pub(crate) const RECORD_HEADER_LEN: usize = 16;

/// A pcap being recorded: the file holds the global header and every chunk handed to the file
/// thread; records since then wait in `buf` (the packet stage never touches the file).
pub(crate) struct PcapWriter {
    pub path: PathBuf,
    buf: Vec<u8>,
    /// Records in `buf` per stream (for the failure counts of a chunk not written).
    per_stream: Vec<u32>,
}

/// The file's global header.
pub(crate) fn global_header() -> [u8; GLOBAL_HEADER_LEN as usize] {
    let mut h = [0u8; GLOBAL_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&MAGIC_NS.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// Records are handed to the file thread in chunks of about this size (or what
/// `flush_interval` gathers: at 100 packets/s a recording's pcap grows 23 KB/s). Buffered
/// writes cost per folio more than per byte: 4 000 files appended round robin took 40 % less
/// CPU in 64 KiB writes than in 32 KiB ones (ext4 on a loop device, writes unaligned like a
/// pcap's).
pub(crate) const CHUNK: usize = 64 * 1024;

impl PcapWriter {
    /// A pcap to be created at `path` by the file thread ([`Job::Create`] writes
    /// [`global_header`]); nothing touches the filesystem here.
    ///
    /// [`Job::Create`]: crate::writer::fileio::Job::Create
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            buf: Vec::new(),
            per_stream: Vec::new(),
        }
    }

    /// Goes on appending to a pcap a handover finished at `len` bytes (checked: same length,
    /// our header).
    pub(crate) fn open(path: &Path, len: u64) -> io::Result<Self> {
        let mut f = OpenOptions::new().read(true).open(path)?;
        let actual = f.metadata()?.len();
        let mut magic = [0u8; 4];
        if actual != len
            || f.read_exact(&mut magic).is_err()
            || u32::from_le_bytes(magic) != MAGIC_NS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not the pcap this recording had ({actual} bytes, expected {len})",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            buf: Vec::new(),
            per_stream: Vec::new(),
        })
    }

    /// Bytes waiting in memory.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record of stream `stream` to the buffer; returns its size in bytes.
    pub(crate) fn push(
        &mut self,
        stream: usize,
        wall: SystemTime,
        orig_len: u32,
        frame: &[u8],
        spare: impl FnOnce() -> Vec<u8>,
    ) -> usize {
        let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&(since.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&since.subsec_nanos().to_le_bytes());
        h[8..12].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&orig_len.max(frame.len() as u32).to_le_bytes());
        if self.buf.capacity() == 0 {
            self.buf = spare();
        }
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(frame);
        if self.per_stream.len() <= stream {
            self.per_stream.resize(stream + 1, 0);
        }
        self.per_stream[stream] += 1;
        RECORD_HEADER_LEN + frame.len()
    }

    /// The records buffered since the last chunk, to hand to the file thread.
    pub(crate) fn take_chunk(&mut self) -> Option<PcapChunk> {
        if self.buf.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.buf);
        let per_stream = std::mem::take(&mut self.per_stream);
        Some(PcapChunk {
            path: self.path.clone(),
            bytes,
            per_stream,
        })
    }
}

/// What a crashed recording's pcap says of its streams, for a `metadata.json` that never
/// reached the disk: the time of the first record and the UDP packets per destination (local)
/// port, in the order first seen.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PcapSummary {
    pub first: Option<SystemTime>,
    pub ports: Vec<PortSummary>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PortSummary {
    pub port: u16,
    /// RTP packets (version 2, not an RTCP packet type) and their frame bytes.
    pub rtp_packets: u64,
    pub rtp_bytes: u64,
    /// Payload type of the first RTP packet.
    pub payload_type: Option<u8>,
    /// RTCP packets (packet types 200-207).
    pub rtcp_packets: u64,
}

/// Reads the whole records of a pcap the recorder wrote (Ethernet, optional VLAN tags, IPv4
/// or IPv6 without extension headers, UDP); other frames are skipped.
pub(crate) fn summary(path: &Path) -> io::Result<PcapSummary> {
    let data = std::fs::read(path)?;
    let mut out = PcapSummary::default();
    if data.len() < GLOBAL_HEADER_LEN as usize {
        return Ok(out);
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap_or_default());
    if magic != MAGIC_NS && magic != MAGIC_US {
        return Ok(out);
    }
    let mut at = GLOBAL_HEADER_LEN as usize;
    while let Some(h) = data.get(at..at + RECORD_HEADER_LEN) {
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (sec, frac, incl, orig) = (word(0), word(4), word(8), word(12));
        let end = at + RECORD_HEADER_LEN + incl as usize;
        let sane = sec != 0 && incl != 0 && incl <= SNAPLEN && orig >= incl;
        if !sane || end > data.len() {
            break;
        }
        if out.first.is_none() {
            let sub = if magic == MAGIC_NS {
                frac
            } else {
                frac.saturating_mul(1000)
            };
            out.first =
                Some(UNIX_EPOCH + std::time::Duration::new(sec as u64, sub.min(999_999_999)));
        }
        let frame = &data[at + RECORD_HEADER_LEN..end];
        if let Some((port, payload)) = udp_destination(frame) {
            let i = match out.ports.iter().position(|p| p.port == port) {
                Some(i) => i,
                None => {
                    out.ports.push(PortSummary {
                        port,
                        ..Default::default()
                    });
                    out.ports.len() - 1
                }
            };
            let p = &mut out.ports[i];
            match payload {
                [b0, b1, ..] if b0 >> 6 == 2 && (200..=207).contains(b1) => p.rtcp_packets += 1,
                [b0, b1, ..] if b0 >> 6 == 2 => {
                    p.rtp_packets += 1;
                    p.rtp_bytes += frame.len() as u64;
                    p.payload_type.get_or_insert(b1 & 0x7f);
                }
                _ => {}
            }
        }
        at = end;
    }
    Ok(out)
}

/// The UDP destination port and payload of an Ethernet frame.
fn udp_destination(frame: &[u8]) -> Option<(u16, &[u8])> {
    let be16 = |b: &[u8], i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
    let mut at = 12;
    let mut ethertype = be16(frame, at)?;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        at += 4;
        ethertype = be16(frame, at)?;
    }
    let ip = frame.get(at + 2..)?;
    let udp = match ethertype {
        0x0800 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            (*ip.get(9)? == 17 && ihl >= 20).then(|| ip.get(ihl..))??
        }
        0x86dd => (*ip.get(6)? == 17).then(|| ip.get(40..))??,
        _ => return None,
    };
    Some((be16(udp, 2)?, udp.get(8..)?))
}

/// What [`repair`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PcapRepair {
    pub records: u64,
    /// Wall time of the last whole record.
    pub last: Option<SystemTime>,
    pub old_len: u64,
    pub new_len: u64,
}

/// Cuts a pcap file to its last whole record (dropping a zero tail or a torn record).
pub(crate) fn repair(path: &Path) -> io::Result<PcapRepair> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let old_len = data.len() as u64;
    if data.len() < GLOBAL_HEADER_LEN as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no pcap header"));
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap_or_default());
    let nanos = match magic {
        MAGIC_NS => true,
        MAGIC_US => false,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a little-endian pcap",
            ))
        }
    };
    let mut at = GLOBAL_HEADER_LEN as usize;
    let mut records = 0;
    let mut last = None;
    while let Some(h) = data.get(at..at + RECORD_HEADER_LEN) {
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (sec, frac, incl, orig) = (word(0), word(4), word(8), word(12));
        let end = at + RECORD_HEADER_LEN + incl as usize;
        let sane = sec != 0 && incl != 0 && incl <= SNAPLEN && orig >= incl;
        if !sane || end > data.len() {
            break;
        }
        let sub = if nanos {
            frac
        } else {
            frac.saturating_mul(1000)
        };
        last = Some(UNIX_EPOCH + std::time::Duration::new(sec as u64, sub.min(999_999_999)));
        records += 1;
        at = end;
    }
    if at as u64 != old_len {
        file.set_len(at as u64)?;
        file.sync_all()?;
    }
    Ok(PcapRepair {
        records,
        last,
        old_len,
        new_len: at as u64,
    })
}
