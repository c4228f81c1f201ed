//! One recording: its directory, buffers and counters. Driven by its shard's packet stage only;
//! its files are written by the shard's file thread (see `fileio`).

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    dtmf::{self, DtmfEvent},
    media::{decrypted_frame, PcapSrtp, Samples, StreamMedia, Unprotected},
    pcap::{self, PcapWriter},
    rtp::{self, full_ssrcs, Aligner, Kind, SsrcStats},
    wav::{self, WavWriter},
};
use crate::writer::{
    fileio::{FileQueue, IoCounters, Job, RecordingIo},
    indexer::IndexQueue,
    metadata::{
        rfc3339, DropCounters, Interval, MetadataVersionMeta, ParticipantMeta, RecordingMetadata,
        RecordingState, StreamMeta, WavMeta, METADATA_FILE, PCAP_FILE, WAV_FILE,
    },
};
use crate::{
    capture::CapturedPacket,
    events::{CallIds, MetadataVersion, Participant, StreamInfo},
    media::codec::Kind as CodecKind,
};

/// Sample rate of the WAV when no stream is decoded.
pub(crate) const WAV_RATE: u32 = 8000;
/// Longest WAV written (24 h): guards against a wall clock step turning into gigabytes of
/// silence. Audio past it stays in the pcap (counted as `out_of_range`).
const MAX_WAV_SECONDS: i64 = 24 * 3600;

/// Serialized whole in a handover (`ssrcs` with their internal loss and jitter state).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stream {
    info: StreamInfo,
    channel: Option<u16>,
    packets: u64,
    bytes: u64,
    rtcp_packets: u64,
    #[serde(with = "full_ssrcs")]
    ssrcs: Vec<SsrcStats>,
    dtmf: Vec<DtmfEvent>,
    aligner: Aligner,
    paused: Vec<Interval>,
    paused_now: bool,
    added_at: SystemTime,
    removed_at: Option<SystemTime>,
    /// Records lost to a full ring (from the kernel, at the end).
    #[serde(default)]
    ring_drops: u64,
    /// SRTP, decoders and their counters.
    #[serde(default)]
    media: StreamMedia,
    /// [`Stream::decoder`], worked out once per stream description: per packet it cost two
    /// string compares on allocations of their own, cache misses at thousands of recordings.
    #[serde(skip)]
    negotiated: std::cell::OnceCell<Option<CodecKind>>,
}

impl Stream {
    fn new(info: StreamInfo, channel: Option<u16>, at: SystemTime) -> Self {
        let paused_now = info.paused;
        Self {
            paused: if paused_now {
                vec![Interval {
                    from: rfc3339(at),
                    to: None,
                }]
            } else {
                Vec::new()
            },
            info,
            channel,
            packets: 0,
            bytes: 0,
            rtcp_packets: 0,
            ssrcs: Vec::new(),
            dtmf: Vec::new(),
            aligner: Aligner::default(),
            paused_now,
            added_at: at,
            removed_at: None,
            ring_drops: 0,
            media: StreamMedia::default(),
            negotiated: std::cell::OnceCell::new(),
        }
    }

    /// The codec of the negotiated payload type, when the WAV can take it (SRTP only with the
    /// client's key).
    fn decoder(&self) -> Option<CodecKind> {
        *self.negotiated.get_or_init(|| {
            if (self.info.srtp && self.info.sdes.is_none()) || self.info.media != "audio" {
                return None;
            }
            CodecKind::for_codec(&self.info.codec)
        })
    }

    /// Codec of one packet's payload type: the negotiated one, or a static type (some clients
    /// switch between PCMU, PCMA and G.722 without a new offer).
    fn decoder_for(&self, pt: u8) -> Option<CodecKind> {
        let negotiated = self.decoder()?;
        if pt == self.info.codec.payload_type {
            return Some(negotiated);
        }
        self.media
            .earlier_codec(pt)
            .or_else(|| CodecKind::for_static_pt(pt))
    }

    fn set_paused(&mut self, paused: bool, at: SystemTime) {
        if paused == self.paused_now {
            return;
        }
        self.paused_now = paused;
        if paused {
            self.paused.push(Interval {
                from: rfc3339(at),
                to: None,
            });
        } else if let Some(last) = self.paused.last_mut() {
            last.to = Some(rfc3339(at));
        }
    }

