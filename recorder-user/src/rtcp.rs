//! RTCP receiver reports (RFC 3550 §6.4.2) for the streams we record.
//!
//! We never send RTP, but a client expects to hear from its receiver: for each live stream with
//! an RTCP port we send, from that port, a compound RR + SDES CNAME every 5 s (randomised
//! 0.5-1.5x, RFC 3550 §6.2) to the client's RTCP address, with one report block per SSRC the
//! writer heard. No socket is kept between reports (10 000 sessions would hold 20 000 of them):
//! each report binds the port, sends and closes. The client's sender reports (for LSR/DLSR) are
//! captured by XDP like its RTP, and the writer remembers the last one per SSRC.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use rand::Rng;
use thiserror::Error;
use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    events::{SessionEvent, StreamInfo},
    writer::{ReceptionReader, SsrcStats},
};

/// RFC 3550 §6.2 minimum report interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// An RR carries at most 31 report blocks (5-bit count).
const MAX_BLOCKS: usize = 31;
const PT_SR: u8 = 200;
const PT_RR: u8 = 201;
const PT_SDES: u8 = 202;
const SDES_CNAME: u8 = 1;

#[derive(Debug, Error)]
pub enum RtcpError {
    #[error("binding RTCP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// One report block (RFC 3550 §6.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportBlock {
    pub ssrc: u32,
    /// Fraction lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Cumulative packets lost (24-bit signed on the wire; clamped).
    pub cumulative_lost: u32,
    pub extended_highest_seq: u32,
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR from this source (0: none).
    pub lsr: u32,
    /// Delay since that SR, in 1/65536 s (0: none).
    pub dlsr: u32,
}

