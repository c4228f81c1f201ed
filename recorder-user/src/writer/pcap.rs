//! Classic pcap (nanosecond timestamps, `LINKTYPE_ETHERNET`) written through an [`MmapFile`].

use std::{
    fs::OpenOptions,
    io::{self, Read},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use super::mmapfile::MmapFile;

/// Magic of nanosecond-resolution pcap files (host byte order).
const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// Magic of microsecond-resolution pcap files.
const MAGIC_US: u32 = 0xa1b2_c3d4;
/// Snap length written in the header: larger than any frame the XDP program captures.
const SNAPLEN: u32 = 65535;
const LINKTYPE_ETHERNET: u32 = 1;
pub(crate) const GLOBAL_HEADER_LEN: u64 = 24;
pub(crate) const RECORD_HEADER_LEN: usize = 16;

pub(crate) struct PcapWriter {
    out: MmapFile,
}

impl PcapWriter {
    /// `floor`: see [`MmapFile::create`].
    pub(crate) fn create(path: &Path, floor: u64) -> io::Result<Self> {
        let mut out = MmapFile::create(path, floor)?;
        let mut h = [0u8; GLOBAL_HEADER_LEN as usize];
        h[0..4].copy_from_slice(&MAGIC_NS.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        // thiszone and sigfigs stay 0.
        h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_at(0, &h)?;
        Ok(Self { out })
    }

    /// Goes on appending to a pcap a handover finished at `len` bytes (checked: same length,
    /// our header).
    pub(crate) fn open(path: &Path, len: u64, floor: u64) -> io::Result<Self> {
        let out = MmapFile::open(path, len, floor)?;
        let magic = out
            .bytes()
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if magic != Some(MAGIC_NS) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a pcap this writer made", path.display()),
            ));
        }
        Ok(Self { out })
    }

    /// Bytes written so far (the file's length once finished).
    pub(crate) fn len(&self) -> u64 {
        self.out.len()
    }

    /// Appends one record. On error (disk full) the file is unchanged.
    pub(crate) fn write(
        &mut self,
        wall: SystemTime,
        orig_len: u32,
        frame: &[u8],
    ) -> io::Result<()> {
        let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&(since.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&since.subsec_nanos().to_le_bytes());
        h[8..12].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&orig_len.max(frame.len() as u32).to_le_bytes());
        let at = self.out.len();
        let body = at + RECORD_HEADER_LEN as u64;
        self.out.reserve(body + frame.len() as u64)?;
        // Body first, header last: a crash between the two leaves a zero header, which the
        // repair pass reads as the end of the file instead of a record with a zeroed body.
        self.out.write_at(body, frame)?;
        self.out.write_at(at, &h)?;
        Ok(())
    }

    pub(crate) fn flush_async(&self) -> io::Result<()> {
        self.out.flush_async()
    }

    pub(crate) fn finish(self) -> io::Result<()> {
        self.out.finish()
    }
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
