//! `metadata.json`: what a recording is, as the writer knows it. Read back by the repair pass,
//! retention and the index (`index::Index::upsert_from_metadata`).

use std::{
    fs,
    io::{self, Write},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::encode::{dtmf::DtmfEvent, rtp::SsrcStats};

pub const METADATA_FILE: &str = "metadata.json";
pub const PCAP_FILE: &str = "recording.pcap";
pub const WAV_FILE: &str = "recording.wav";

/// Lifecycle of a recording on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingState {
    /// Being written.
    Active,
    /// Ended normally; files are closed.
    Complete,
    /// The writer died while it was active; repaired at the next start.
    Interrupted,
}

impl RecordingState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingState::Active => "active",
            RecordingState::Complete => "complete",
            RecordingState::Interrupted => "interrupted",
        }
    }
}

/// Contents of `metadata.json`. Times are RFC 3339 strings (UTC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingMetadata {
    pub id: String,
    pub sip_call_id: String,
    pub call_uuid: Option<String>,
    pub call_uuid_source: Option<String>,
    pub connection_id: Option<String>,
    /// Other identifiers from signaling (`dn`, `Session-ID`, ...).
    #[serde(default)]
    pub extra_ids: Vec<(String, String)>,
    /// Host (site) that recorded it.
    pub host: String,
    /// Id of the first recording of the same CallUUID found in the index when this one started
    /// (None: this is the first, or it has no CallUUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    /// Id of the latest recording of the same CallUUID that started before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub state: RecordingState,
    /// `bye`, `cancel`, `timeout`, `shutdown`, `error`, ... (`EndReason::name`); `crash` after a
    /// repair.
    pub end_reason: Option<String>,
    /// Free text that came with the end (BYE `Reason` header, error detail).
    pub end_detail: Option<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
    /// Last time the writer updated this file.
    pub updated_at: String,
    /// At least one RTP packet arrived.
    pub media_received: bool,
    pub participants: Vec<ParticipantMeta>,
    pub streams: Vec<StreamMeta>,
    /// SIPREC metadata bodies as received; each is stored in `file`.
    pub metadata_versions: Vec<MetadataVersionMeta>,
    pub wav: WavMeta,
    pub dropped: DropCounters,
    /// Human-readable remarks (codecs kept in the pcap only, disk full, repair).
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantMeta {
    pub id: String,
    pub name: Option<String>,
    pub aor: Option<String>,
    pub joined_at: Option<String>,
    pub left_at: Option<String>,
    #[serde(default)]
    pub sends: Vec<String>,
    #[serde(default)]
    pub receives: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub label: String,
    pub media: String,
    pub codec: String,
    pub payload_type: u8,
    pub clock_rate: u32,
    pub local_port: u16,
    pub rtcp_port: Option<u16>,
    /// WAV channel (0 = left), if the stream has one.
    pub channel: Option<u16>,
    /// Its audio is decoded into the WAV (PCMU, PCMA, G.722, Opus, G.729; SRTP with its key).
    pub decoded: bool,
    pub srtp: bool,
    /// RTP packets written to the pcap.
    pub packets: u64,
    /// Wire bytes of those packets.
    pub bytes: u64,
    pub rtcp_packets: u64,
    /// Lost RTP packets from sequence gaps, summed over SSRCs.
    pub lost: u64,
    pub ssrcs: Vec<SsrcStats>,
    pub paused: Vec<Interval>,
    pub added_at: String,
    /// Set when a re-INVITE removed the stream.
    pub removed_at: Option<String>,
    /// RFC 4733 telephone events (DTMF) received on the stream, in arrival order.
    #[serde(default)]
    pub dtmf: Vec<DtmfEvent>,
    /// Packets of this stream (RTP and RTCP) lost to a full ring buffer (known at the end).
    #[serde(default)]
    pub ring_drops: u64,
    /// Codec rate, SRTP suite, decode and authentication counters.
    #[serde(flatten)]
    pub decode: super::encode::media::MediaStats,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    pub from: String,
    /// None while still paused.
    pub to: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataVersionMeta {
    pub version: u32,
    pub received_at: String,
    pub method: String,
    /// File name in the recording directory (`metadata-<n>.xml`).
    pub file: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WavMeta {
    pub sample_rate: u32,
    /// Stream label of each channel, left first.
    pub channels: Vec<String>,
    pub frames: u64,
}

/// What was not recorded, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounters {
    /// Packets of the recording's flows the XDP program could not put in a full ring buffer
    /// (the consumer was held up for longer than the rings cover). The only place packets may
    /// be dropped before the files; per stream in `streams[].ring_drops`.
    #[serde(default)]
    pub ring_full: u64,
    /// Packets not written to the pcap: disk full (or another write error).
    pub pcap_write_failed: u64,
    /// Audio packets not written to the WAV: disk full (or another write error).
    pub wav_write_failed: u64,
    /// RTP packets whose codec is not decoded (kept in the pcap only).
    pub not_decoded: u64,
    /// Packets on an RTP port that are not RTP (kept in the pcap only).
    pub malformed: u64,
    /// Audio before the recording start or past the WAV size limit.
    pub out_of_range: u64,
    /// Audio received while the stream was paused (kept in the pcap only).
    pub while_paused: u64,
    /// Times `metadata.json` or a metadata XML could not be written.
    pub metadata_write_failed: u64,
}

/// RFC 3339 (UTC) text of a time.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// Parses what [`rfc3339`] writes.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let ns = t.unix_timestamp_nanos();
    (ns >= 0).then(|| UNIX_EPOCH + Duration::from_nanos(ns as u64))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// On error the previous file (if any) is left as it was and the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, true)
}