    fn meta(&self) -> StreamMeta {
        StreamMeta {
            label: self.info.label.clone(),
            media: self.info.media.clone(),
            codec: self.info.codec.name.clone(),
            payload_type: self.info.codec.payload_type,
            clock_rate: self.info.codec.clock_rate,
            local_port: self.info.local_port,
            rtcp_port: self.info.rtcp_port,
            channel: self.channel,
            decoded: self.channel.is_some() && self.decoder().is_some(),
            srtp: self.info.srtp,
            packets: self.packets,
            bytes: self.bytes,
            rtcp_packets: self.rtcp_packets,
            lost: self.ssrcs.iter().map(|s| s.lost).sum(),
            ssrcs: self.ssrcs.clone(),
            paused: self.paused.clone(),
            added_at: rfc3339(self.added_at),
            removed_at: self.removed_at.map(rfc3339),
            dtmf: self.dtmf.clone(),
            ring_drops: self.ring_drops,
            decode: self.media.stats.clone(),
        }
    }
}

pub(crate) struct Recording {
    pub dir: PathBuf,
    started: SystemTime,
    meta: RecordingMetadata,
    streams: Vec<Stream>,
    pcap: Option<PcapWriter>,
    wav: Option<WavWriter>,
    /// Metadata changed since the last write (counters: refreshed on the writer's schedule).
    pub dirty: bool,
    /// A change an operator should see at the next flush (first drops of a kind).
    pub urgent: bool,
    /// When the counters in `metadata.json` may be refreshed next (set by the writer).
    pub next_meta: Instant,
    /// When the buffers are handed to the file thread next, whether or not they are full (set
    /// by the shard: spread over the flush interval).
    pub next_flush: Instant,
    /// Where the file work goes.
    files: FileQueue,
    /// What the file thread found (write failures).
    io: Arc<RecordingIo>,
    /// Write failures already reported in the metadata (new ones make it urgent).
    failures_seen: u64,
    /// Free space media writes leave on the filesystem.
    floor: u64,
    /// WAV frame of the newest arrival: frames [`wav::WINDOW_MS`] before it may go to the file.
    newest: i64,
    /// Packets stored, and how many there were at the last periodic flush: a recording idle
    /// for a whole flush interval writes its WAV window too (once), so that its files hold all
    /// its audio while it is on hold or silent.
    stored: u64,
    stored_at_flush: u64,
    idle_written: bool,
    /// Size of the next chunk in 1/1024 of the usual: the first one is smaller by a fraction
    /// that depends on the id, so that recordings started together (a bench, a failover) do
    /// not all hand over their chunks in the same instant.
    chunk_scale: u64,
    id: Arc<str>,
    /// SRTP authentication failures not yet added to the writer's counters (by the shard).
    pub srtp_auth_failed: u64,
    /// What the pcap holds of SRTP streams (set by the shard from its configuration).
    pub pcap_srtp: PcapSrtp,
}

/// A handover whose file jobs are queued ([`Recording::handover`]).
pub(crate) struct PendingHandover {
    handover: RecordingHandover,
    pcap_path: Option<PathBuf>,
}

impl PendingHandover {
    /// After the file queue's barrier: the handover, with what the pcap holds (a chunk the
    /// disk refused is not in it).
    pub(crate) fn done(mut self) -> RecordingHandover {
        self.handover.pcap_len = self
            .pcap_path
            .map(|p| fs::metadata(p).map_or(0, |m| m.len()));
        self.handover
    }
}

/// What a handover carries of one active recording: enough to reopen its files and go on
/// exactly where it stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RecordingHandover {
    pub dir: PathBuf,
    /// Time of WAV frame 0.
    started: SystemTime,
    /// `metadata.json` as written at the handover (state `active`).
    pub meta: RecordingMetadata,
    streams: Vec<Stream>,
    /// Length of the pcap (the file was cut to it).
    pcap_len: Option<u64>,
    /// The WAV's layout and length in frames (the file was cut to it).
    wav: Option<WavHandover>,
}