/// A compound RTCP packet: RR (sender `ssrc`, `blocks`) then SDES with one CNAME chunk.
pub fn receiver_report(ssrc: u32, blocks: &[ReportBlock], cname: &str) -> Vec<u8> {
    let blocks = &blocks[..blocks.len().min(MAX_BLOCKS)];
    let mut out = Vec::with_capacity(8 + 24 * blocks.len() + 12 + cname.len());
    let words = 1 + 6 * blocks.len();
    out.push(0x80 | blocks.len() as u8);
    out.push(PT_RR);
    out.extend_from_slice(&(words as u16).to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    for b in blocks {
        out.extend_from_slice(&b.ssrc.to_be_bytes());
        let lost = b.cumulative_lost.min(0x7f_ffff);
        out.push(b.fraction_lost);
        out.extend_from_slice(&lost.to_be_bytes()[1..]);
        out.extend_from_slice(&b.extended_highest_seq.to_be_bytes());
        out.extend_from_slice(&b.jitter.to_be_bytes());
        out.extend_from_slice(&b.lsr.to_be_bytes());
        out.extend_from_slice(&b.dlsr.to_be_bytes());
    }
    // SDES: one chunk = SSRC, CNAME item, then 1-4 null octets ending the item list on a
    // 32-bit boundary (RFC 3550 §6.5).
    let cname = &cname.as_bytes()[..cname.len().min(255)];
    let chunk_len = 4 + 2 + cname.len();
    let padded = (chunk_len + 1).div_ceil(4) * 4;
    out.push(0x81);
    out.push(PT_SDES);
    out.extend_from_slice(&((padded / 4) as u16).to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.push(SDES_CNAME);
    out.push(cname.len() as u8);
    out.extend_from_slice(cname);
    out.resize(out.len() + padded - chunk_len, 0);
    out
}

/// The sender SSRC and the middle 32 bits of the NTP timestamp of a sender report at the head of
/// a (compound) RTCP packet; `None` for anything else.
pub fn parse_sender_report(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() < 28 || b[0] >> 6 != 2 || b[1] != PT_SR {
        return None;
    }
    let ssrc = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let lsr = u32::from_be_bytes(b[10..14].try_into().ok()?);
    Some((ssrc, lsr))
}

/// What a stream's reporter remembers between reports.
#[derive(Default)]
struct ReporterState {
    /// Per SSRC: (packets, lost) at the previous report, for the fraction lost.
    prior: HashMap<u32, (u64, u64)>,
}

impl ReporterState {
    /// Report blocks for `stats`; `sender_reports` holds the last SR of each SSRC (SSRC, LSR,
    /// when it was captured).
    fn blocks(
        &mut self,
        stats: &[SsrcStats],
        sender_reports: &[(u32, u32, SystemTime)],
        now: SystemTime,
    ) -> Vec<ReportBlock> {
        stats
            .iter()
            .map(|s| {
                let (p0, l0) = self
                    .prior
                    .insert(s.ssrc, (s.packets, s.lost))
                    .unwrap_or((0, 0));
                let lost = s.lost.saturating_sub(l0);
                let expected = s.packets.saturating_sub(p0) + lost;
                let fraction_lost = (lost << 8)
                    .checked_div(expected)
                    .map_or(0, |f| f.min(255) as u8);
                let (lsr, dlsr) = match sender_reports.iter().find(|(ssrc, ..)| *ssrc == s.ssrc) {
                    Some((_, lsr, at)) => {
                        let d = now.duration_since(*at).unwrap_or_default();
                        (*lsr, (d.as_micros() * 65536 / 1_000_000) as u32)
                    }
                    None => (0, 0),
                };
                ReportBlock {
                    ssrc: s.ssrc,
                    fraction_lost,
                    cumulative_lost: s.lost.min(u64::from(u32::MAX)) as u32,
                    extended_highest_seq: s.extended_highest_seq(),
                    jitter: s.jitter(),
                    lsr,
                    dlsr,
                }
            })
            .collect()
    }
}

/// A randomised report interval (RFC 3550 §6.2: 0.5-1.5 times the deterministic one).
fn next_interval() -> Duration {
    REPORT_INTERVAL.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// Sends the reports of one stream, from `local`, until aborted.
async fn report(
    local: SocketAddr,
    to: SocketAddr,
    flow_id: u64,
    rtcp_flow_id: Option<u64>,
    reader: ReceptionReader,
    cname: String,
) {
    let ssrc: u32 = rand::random();
    let mut state = ReporterState::default();
    let mut warned = false;
    loop {
        tokio::time::sleep(next_interval()).await;
        let sender_reports = rtcp_flow_id
            .map(|f| reader.sender_reports(f))
            .unwrap_or_default();
        let blocks = state.blocks(
            &reader.reception(flow_id),
            &sender_reports,
            SystemTime::now(),
        );
        let packet = receiver_report(ssrc, &blocks, &cname);
        let sent = match bind(local) {
            Ok(socket) => socket
                .send_to(&packet, to)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = sent {
            // Once per stream at warning level: the cause (descriptors, address) persists.
            if warned {
                debug!(%error, %local, %to, "RTCP receiver report not sent");
            } else {
                warn!(%error, %local, %to, "RTCP receiver report not sent");
                warned = true;
            }
        }
    }
}

fn bind(addr: SocketAddr) -> Result<UdpSocket, RtcpError> {
    let err = |source| RtcpError::Bind { addr, source };
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// A running reporter: what it was started for, to notice changes.
struct Running {
    key: (u16, SocketAddr),
    task: JoinHandle<()>,
}

/// Runs the receiver reports of every live stream, following the session events, until
/// `stop` is cancelled or the event channel closes.
pub async fn run(
    media_address: IpAddr,
    reader: ReceptionReader,
    mut events: mpsc::UnboundedReceiver<SessionEvent>,
    stop: CancellationToken,
) {
    let cname = format!("recorder@{media_address}");
    // By recording id, then RTP flow id.
    let mut running: HashMap<String, HashMap<u64, Running>> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = events.recv() => match e { Some(e) => e, None => break },
        };
        let (id, streams) = match event {
            SessionEvent::Started { id, streams, .. }
            | SessionEvent::MediaChanged { id, streams, .. } => (id, streams),
            SessionEvent::Ended { id, .. } => (id, Vec::new()),
            _ => continue,
        };
        let mine = running.entry(id.clone()).or_default();
        let wanted: HashMap<u64, &StreamInfo> = streams.iter().map(|s| (s.flow_id, s)).collect();
        mine.retain(|flow, r| {
            let keep = wanted
                .get(flow)
                .and_then(|s| target(s))
                .is_some_and(|k| k == r.key);
            if !keep {
                r.task.abort();
            }
            keep
        });
        for (flow, info) in wanted {
            let Some(key) = target(info) else { continue };
            if mine.contains_key(&flow) {
                continue;
            }
            let local = SocketAddr::new(media_address, key.0);
            let task = tokio::spawn(report(
                local,
                key.1,
                flow,
                info.rtcp_flow_id,
                reader.clone(),
                cname.clone(),
            ));
            mine.insert(flow, Running { key, task });
        }
        if mine.is_empty() {
            running.remove(&id);
        }
    }
    for r in running.values().flat_map(|m| m.values()) {
        r.task.abort();
    }
}

/// Our RTCP port and the client's RTCP address, if the stream has both. None for SRTP
/// streams: the client authenticates RTCP there (SRTCP), and a plain report would only count
/// as a failure on its side.
fn target(info: &StreamInfo) -> Option<(u16, SocketAddr)> {
    if info.srtp {
        return None;
    }
    Some((info.rtcp_port?, info.rtcp_remote?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses an RR + SDES compound back, independently of the encoder: (sender, blocks, cname).
    fn parse_back(b: &[u8]) -> (u32, Vec<ReportBlock>, String) {
        assert_eq!(b[0] >> 6, 2, "version");
        assert_eq!(b[1], PT_RR);
        let count = (b[0] & 0x1f) as usize;
        let rr_len = (u16::from_be_bytes([b[2], b[3]]) as usize + 1) * 4;
        assert_eq!(rr_len, 8 + 24 * count);
        let word = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        let blocks = (0..count)
            .map(|k| {
                let o = 8 + 24 * k;
                ReportBlock {
                    ssrc: word(o),
                    fraction_lost: b[o + 4],
                    cumulative_lost: word(o + 4) & 0xff_ffff,
                    extended_highest_seq: word(o + 8),
                    jitter: word(o + 12),
                    lsr: word(o + 16),
                    dlsr: word(o + 20),
                }
            })
            .collect();
        let s = &b[rr_len..];
        assert_eq!((s[0], s[1]), (0x81, PT_SDES));
        let sdes_len = (u16::from_be_bytes([s[2], s[3]]) as usize + 1) * 4;
        assert_eq!(sdes_len, s.len(), "the SDES ends the compound");
        assert_eq!(word(rr_len + 4), word(4), "same SSRC in SDES and RR");
        assert_eq!(s[8], SDES_CNAME);
        let n = s[9] as usize;
        assert!(s[10 + n..].iter().all(|&z| z == 0) && s.len() > 10 + n);
        (
            word(4),
            blocks,
            String::from_utf8(s[10..10 + n].to_vec()).unwrap(),
        )
    }

    #[test]
    fn srtp_streams_get_no_plain_receiver_reports() {
        let mut info = StreamInfo {
            index: 0,
            label: "1".into(),
            media: "audio".into(),
            flow_id: 1,
            rtcp_flow_id: Some(2),
            local_port: 30000,
            rtcp_port: Some(30001),
            remote: None,
            rtcp_remote: Some("192.0.2.1:31001".parse().unwrap()),
            codec: crate::events::Codec {
                payload_type: 0,
                name: "PCMU".into(),
                clock_rate: 8000,
                channels: 1,
                fmtp: None,
            },
            telephone_event_pt: None,
            paused: false,
            srtp: false,
            sdes: None,
        };
        assert_eq!(
            target(&info),
            Some((30001, "192.0.2.1:31001".parse().unwrap()))
        );
        info.srtp = true;
        assert_eq!(target(&info), None);
    }

    #[test]
    fn receiver_report_round_trips() {
        let blocks = [
            ReportBlock {
                ssrc: 0xdead_beef,
                fraction_lost: 25,
                cumulative_lost: 12,
                extended_highest_seq: 65536 + 9,
                jitter: 31,
                lsr: 0x1234_5678,
                dlsr: 65536,
            },
            ReportBlock {
                ssrc: 7,
                cumulative_lost: 0x0100_0000, // beyond 24 bits: clamped
                ..Default::default()
            },
        ];
        for cname in ["recorder@10.0.0.1", "abc", "abcd", ""] {
            let packet = receiver_report(42, &blocks, cname);
            assert_eq!(packet.len() % 4, 0);
            let (sender, got, name) = parse_back(&packet);
            assert_eq!((sender, name.as_str()), (42, cname));
            assert_eq!(got[0], blocks[0]);
            assert_eq!(got[1].cumulative_lost, 0x7f_ffff);
        }
        assert_eq!(parse_back(&receiver_report(1, &[], "x")).1, vec![]);
    }

    #[test]
    fn tshark_reads_the_report() {
        if std::process::Command::new("tshark")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("tshark not installed; skipped");
            return;
        }
        let block = ReportBlock {
            ssrc: 0x0102_0304,
            fraction_lost: 64,
            cumulative_lost: 5,
            extended_highest_seq: 1000,
            jitter: 3,
            ..Default::default()
        };
        let rtcp = receiver_report(99, &[block], "rec@x");
        let path = std::env::temp_dir().join(format!("rtcp-rr-{}.pcap", std::process::id()));
        std::fs::write(&path, udp_pcap(&rtcp, 5005)).unwrap();
        let out = std::process::Command::new("tshark")
            .args([
                "-r",
                path.to_str().unwrap(),
                "-d",
                "udp.port==5005,rtcp",
                "-T",
                "fields",
            ])
            .args(["-e", "rtcp.ssrc.identifier", "-e", "rtcp.ssrc.cum_nr"])
            .args(["-e", "rtcp.ssrc.high_seq", "-e", "rtcp.sdes.text"])
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0x01020304"), "{text}");
        assert!(text.contains("\t5\t"), "{text}");
        assert!(text.contains("1000"), "{text}");
        assert!(text.contains("rec@x"), "{text}");
        assert!(!text.contains("malformed"), "{text}");
    }

    /// A one-packet pcap of `payload` in UDP/IPv4 to `port` (checksums zero: not verified).
    fn udp_pcap(payload: &[u8], port: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&4u16.to_le_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_le_bytes());
        f.extend_from_slice(&101u32.to_le_bytes()); // LINKTYPE_RAW: IPv4 directly
        let total = 20 + 8 + payload.len();
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&(total as u32).to_le_bytes());
        f.extend_from_slice(&(total as u32).to_le_bytes());
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&5004u16.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn fraction_lost_is_per_interval_and_lsr_dlsr_follow_the_last_sr() {
        let mut stats = SsrcStats::new(5, 0);
        for seq in [0u16, 1, 2, 3, 5, 6, 7, 8, 9, 10] {
            stats.record(seq);
        }
        let mut state = ReporterState::default();
        let now = SystemTime::now();
        let b = state.blocks(std::slice::from_ref(&stats), &[], now);
        // 11 expected, 10 received: 1/11 of 256.
        assert_eq!(b[0].fraction_lost, (256 / 11) as u8);
        assert_eq!((b[0].cumulative_lost, b[0].extended_highest_seq), (1, 10));
        assert_eq!((b[0].lsr, b[0].dlsr), (0, 0));
        for seq in 11..=20u16 {
            stats.record(seq);
        }
        let sender_reports = [(9, 0x1234_0000, now), (5, 0xabcd_0000, now)];
        let b = state.blocks(&[stats], &sender_reports, now + Duration::from_millis(500));
        assert_eq!((b[0].fraction_lost, b[0].cumulative_lost), (0, 1));
        assert_eq!((b[0].lsr, b[0].dlsr), (0xabcd_0000, 32768));
    }

    #[test]
    fn sender_reports_are_recognised() {
        let mut sr = vec![0x80, PT_SR, 0, 6];
        sr.extend_from_slice(&77u32.to_be_bytes());
        sr.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        sr.extend_from_slice(&[0; 12]);
        assert_eq!(parse_sender_report(&sr), Some((77, 0x3344_5566)));
        assert_eq!(parse_sender_report(&receiver_report(1, &[], "x")), None);
        assert_eq!(parse_sender_report(&sr[..20]), None);
    }
}
