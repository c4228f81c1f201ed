//! One recording: its directory, files and counters. Driven by the writer thread only.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    dtmf::{self, DtmfEvent},
    files::FileQueue,
    g711,
    metadata::{
        rfc3339, write_atomic, DropCounters, Interval, MetadataVersionMeta, ParticipantMeta,
        RecordingMetadata, RecordingState, StreamMeta, WavMeta, METADATA_FILE, PCAP_FILE, WAV_FILE,
    },
    pcap::{self, PcapWriter},
    rtp::{self, full_ssrcs, Aligner, Kind, SsrcStats},
    wav::WavWriter,
};
use crate::{
    capture::CapturedPacket,
    events::{CallIds, MetadataVersion, Participant, StreamInfo},
};

/// Sample rate of the WAV: G.711 is the only codec decoded.
pub(crate) const WAV_RATE: u32 = 8000;
/// Longest WAV written (24 h): guards against a wall clock step turning into gigabytes of
/// silence. Audio past it stays in the pcap (counted as `out_of_range`).
const MAX_WAV_SECONDS: i64 = 24 * 3600;

/// Codec of a payload type the WAV can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoder {
    Pcmu,
    Pcma,
}

impl Decoder {
    /// Called per packet: compares in place (no uppercased copy).
    fn for_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("PCMU") {
            Some(Decoder::Pcmu)
        } else if name.eq_ignore_ascii_case("PCMA") {
            Some(Decoder::Pcma)
        } else {
            None
        }
    }

    /// Byte-to-sample table: the WAV writer decodes while it interleaves (no intermediate
    /// buffer per packet).
    fn table(self) -> &'static [i16; 256] {
        match self {
            Decoder::Pcmu => &g711::ULAW,
            Decoder::Pcma => &g711::ALAW,
        }
    }
}

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
        }
    }

    fn decoder(&self) -> Option<Decoder> {
        if self.info.srtp || self.info.media != "audio" {
            return None;
        }
        Decoder::for_name(&self.info.codec.name)
    }

    /// Decoder for one packet's payload type (static PCMU/PCMA types are honoured even when
    /// the answer chose the other, as some clients switch).
    fn decoder_for(&self, pt: u8) -> Option<Decoder> {
        let negotiated = self.decoder()?;
        if pt == self.info.codec.payload_type {
            return Some(negotiated);
        }
        match pt {
            0 => Some(Decoder::Pcmu),
            8 => Some(Decoder::Pcma),
            _ => None,
        }
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
        }
    }
}