impl RecordingHandover {
    /// The flow ids its streams are routed by (RTP and RTCP).
    pub(crate) fn flow_ids(&self) -> Vec<u64> {
        self.streams
            .iter()
            .flat_map(|s| std::iter::once(s.info.flow_id).chain(s.info.rtcp_flow_id))
            .collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WavHandover {
    channels: u16,
    rate: u32,
    frames: u64,
}

/// What a recording starts with (the fields of `SessionEvent::Started`).
pub(crate) struct Start<'a> {
    pub id: &'a str,
    pub at: SystemTime,
    pub ids: &'a CallIds,
    pub streams: &'a [StreamInfo],
    pub participants: &'a [Participant],
    pub metadata: Option<&'a MetadataVersion>,
    pub host: &'a str,
    /// Free space media writes leave on the filesystem.
    pub floor: u64,
    /// The shard's file thread (None: file work runs on the calling thread).
    pub files: Option<FileQueue>,
}

fn queue_or_inline(files: Option<FileQueue>) -> FileQueue {
    files.unwrap_or_else(|| FileQueue::inline(Arc::new(IoCounters::default())))
}

impl Recording {
    pub(crate) fn create(spool: &Path, s: Start<'_>) -> io::Result<Self> {
        if s.id.is_empty() || s.id.contains(['/', '\\', '\0']) || s.id.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("recording id {:?} is not a valid directory name", s.id),
            ));
        }
        let dir = spool.join(s.id);
        // One channel per audio stream, in stream order.
        let mut labels = Vec::new();
        let mut streams = Vec::new();
        for info in s.streams {
            let channel = (info.media == "audio").then(|| {
                labels.push(info.label.clone());
                labels.len() as u16 - 1
            });
            streams.push(Stream::new(info.clone(), channel, s.at));
        }
        let mut notes = Vec::new();
        for st in &streams {
            if st.channel.is_some() && st.decoder().is_none() {
                notes.push(not_decoded_note(&st.info));
            }
        }
        // The widest stream sets the WAV's rate; the others are resampled to it.
        let rate = streams
            .iter()
            .filter(|st| st.channel.is_some())
            .filter_map(|st| st.decoder().map(CodecKind::sample_rate))
            .max()
            .unwrap_or(WAV_RATE);
        let pcap = PcapWriter::new(&dir.join(PCAP_FILE));
        let wav = WavWriter::new(&dir.join(WAV_FILE), labels.len().max(1) as u16, rate);
        let files = queue_or_inline(s.files);
        let io = Arc::<RecordingIo>::default();
        // The directory and the files' headers are made by the file thread, ahead of every
        // other job of this recording: the packet stage (and the SIP driver behind it) never
        // waits for the filesystem.
        files.submit(Job::Create {
            id: Arc::from(s.id),
            io: io.clone(),
            dir: dir.clone(),
            pcap_header: pcap::global_header(),
            wav_header: wav.empty_header(),
        });
        let now = rfc3339(s.at);
        let mut rec = Self {
            meta: RecordingMetadata {
                id: s.id.to_string(),
                sip_call_id: s.ids.sip_call_id.clone(),
                call_uuid: None,
                call_uuid_source: None,
                connection_id: None,
                extra_ids: Vec::new(),
                host: s.host.to_string(),
                state: RecordingState::Active,
                end_reason: None,
                end_detail: None,
                interaction: None,
                previous: None,
                started_at: now.clone(),
                ended_at: None,
                updated_at: now,
                media_received: false,
                participants: Vec::new(),
                streams: Vec::new(),
                metadata_versions: Vec::new(),
                wav: WavMeta {
                    sample_rate: rate,
                    channels: labels,
                    frames: 0,
                },
                dropped: DropCounters::default(),
                notes,
            },
            dir,
            started: s.at,
            streams,
            pcap: Some(pcap),
            wav: Some(wav),
            dirty: true,
            urgent: false,
            next_meta: Instant::now(),
            next_flush: Instant::now(),
            files,
            io,
            failures_seen: 0,
            floor: s.floor,
            newest: 0,
            stored: 0,
            stored_at_flush: 0,
            idle_written: false,
            chunk_scale: first_chunk_scale(s.id),
            id: Arc::from(s.id),
            srtp_auth_failed: 0,
            pcap_srtp: PcapSrtp::default(),
        };
        rec.set_ids(s.ids);
        rec.set_participants(s.participants);
        if let Some(m) = s.metadata {
            rec.add_metadata_version(m);
        }
        Ok(rec)
    }

    pub(crate) fn id(&self) -> &str {
        &self.meta.id
    }

    /// Reception statistics per SSRC of each live (not removed) stream, by RTP flow id.
    pub(crate) fn reception(&self) -> impl Iterator<Item = (u64, &[SsrcStats])> {
        self.streams
            .iter()
            .filter(|s| s.removed_at.is_none())
            .map(|s| (s.info.flow_id, s.ssrcs.as_slice()))
    }

    /// SRTP/SRTCP authentication failures of each live stream, by RTP flow id.
    pub(crate) fn auth_failures(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.streams
            .iter()
            .filter(|s| s.removed_at.is_none())
            .map(|s| {
                let m = &s.media.stats;
                (s.info.flow_id, m.auth_failures + m.rtcp_auth_failures)
            })
    }

    /// Flow ids routed to this recording: (flow id, stream index, is RTCP).
    pub(crate) fn flows(&self) -> Vec<(u64, usize, bool)> {
        let mut out = Vec::new();
        // Removed streams stay routed until the recording ends: flow ids are never reused, and
        // packets captured just before the removal still belong to this recording.
        for (i, s) in self.streams.iter().enumerate() {
            out.push((s.info.flow_id, i, false));
            if let Some(r) = s.info.rtcp_flow_id {
                out.push((r, i, true));
            }
        }
        out
    }

    pub(crate) fn set_ids(&mut self, ids: &CallIds) {
        let m = &mut self.meta;
        if !ids.sip_call_id.is_empty() {
            m.sip_call_id = ids.sip_call_id.clone();
        }
        // Later messages may add ids; never forget one already known.
        if ids.call_uuid.is_some() {
            m.call_uuid = ids.call_uuid.clone();
            m.call_uuid_source = ids.call_uuid_source.clone();
        }
        if ids.connection_id.is_some() {
            m.connection_id = ids.connection_id.clone();
        }
        for kv in &ids.extra {
            if !m.extra_ids.contains(kv) {
                m.extra_ids.push(kv.clone());
            }
        }
        self.dirty = true;
    }

    /// Links this recording to the earlier recordings of its interaction (same CallUUID).
    pub(crate) fn link(&mut self, interaction: String, previous: String) {
        self.meta.interaction = Some(interaction);
        self.meta.previous = Some(previous);
        self.dirty = true;
    }

    pub(crate) fn set_participants(&mut self, ps: &[Participant]) {
        self.meta.participants = ps
            .iter()
            .map(|p| ParticipantMeta {
                id: p.id.clone(),
                name: p.name.clone(),
                aor: p.aor.clone(),
                joined_at: p.joined_at.map(rfc3339),
                left_at: p.left_at.map(rfc3339),
                sends: p.sends.clone(),
                receives: p.receives.clone(),
            })
            .collect();
        self.dirty = true;
    }

    /// Stores a SIPREC metadata body as `metadata-<n>.xml` and lists it.
    pub(crate) fn add_metadata_version(&mut self, m: &MetadataVersion) {
        let file = format!("metadata-{}.xml", m.version);
        let path = self.dir.join(&file);
        // On the file thread: an fsync per new session on the packet stage held packet writing
        // up (failures are counted there, in `metadata_write_failed`).
        self.files.submit(Job::Replace {
            path,
            bytes: m.xml.clone().into_bytes(),
            id: self.id.clone(),
            sync: true,
            io: Some(self.io.clone()),
        });
        self.meta
            .metadata_versions
            .retain(|v| v.version != m.version);
        self.meta.metadata_versions.push(MetadataVersionMeta {
            version: m.version,
            received_at: rfc3339(m.received_at),
            method: m.method.clone(),
            file,
        });
        self.dirty = true;
    }

    /// A new stream list (re-INVITE). Streams keep their state when their flow id (or, failing
    /// that, their label) matches; absent ones are marked removed; new labels get no WAV channel
    /// (the channel count is fixed when the file is created) and are kept in the pcap.
    pub(crate) fn media_changed(&mut self, at: SystemTime, new: &[StreamInfo]) {
        let mut seen = vec![false; self.streams.len()];
        for info in new {
            let existing = self
                .streams
                .iter()
                .position(|s| s.removed_at.is_none() && s.info.flow_id == info.flow_id)
                .or_else(|| self.streams.iter().position(|s| s.info.label == info.label));
            match existing {
                Some(i) => {
                    let s = &mut self.streams[i];
                    let was_decoded = s.decoder().is_some();
                    s.removed_at = None;
                    if s.info.codec.payload_type != info.codec.payload_type {
                        // Packets sent before the switch still arrive with the old type.
                        s.media.remember_codec(&s.info.codec);
                    }
                    s.info = info.clone();
                    s.negotiated = std::cell::OnceCell::new();
                    // A re-INVITE may bring a new key (a transfer to a new leg).
                    if s.media.set_key(info).is_err() {
                        self.meta.notes.push(format!(
                            "stream {:?}: the new SRTP key of {} cannot be used",
                            info.label,
                            rfc3339(at)
                        ));
                    }
                    s.set_paused(info.paused, at);
                    if s.channel.is_some() && was_decoded && s.decoder().is_none() {
                        self.meta.notes.push(not_decoded_note(info));
                    }
                    seen[i] = true;
                }
                None => {
                    self.meta.notes.push(format!(
                        "stream {:?} added at {} after the WAV was laid out: kept in the pcap only",
                        info.label,
                        rfc3339(at)
                    ));
                    self.streams.push(Stream::new(info.clone(), None, at));
                }
            }
        }
        for (s, seen) in self.streams.iter_mut().zip(seen) {
            if !seen && s.removed_at.is_none() {
                s.removed_at = Some(at);
            }
        }
        self.dirty = true;
    }

    pub(crate) fn set_paused(&mut self, label: &str, paused: bool, at: SystemTime) {
        for s in self.streams.iter_mut().filter(|s| s.info.label == label) {
            s.set_paused(paused, at);
        }
        self.dirty = true;
    }

    /// Records one captured packet of stream `stream` (into memory: the pcap record and, for
    /// decoded audio, its samples). Returns the bytes of its pcap record.
    pub(crate) fn packet(&mut self, stream: usize, rtcp: bool, p: &CapturedPacket<'_>) -> usize {
        let Some(s) = self.streams.get_mut(stream) else {
            return 0;
        };
        self.stored += 1;
        let received = p
            .frame
            .get(p.header.payload_offset as usize..)
            .unwrap_or(&[]);
        let kind = if rtcp {
            Kind::Rtcp
        } else {
            rtp::parse(received)
        };
        let is_rtcp = matches!(kind, Kind::Rtcp);
        let unprotected = match kind {
            Kind::Malformed => Unprotected::Clear,
            _ => s.media.unprotect(&s.info, received, is_rtcp),
        };
        // The pcap holds what was received, or with `pcap_srtp = "decrypted"` the plain
        // RTP/RTCP of what authenticated (the rest as received).
        let rebuilt = match (&unprotected, self.pcap_srtp) {
            (Unprotected::Plain(plain), PcapSrtp::Decrypted) => {
                decrypted_frame(p.frame, p.header.payload_offset as usize, plain)
            }
            _ => None,
        };
        let (frame, wire_len) = match &rebuilt {
            Some(f) => {
                let cut = p.frame.len() - f.len();
                (&f[..], p.header.wire_len - cut as u32)
            }
            None => (p.frame, p.header.wire_len),
        };
        let mut stored = 0;
        if let Some(pcap) = self.pcap.as_mut() {
            let files = &self.files;
            stored = pcap.push(stream, p.wall, wire_len, frame, || {
                files.buffer(pcap::CHUNK + 2048)
            });
        }
        if let Kind::Malformed = kind {
            self.meta.dropped.malformed += 1;
            return stored;
        }
        if is_rtcp {
            s.rtcp_packets += 1;
        } else {
            s.packets += 1;
            s.bytes += p.header.wire_len as u64;
            self.meta.media_received = true;
        }
        // SRTP: what fails authentication goes no further than the pcap.
        let payload = match &unprotected {
            Unprotected::Clear => received,
            Unprotected::Plain(plain) => &plain[..],
            Unprotected::Rejected { auth } => {
                self.srtp_auth_failed += u64::from(*auth);
                self.dirty = true;
                return stored;
            }
        };
        let h = match rtp::parse(payload) {
            Kind::Rtp(h) if !is_rtcp => h,
            Kind::Malformed => {
                self.meta.dropped.malformed += 1;
                return stored;
            }
            _ => return stored,
        };
        let idx = match s.ssrcs.iter().position(|x| x.ssrc == h.ssrc) {
            Some(i) => i,
            None => {
                s.ssrcs.push(SsrcStats::new(h.ssrc, h.seq));
                s.ssrcs.len() - 1
            }
        };
        let x = &mut s.ssrcs[idx];
        x.record(h.seq);
        // Arrival in units of the stream's clock, for the RTCP jitter.
        // Split in seconds and the rest (same value as micros * clock / 10^6, wrapped to 32
        // bits as RTP timestamps are): no 128-bit division per packet.
        let clock = u64::from(s.info.codec.clock_rate.max(1));
        let since_epoch = p.wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let arrival = since_epoch
            .as_secs()
            .wrapping_mul(clock)
            .wrapping_add(u64::from(since_epoch.subsec_micros()) * clock / 1_000_000);
        x.record_arrival(h.timestamp, arrival as u32);
        if s.info.telephone_event_pt == Some(h.payload_type) {
            // DTMF: listed in the metadata, kept in the pcap, never decoded as audio (the WAV
            // channel stays silent for these packets).
            let data = payload
                .get(h.payload_offset..h.payload_offset + h.payload_len)
                .unwrap_or(&[]);
            let offset_ms = frames_between(self.started, p.wall, 1000);
            if dtmf::record(
                &mut s.dtmf,
                &h,
                data,
                s.info.codec.clock_rate,
                p.wall,
                offset_ms,
            ) {
                self.dirty = true;
            } else {
                self.meta.dropped.malformed += 1;
            }
            return stored;
        }
        let (Some(channel), Some(dec)) = (s.channel, s.decoder_for(h.payload_type)) else {
            self.meta.dropped.not_decoded += 1;
            return stored;
        };
        if s.paused_now {
            self.meta.dropped.while_paused += 1;
            return stored;
        }
        let Some(wav) = self.wav.as_mut() else {
            return stored;
        };
        let wall_pos = frames_between(self.started, p.wall, wav.rate());
        self.newest = self.newest.max(wall_pos);
        let rate = wav.rate() as i64;
        let ripe = (self.newest - wav::WINDOW_MS as i64 * rate / 1000).max(0) as u64;
        let chunk = wav::CHUNK_MS * rate as u64 / 1000 * self.chunk_scale / 1024;
        let pcap_chunk = pcap::CHUNK as u64 * self.chunk_scale / 1024;
        let pcap_full = self
            .pcap
            .as_ref()
            .is_some_and(|p| p.buffered() as u64 >= pcap_chunk);
        if ripe >= wav.base() + chunk || pcap_full {
            // Before placing this packet: the window then starts at most WINDOW_MS before it
            // (after a silence, the frames skipped stay a hole in the file, not zeros here).
            media_out!(self).hand_over(false);
            self.chunk_scale = 1024;
        }
        let Some(wav) = self.wav.as_mut() else {
            return stored;
        };
        let pos = s
            .aligner
            .position(&h, s.info.codec.clock_rate, wav.rate(), wall_pos);
        let data = payload
            .get(h.payload_offset..h.payload_offset + h.payload_len)
            .unwrap_or(&[]);
        let rate = wav.rate();
        let mut out_of_range = false;
        // Audio before the start of the recording is cut (packets racing the 200 OK), so is
        // audio past the RIFF limit or before the window kept in memory.
        let mut place = |pos: i64, samples: Samples<'_>| {
            let (len, skip) = (samples.len(), (-pos).max(0) as usize);
            if skip >= len || pos > MAX_WAV_SECONDS * rate as i64 {
                out_of_range = true;
                return;
            }
            let start = pos.max(0) as u64;
            let n = match samples {
                Samples::Pcm(s) => wav.write(channel, start, s[skip..].iter().copied()),
                Samples::G711(b, t) => {
                    wav.write(channel, start, b[skip..].iter().map(|&x| t[usize::from(x)]))
                }
            };
            if n + skip < len {
                out_of_range = true;
            }
        };
        s.media.decode(dec, &h, data, pos, rate, &mut place);
        if out_of_range {
            self.meta.dropped.out_of_range += 1;
        }
        stored
    }

    /// Hands the buffered pcap records and the WAV frames older than the window to the file
    /// thread (with `all`: every frame in memory, which stays there too).
    fn hand_over_media(&mut self, all: bool) {
        media_out!(self).hand_over(all);
    }

    /// The metadata's counters as the packet stage knows them (write failures not applied:
    /// see [`apply_failures`]).
    fn refresh_meta(&mut self, now: SystemTime) {
        self.meta.streams = self.streams.iter().map(Stream::meta).collect();
        self.meta.wav.frames = self
            .wav
            .as_ref()
            .map_or(self.meta.wav.frames, |w| w.frames());
        self.meta.updated_at = rfc3339(now);
    }

    /// Writes `metadata.json` (atomically, through the file thread). Failures are counted (by
    /// the file thread in [`crate::writer::WriterStats::metadata_write_failed`]), the old file
    /// stays.
    pub(crate) fn write_metadata(&mut self, now: SystemTime) {
        self.replace_metadata(now, true)
    }

    /// Periodic counter refresh: like [`Self::write_metadata`], without an fsync.
    pub(crate) fn refresh_metadata(&mut self, now: SystemTime) {
        self.replace_metadata(now, false)
    }

    fn replace_metadata(&mut self, now: SystemTime, sync: bool) {
        // The media it counts goes first (same FIFO): after a crash, the files hold at least
        // what the last metadata.json says.
        self.hand_over_media(true);
        self.refresh_meta(now);
        apply_failures(&mut self.meta, &self.io);
        match serde_json::to_vec_pretty(&self.meta) {
            Ok(bytes) => self.files.submit(Job::Replace {
                path: self.dir.join(METADATA_FILE),
                bytes,
                id: self.id.clone(),
                sync,
                io: Some(self.io.clone()),
            }),
            Err(e) => {
                self.meta.dropped.metadata_write_failed += 1;
                warn!(recording = %self.meta.id, error = %e, "cannot encode metadata.json");
            }
        }
        self.dirty = false;
        self.urgent = false;
    }

    /// Flush: every buffered byte to the files, then the metadata.
    #[cfg(test)]
    pub(crate) fn flush(&mut self, now: SystemTime) {
        self.sync_media();
        self.write_metadata(now);
    }

    /// Periodic media flush: what the buffers hold goes to the file thread (WAV frames older
    /// than the window); new write failures make the metadata urgent.
    pub(crate) fn flush_media(&mut self) {
        let idle = self.stored == self.stored_at_flush;
        if !idle {
            self.hand_over_media(false);
            self.idle_written = false;
        } else if !self.idle_written {
            self.hand_over_media(true);
            self.idle_written = true;
        }
        self.stored_at_flush = self.stored;
        let failures = self.io.pcap_failed_total() + self.io.wav_failed();
        if failures > self.failures_seen {
            self.urgent |= self.failures_seen == 0;
            self.failures_seen = failures;
            self.dirty = true;
        }
    }

    /// Everything recorded so far goes to the file thread (the WAV window too, kept in memory
    /// for late packets): after the file thread's next barrier the files hold it all.
    pub(crate) fn sync_media(&mut self) {
        self.hand_over_media(true);
    }

    /// Hands every buffered byte to the file thread, then the job that cuts the WAV to
    /// `frames` (silence up to there) with its final header and syncs both files.
    fn close_files(&mut self) {
        self.hand_over_media(true);
        let wav = self.wav.take().map(|w| {
            let (len, header) = w.final_len_and_header();
            (w.path, len, header)
        });
        let pcap = self.pcap.take().map(|p| p.path);
        self.files.submit(Job::Finish {
            id: self.id.clone(),
            io: self.io.clone(),
            pcap,
            wav,
        });
    }

    /// Ends the recording: the WAV covers the whole call (silence up to the end), files are cut
    /// to their length and synced, metadata says `complete`.
    pub(crate) fn finish(
        mut self,
        at: SystemTime,
        reason: &str,
        detail: Option<String>,
        ring_drops: &[(u64, u64)],
        index: Option<IndexQueue>,
    ) {
        for &(flow, n) in ring_drops {
            if let Some(s) = self
                .streams
                .iter_mut()
                .find(|s| s.info.flow_id == flow || s.info.rtcp_flow_id == Some(flow))
            {
                s.ring_drops += n;
            }
            self.meta.dropped.ring_full += n;
        }
        if self.meta.dropped.ring_full > 0 {
            self.meta.notes.push(format!(
                "{} packets were lost to a full ring buffer (the writer was held up longer than the rings cover)",
                self.meta.dropped.ring_full
            ));
        }
        for s in &mut self.streams {
            s.set_paused(false, at);
        }
        if let Some(w) = self.wav.as_mut() {
            let mut frames = frames_between(self.started, at, w.rate()).max(0);
            let max = MAX_WAV_SECONDS * w.rate() as i64;
            if frames > max {
                frames = max;
                self.meta.notes.push(format!(
                    "end time {} is more than {MAX_WAV_SECONDS} s after the start: WAV cut there",
                    rfc3339(at)
                ));
            }
            w.extend_to(frames as u64);
            self.meta.wav.frames = w.frames();
        }
        self.close_files();
        self.refresh_meta(at);
        if !self.meta.media_received {
            self.meta.notes.push("no media arrived".to_string());
        }
        self.meta.state = RecordingState::Complete;
        self.meta.end_reason = Some(reason.to_string());
        self.meta.end_detail = detail;
        self.meta.ended_at = Some(rfc3339(at));
        // The file thread writes the final metadata once the files are done (the failure
        // counts of the last chunks known), then the index row: the packet stage never waits
        // for these fsyncs.
        self.files.submit(Job::Finalize {
            dir: self.dir.clone(),
            meta: Box::new(self.meta.clone()),
            io: self.io.clone(),
            index,
        });
    }

    /// WAV frames held in memory (tests: silence is not held).
    #[cfg(test)]
    pub(crate) fn wav_window_frames(&self) -> u64 {
        self.wav.as_ref().map_or(0, |w| w.window_frames())
    }

    pub(crate) fn metadata(&self) -> &RecordingMetadata {
        &self.meta
    }

    /// Stops writing without ending: the files are written, cut to their length and synced
    /// (valid for any reader), `metadata.json` is written (still `active`), and what it takes
    /// to go on is returned. A file that cannot be finished is logged; [`Self::resume`] then
    /// finds it changed and the recording ends up `interrupted` (and repaired).
    ///
    /// The jobs are queued here; the caller waits for its file queue ([`FileQueue::barrier`])
    /// once for every recording it hands over, then calls [`PendingHandover::done`]: a barrier
    /// per recording made 1 000 recordings' syncs run one after the other (5 s of a restart).
    pub(crate) fn handover(mut self, now: SystemTime) -> PendingHandover {
        let wav = self.wav.as_ref().map(|w| WavHandover {
            channels: w.channels(),
            rate: w.rate(),
            frames: w.frames(),
        });
        if let Some(w) = &wav {
            self.meta.wav.frames = w.frames;
        }
        let pcap_path = self.pcap.as_ref().map(|p| p.path.clone());
        self.close_files();
        // Not synced: the next daemon reads it through the same page cache, and a host crash
        // during the restart is repaired like any other (the media files are synced).
        self.replace_metadata(now, false);
        PendingHandover {
            handover: RecordingHandover {
                dir: self.dir,
                started: self.started,
                meta: self.meta,
                streams: self.streams,
                pcap_len: None,
                wav,
            },
            pcap_path,
        }
    }

    /// Reopens the files of a handed-over recording and goes on after their last byte. Fails
    /// (leaving the files as they are) when a file is missing or not as the handover left it.
    pub(crate) fn resume(
        h: RecordingHandover,
        floor: u64,
        files: Option<FileQueue>,
    ) -> io::Result<Self> {
        let pcap = match h.pcap_len {
            Some(len) => Some(PcapWriter::open(&h.dir.join(PCAP_FILE), len)?),
            None => None,
        };
        let wav = match &h.wav {
            Some(w) => Some(WavWriter::open(
                &h.dir.join(WAV_FILE),
                w.channels,
                w.rate,
                w.frames,
            )?),
            None => None,
        };
        let id = Arc::from(h.meta.id.as_str());
        let newest = wav.as_ref().map_or(0, |w| w.frames() as i64);
        Ok(Self {
            dir: h.dir,
            started: h.started,
            meta: h.meta,
            streams: h.streams,
            pcap,
            wav,
            dirty: true,
            urgent: false,
            next_meta: Instant::now(),
            next_flush: Instant::now(),
            files: queue_or_inline(files),
            io: Arc::default(),
            failures_seen: 0,
            floor,
            newest,
            stored: 0,
            stored_at_flush: 0,
            idle_written: false,
            chunk_scale: first_chunk_scale(&id),
            id,
            srtp_auth_failed: 0,
            pcap_srtp: PcapSrtp::default(),
        })
    }
}