/// The temporary file a replacement of `path` is written to first.
pub(crate) fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.tmp"))
}

/// [`write_atomic`], with the fsync before the rename only when `sync`. Without it a crash may
/// keep the previous version (the rename can reach the journal first; ext4 and XFS flush the
/// data of a file renamed over another before that commit, so it is never a torn file there).
pub(crate) fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = temp_path(path);
    if !sync {
        match exchange_file(path, &tmp, bytes) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
    }
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A refresh without a new inode: the new version goes into the temporary file left by the
/// previous refresh (overwritten in place), which then swaps names with `path` in one atomic
/// `renameat2(RENAME_EXCHANGE)`; the temporary name keeps the old version for the next
/// refresh. A create and an unlink per refresh made ext4's inode allocator scan the inodes
/// deleted recently, a quarter of the file thread's time with thousands of live recordings.
/// `Ok(false)`: not done (no file at `path` yet, or a filesystem without the exchange), the
/// caller replaces the file the usual way.
fn exchange_file(path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)?;
    drop(f);
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(tmp)?, c(path)?);
    // SAFETY: two valid C strings, relative to the current directory like the paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

impl RecordingMetadata {
    pub fn read(dir: &Path) -> io::Result<Self> {
        let bytes = fs::read(dir.join(METADATA_FILE))?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(&dir.join(METADATA_FILE), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Refreshes swap two inodes instead of creating one each time; every version is whole.
    #[test]
    fn refreshes_reuse_two_inodes_and_each_version_is_whole() {
        let dir = crate::writer::tests::TempDir::new("exchange");
        let path = dir.path().join(METADATA_FILE);
        replace_file(&path, b"first version, the longest of them", true).unwrap();
        let mut inodes = std::collections::HashSet::new();
        for i in 0..6 {
            let text = format!("refresh {i}");
            replace_file(&path, text.as_bytes(), false).unwrap();
            assert_eq!(fs::read(&path).unwrap(), text.as_bytes());
            inodes.insert(fs::metadata(&path).unwrap().ino());
        }
        assert_eq!(inodes.len(), 2, "two inodes swapped: {inodes:?}");
        // The final (synced) version replaces the file the usual way and leaves no temporary.
        replace_file(&path, b"final", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"final");
        assert!(!temp_path(&path).exists());
    }
}