/// Which file failed, for the caller's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WriteFailures {
    pub pcap: bool,
    pub wav: bool,
    /// Bytes written to the files (pcap record, WAV samples), for the disk metrics.
    pub bytes: u64,
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
    /// Where `metadata.json` replacements go (None: written here, synchronously).
    pub files: Option<FileQueue>,
    /// A disk error was already logged (log once, count always).
    warned: bool,
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
    /// The writer's file thread (None: files are replaced from the calling thread).
    pub files: Option<FileQueue>,
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
        // Never reuse (and truncate) the files of an earlier recording with the same id.
        fs::create_dir(&dir)?;
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
        let files = PcapWriter::create(&dir.join(PCAP_FILE), s.floor).and_then(|pcap| {
            let channels = labels.len().max(1) as u16;
            let wav = WavWriter::create(&dir.join(WAV_FILE), channels, WAV_RATE, s.floor)?;
            Ok((pcap, wav))
        });
        let (pcap, wav) = match files {
            Ok(f) => f,
            Err(e) => {
                // The directory is ours (created above): leave no half-made recording behind.
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
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
                    sample_rate: WAV_RATE,
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
            files: s.files,
            warned: false,
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

    pub(crate) fn drops(&mut self) -> &mut DropCounters {
        &mut self.meta.dropped
    }

    /// Reception statistics per SSRC of each live (not removed) stream, by RTP flow id.
    pub(crate) fn reception(&self) -> impl Iterator<Item = (u64, &[SsrcStats])> {
        self.streams
            .iter()
            .filter(|s| s.removed_at.is_none())
            .map(|s| (s.info.flow_id, s.ssrcs.as_slice()))
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
        // On the file thread when there is one: an fsync per new session on the writer thread
        // held packet writing up (failures are counted there, in `metadata_write_failed`).
        let queued = self.files.as_ref().is_some_and(|files| {
            files.write(
                path.clone(),
                m.xml.clone().into_bytes(),
                &self.meta.id,
                true,
            )
        });
        if !queued {
            if let Err(e) = write_atomic(&path, m.xml.as_bytes()) {
                self.meta.dropped.metadata_write_failed += 1;
                warn!(recording = %self.meta.id, error = %e, "cannot write {file}");
                return;
            }
        }
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
                    s.info = info.clone();
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

    /// Records one captured packet of stream `stream`.
    pub(crate) fn packet(
        &mut self,
        stream: usize,
        rtcp: bool,
        p: &CapturedPacket<'_>,
    ) -> WriteFailures {
        let mut failed = WriteFailures::default();
        let Some(s) = self.streams.get_mut(stream) else {
            return failed;
        };
        if let Some(pcap) = self.pcap.as_mut() {
            if let Err(e) = pcap.write(p.wall, p.header.wire_len, p.frame) {
                failed.pcap = true;
                self.urgent |= self.meta.dropped.pcap_write_failed == 0;
                self.meta.dropped.pcap_write_failed += 1;
                if !self.warned {
                    self.warned = true;
                    warn!(recording = %self.meta.id, error = %e, "pcap write failed; dropping packets");
                }
                // Without the pcap record, it is not counted as recorded either.
                return failed;
            }
            failed.bytes += (pcap::RECORD_HEADER_LEN + p.frame.len()) as u64;
        }
        let payload = p
            .frame
            .get(p.header.payload_offset as usize..)
            .unwrap_or(&[]);
        if rtcp {
            s.rtcp_packets += 1;
            return failed;
        }
        let h = match rtp::parse(payload) {
            Kind::Rtp(h) => h,
            Kind::Rtcp => {
                s.rtcp_packets += 1;
                return failed;
            }
            Kind::Malformed => {
                self.meta.dropped.malformed += 1;
                return failed;
            }
        };
        s.packets += 1;
        s.bytes += p.header.wire_len as u64;
        self.meta.media_received = true;
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
            return failed;
        }
        let (Some(channel), Some(dec)) = (s.channel, s.decoder_for(h.payload_type)) else {
            self.meta.dropped.not_decoded += 1;
            return failed;
        };
        if s.paused_now {
            self.meta.dropped.while_paused += 1;
            return failed;
        }
        let Some(wav) = self.wav.as_mut() else {
            return failed;
        };
        let wall_pos = frames_between(self.started, p.wall, wav.rate());
        let pos = s
            .aligner
            .position(&h, s.info.codec.clock_rate, wav.rate(), wall_pos);
        let data = payload
            .get(h.payload_offset..h.payload_offset + h.payload_len)
            .unwrap_or(&[]);
        // G.711: one sample per byte.
        let samples = data.len();
        // Audio before the start of the recording is cut (packets racing the 200 OK).
        let skip = (-pos).max(0) as usize;
        if skip >= samples || pos > MAX_WAV_SECONDS * wav.rate() as i64 {
            self.meta.dropped.out_of_range += 1;
            return failed;
        }
        let start = pos.max(0) as u64;
        let table = dec.table();
        let decoded = data[skip..].iter().map(|&b| table[usize::from(b)]);
        match wav.write(channel, start, decoded) {
            Ok(n) => {
                failed.bytes += 2 * n as u64;
                if n + skip < samples {
                    self.meta.dropped.out_of_range += 1;
                }
            }
            Err(e) => {
                failed.wav = true;
                self.urgent |= self.meta.dropped.wav_write_failed == 0;
                self.meta.dropped.wav_write_failed += 1;
                if !self.warned {
                    self.warned = true;
                    warn!(recording = %self.meta.id, error = %e, "wav write failed; dropping audio");
                }
            }
        }
        failed
    }

    fn refresh_meta(&mut self, now: SystemTime) {
        self.meta.streams = self.streams.iter().map(Stream::meta).collect();
        self.meta.wav.frames = self
            .wav
            .as_ref()
            .map_or(self.meta.wav.frames, |w| w.frames());
        self.meta.updated_at = rfc3339(now);
    }

    /// Writes `metadata.json` (atomically), or queues it to the file thread. Failures are
    /// counted (by the file thread in [`super::WriterStats::metadata_write_failed`]), the old
    /// file stays.
    pub(crate) fn write_metadata(&mut self, now: SystemTime) -> bool {
        self.replace_metadata(now, true)
    }

    /// Periodic counter refresh: like [`Self::write_metadata`], without an fsync when it goes
    /// through the file thread (see [`super::files::FileQueue::write`]).
    pub(crate) fn refresh_metadata(&mut self, now: SystemTime) -> bool {
        self.replace_metadata(now, false)
    }

    fn replace_metadata(&mut self, now: SystemTime, sync: bool) -> bool {
        self.refresh_meta(now);
        if let Some(files) = &self.files {
            if let Ok(bytes) = serde_json::to_vec_pretty(&self.meta) {
                if files.write(self.dir.join(METADATA_FILE), bytes, &self.meta.id, sync) {
                    self.dirty = false;
                    self.urgent = false;
                    return true;
                }
            }
        }
        match self.meta.write(&self.dir) {
            Ok(()) => {
                self.dirty = false;
                self.urgent = false;
                true
            }
            Err(e) => {
                self.meta.dropped.metadata_write_failed += 1;
                warn!(recording = %self.meta.id, error = %e, "cannot write metadata.json");
                false
            }
        }
    }

    /// Flush: WAV header sizes, writeback of both files, metadata.
    #[cfg(test)]
    pub(crate) fn flush(&mut self, now: SystemTime) {
        self.flush_media();
        self.write_metadata(now);
    }

    /// Periodic media flush (cheap: no syscall but `msync(MS_ASYNC)`): the WAV header's sizes
    /// cover the frames written, writeback of both files starts.
    pub(crate) fn flush_media(&mut self) {
        if let Some(w) = self.wav.as_mut() {
            if let Err(e) = w.flush() {
                warn!(recording = %self.meta.id, error = %e, "wav flush failed");
            }
        }
        if let Some(p) = self.pcap.as_ref() {
            if let Err(e) = p.flush_async() {
                warn!(recording = %self.meta.id, error = %e, "pcap flush failed");
            }
        }
    }

    /// Ends the recording: the WAV covers the whole call (silence up to the end), files are cut
    /// to their length and synced, metadata says `complete`.
    pub(crate) fn finish(
        mut self,
        at: SystemTime,
        reason: &str,
        detail: Option<String>,
    ) -> RecordingMetadata {
        for s in &mut self.streams {
            s.set_paused(false, at);
        }
        if let Some(mut w) = self.wav.take() {
            let mut frames = frames_between(self.started, at, w.rate()).max(0);
            let max = MAX_WAV_SECONDS * w.rate() as i64;
            if frames > max {
                frames = max;
                self.meta.notes.push(format!(
                    "end time {} is more than {MAX_WAV_SECONDS} s after the start: WAV cut there",
                    rfc3339(at)
                ));
            }
            if let Err(e) = w.extend_to(frames as u64) {
                self.meta.dropped.wav_write_failed += 1;
                warn!(recording = %self.meta.id, error = %e, "cannot extend wav to the call's end");
            }
            self.meta.wav.frames = w.frames();
            if let Err(e) = w.finish() {
                warn!(recording = %self.meta.id, error = %e, "cannot finish wav");
            }
        }
        if let Some(p) = self.pcap.take() {
            if let Err(e) = p.finish() {
                warn!(recording = %self.meta.id, error = %e, "cannot finish pcap");
            }
        }
        if !self.meta.media_received {
            self.meta.notes.push("no media arrived".to_string());
        }
        if self.meta.dropped.pcap_write_failed + self.meta.dropped.wav_write_failed > 0 {
            self.meta
                .notes
                .push("some media was not written (disk full or write error)".to_string());
        }
        self.meta.state = RecordingState::Complete;
        self.meta.end_reason = Some(reason.to_string());
        self.meta.end_detail = detail;
        self.meta.ended_at = Some(rfc3339(at));
        self.write_metadata(at);
        self.meta.clone()
    }

    pub(crate) fn metadata(&self) -> &RecordingMetadata {
        &self.meta
    }

    /// Stops writing without ending: the files are synced and cut to their length (valid for any
    /// reader), `metadata.json` is written (still `active`), and what it takes to go on is
    /// returned. A file that cannot be finished is logged; [`Self::resume`] then finds it
    /// changed and the recording ends up `interrupted` (and repaired).
    pub(crate) fn handover(mut self, now: SystemTime) -> RecordingHandover {
        let wav = self.wav.take().map(|w| {
            let state = WavHandover {
                channels: w.channels(),
                rate: w.rate(),
                frames: w.frames(),
            };
            self.meta.wav.frames = state.frames;
            if let Err(e) = w.finish() {
                warn!(recording = %self.meta.id, error = %e, "cannot finish wav for the handover");
            }
            state
        });
        let pcap_len = self.pcap.take().map(|p| {
            let len = p.len();
            if let Err(e) = p.finish() {
                warn!(recording = %self.meta.id, error = %e, "cannot finish pcap for the handover");
            }
            len
        });
        self.write_metadata(now);
        RecordingHandover {
            dir: self.dir,
            started: self.started,
            meta: self.meta,
            streams: self.streams,
            pcap_len,
            wav,
        }
    }

    /// Reopens the files of a handed-over recording and goes on after their last byte. Fails
    /// (leaving the files as they are) when a file is missing or not as the handover left it.
    pub(crate) fn resume(h: RecordingHandover, floor: u64) -> io::Result<Self> {
        let pcap = match h.pcap_len {
            Some(len) => Some(PcapWriter::open(&h.dir.join(PCAP_FILE), len, floor)?),
            None => None,
        };
        let wav = match &h.wav {
            Some(w) => Some(WavWriter::open(
                &h.dir.join(WAV_FILE),
                w.channels,
                w.rate,
                w.frames,
                floor,
            )?),
            None => None,
        };
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
            files: None,
            warned: false,
        })
    }
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