/// The fields of a recording the hand-over uses, borrowed field by field (so that `packet`
/// can hand over while it holds one of the streams).
macro_rules! media_out {
    ($rec:expr) => {
        MediaOut {
            pcap: &mut $rec.pcap,
            wav: &mut $rec.wav,
            files: &$rec.files,
            io: &$rec.io,
            id: &$rec.id,
            newest: $rec.newest,
            floor: $rec.floor,
        }
    };
}
use media_out;

/// A recording's buffers and where they go.
struct MediaOut<'a> {
    pcap: &'a mut Option<PcapWriter>,
    wav: &'a mut Option<WavWriter>,
    files: &'a FileQueue,
    io: &'a Arc<RecordingIo>,
    id: &'a Arc<str>,
    newest: i64,
    floor: u64,
}

impl MediaOut<'_> {
    /// Hands the buffered pcap records and the WAV frames older than the window to the file
    /// thread (with `all`: every frame in memory, which stays there too).
    fn hand_over(self, all: bool) {
        let pcap = self.pcap.as_mut().and_then(PcapWriter::take_chunk);
        let files = self.files;
        let newest = self.newest;
        let wav = self.wav.as_mut().and_then(|w| {
            let rate = w.rate() as i64;
            let ripe = (newest - wav::WINDOW_MS as i64 * rate / 1000).max(0) as u64;
            w.take_chunk(ripe, all, |n| files.buffer(n))
        });
        if pcap.is_some() || wav.is_some() {
            files.submit(Job::Media {
                id: self.id.clone(),
                io: self.io.clone(),
                pcap,
                wav,
                floor: self.floor,
            });
        }
    }
}

/// 1/4 to 1 of a chunk, by a hash of the recording id.
fn first_chunk_scale(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    256 + h.finish() % 769
}

/// Applies what the file thread found to the counters of `meta`: packets whose pcap record
/// could not be written are not recorded.
pub(crate) fn apply_failures(meta: &mut RecordingMetadata, io: &RecordingIo) {
    for (i, s) in meta.streams.iter_mut().enumerate() {
        s.packets = s.packets.saturating_sub(io.pcap_failed(i));
    }
    meta.dropped.pcap_write_failed = io.pcap_failed_total();
    meta.dropped.wav_write_failed = io.wav_failed();
}

fn not_decoded_note(info: &StreamInfo) -> String {
    let why = if info.srtp {
        "SRTP".to_string()
    } else {
        format!("codec {} is not decoded", info.codec.name)
    };
    format!(
        "stream {:?}: {why}; its audio is kept in the pcap only (silent WAV channel)",
        info.label
    )
}

/// Frames at `rate` from `from` to `to` (negative when `to` is earlier).
fn frames_between(from: SystemTime, to: SystemTime, rate: u32) -> i64 {
    // Whole seconds and the rest apart: the same truncated value as ns * rate / 10^9, without
    // a 128-bit division (called for every packet).
    let (d, sign) = match to.duration_since(from) {
        Ok(d) => (d, 1),
        Err(e) => (e.duration(), -1),
    };
    let rate = u64::from(rate);
    let frames = d
        .as_secs()
        .saturating_mul(rate)
        .saturating_add(u64::from(d.subsec_nanos()) * rate / 1_000_000_000);
    sign * frames.min(i64::MAX as u64) as i64
}
