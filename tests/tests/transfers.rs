//! The transfer scenarios of `shared/seed/transfers.md`, end to end: the real `recorder` daemon in
//! a network namespace, the test harness playing the platform (SIP Server + Media Server as SIPREC
//! client) for D1 (customer), D2 and D3 (agents), each device sending its own tone, so that the
//! WAV shows who spoke when. Every scenario checks the files (pcap counts with tshark, WAV
//! contents by tone, metadata participants and times) and the index through the CLI binary.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use recorder::writer::metadata::{parse_rfc3339, rfc3339};
use serde_json::Value;
use tests::{
    client::{
        metadata_transfer_xml, metadata_xml, offer_sdp, siprec_body, MetaParticipant,
        OfferedStream, Reply, SipClient,
    },
    daemon::{recorder_bin, tshark_count, Daemon, DaemonOptions},
    net::{ip, VethPair},
    postgres::Postgres,
    rtp::RtpStream,
};

/// Tones per device (Hz): far apart, none a harmonic of another.
const D1_TONE: f64 = 440.0;
const D2_TONE: f64 = 1000.0;
const D3_TONE: f64 = 1700.0;
/// One packet time at 8 kHz (20 ms).
const PACKET_FRAMES: usize = 160;

fn customer() -> MetaParticipant {
    MetaParticipant {
        id: "p-d1".into(),
        aor: "sip:+493012345678@carrier.example".into(),
        name: "Customer D1".into(),
        sends: vec!["1".into()],
    }
}

fn agent(n: u32) -> MetaParticipant {
    MetaParticipant {
        id: format!("p-d{n}"),
        aor: format!("sip:700{n}@cc.example"),
        name: format!("Agent D{n}"),
        sends: vec!["2".into()],
    }
}

fn stream(label: &str, port: u16, connection: Option<Ipv4Addr>) -> OfferedStream {
    OfferedStream {
        label: label.into(),
        port,
        pt: 0,
        direction: "sendonly",
        connection: connection.map(IpAddr::V4),
    }
}

fn uuid(tag: &str) -> String {
    format!("{tag}{:016X}", rand::random::<u64>())
}

/// Now, as RFC 3339 with whole seconds (what a SIPREC client writes in metadata).
fn now_text() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// One recorder site: a namespace pair and its daemon.
struct Site {
    pair: VethPair,
    daemon: Daemon,
}

impl Site {
    fn start(tag: &str, extra: Vec<String>) -> Self {
        let pair = VethPair::new(tag);
        let daemon = Daemon::start(
            &pair,
            DaemonOptions {
                extra,
                ..Default::default()
            },
        );
        Self { pair, daemon }
    }

    /// Adds an address on the platform side (another device's media anchor).
    fn add_source(&self, last: u8) -> Ipv4Addr {
        let addr = Ipv4Addr::new(10, 231, 0, last);
        ip(&[
            "-n",
            &self.pair.sender_ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &self.pair.sender_if,
        ]);
        addr
    }

    fn client(&self) -> SipClient {
        self.pair
            .in_sender(|| SipClient::udp(IpAddr::V4(self.pair.sender_v4), self.daemon.sip))
    }

    /// An RTP stream from `from` (port 0: any) to our port `dest_port`.
    fn rtp(&self, from: Ipv4Addr, from_port: u16, ssrc: u32, dest_port: u16) -> RtpStream {
        let socket = self
            .pair
            .in_sender(|| UdpSocket::bind((from, from_port)).unwrap());
        RtpStream::new(
            socket,
            SocketAddr::new(IpAddr::V4(self.pair.recorder_v4), dest_port),
            ssrc,
            0,
        )
    }

    /// Runs the CLI binary against this daemon's control socket; returns stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(recorder_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.daemon.control)
            .output()
            .expect("run recorder CLI");
        assert!(
            out.status.success(),
            "recorder {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `recorder recordings --call-uuid X --json` through the CLI binary and the control socket.
    fn index_rows(&self, call_uuid: &str) -> Vec<Value> {
        let out = self.cli(&["recordings", "--call-uuid", call_uuid, "--json"]);
        match serde_json::from_str(&out).expect("JSON from --json") {
            Value::Array(rows) => rows,
            other => panic!("recordings: not a list: {other}"),
        }
    }
}

/// A first INVITE: customer stream `1` and agent stream `2`, with complete metadata.
fn invite(
    site: &Site,
    client: &mut SipClient,
    call_uuid: &str,
    agent: &MetaParticipant,
    time: &str,
    extra: &[String],
) -> Vec<u16> {
    let sdp = offer_sdp(
        IpAddr::V4(site.pair.sender_v4),
        1,
        &[stream("1", 31000, None), stream("2", 31002, None)],
    );
    let xml = metadata_xml(
        Some(call_uuid),
        &["1", "2"],
        &[customer(), agent.clone()],
        time,
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), extra);
    assert_answered(&reply)
}

fn assert_answered(reply: &Reply) -> Vec<u16> {
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let ports = reply.answer_ports();
    assert_eq!(ports.len(), 2, "{}", reply.body());
    ports
}

/// Sends one packet per stream every 20 ms (real-time pacing of media, not synchronisation),
/// for `packets` packet times starting at slot `first` of the clock that started at `start`.
fn paced(start: Instant, first: u32, packets: u32, streams: &mut [(&mut RtpStream, f64)]) {
    for n in first..first + packets {
        let due = start + Duration::from_millis(20 * n as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for (s, freq) in streams.iter_mut() {
            s.send_tone_packet(*freq);
        }
    }
}

/// A decoded WAV: 16-bit PCM frames, one Vec per channel.
struct Wav {
    rate: u32,
    channels: Vec<Vec<i16>>,
}

fn read_wav(path: &Path) -> Wav {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[0..4], b"RIFF");
    assert_eq!(&bytes[8..12], b"WAVE");
    let (mut pos, mut channels, mut rate, mut data) = (12, 0u16, 0u32, None);
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            assert_eq!(u16::from_le_bytes([bytes[body], bytes[body + 1]]), 1, "PCM");
            channels = u16::from_le_bytes([bytes[body + 2], bytes[body + 3]]);
            rate = u32::from_le_bytes(bytes[body + 4..body + 8].try_into().unwrap());
            assert_eq!(
                u16::from_le_bytes([bytes[body + 14], bytes[body + 15]]),
                16,
                "16-bit"
            );
        } else if id == b"data" {
            data = Some(&bytes[body..(body + len).min(bytes.len())]);
            break;
        }
        pos = body + len + (len & 1);
    }
    let data = data.expect("data chunk");
    assert!(channels > 0);
    let mut out = vec![Vec::new(); channels as usize];
    for (i, s) in data.chunks_exact(2).enumerate() {
        out[i % channels as usize].push(i16::from_le_bytes([s[0], s[1]]));
    }
    Wav {
        rate,
        channels: out,
    }
}

/// Goertzel power of `freq` in `window`, normalised by the window length.
fn goertzel(window: &[i16], freq: f64, rate: u32) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / rate as f64;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in window {
        let s = x as f64 + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (window.len() as f64).powi(2)
}

/// Which of `tones` each 20 ms window of `samples` carries: `Some(index)` when that tone holds
/// most of the window's energy, `None` for silence.
fn classify(samples: &[i16], rate: u32, tones: &[f64]) -> Vec<Option<usize>> {
    samples
        .chunks(PACKET_FRAMES)
        .map(|w| {
            let energy: f64 = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
            // A full window of tone (amplitude 8000) has energy 3.2e7; less than 1/32 of that
            // is silence or a sliver of audio at a window edge, too short to tell tones apart.
            if energy < 1.0e6 {
                return None;
            }
            let powers: Vec<f64> = tones.iter().map(|&f| goertzel(w, f, rate)).collect();
            let (best, p) = powers
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap();
            // A pure tone of amplitude A has Goertzel power A²/4 and energy A²/2.
            (*p > energy / 4.0).then_some(best)
        })
        .collect()
}

/// Windows of `labels` (in order), ignoring leading and trailing silence: runs as
/// `(tone index or None, windows)`.
fn runs(windows: &[Option<usize>]) -> Vec<(Option<usize>, usize)> {
    let first = windows.iter().position(Option::is_some).unwrap_or(0);
    let last = windows
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    let mut out: Vec<(Option<usize>, usize)> = Vec::new();
    for w in &windows[first..last] {
        match out.last_mut() {
            Some((t, n)) if t == w => *n += 1,
            _ => out.push((*w, 1)),
        }
    }
    out
}

/// Longest run of exactly-zero samples (frames nobody wrote; decoded G.711 tones only touch
/// zero for a sample or two at a zero crossing).
fn longest_zero_run(samples: &[i16]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &x in samples {
        run = if x == 0 { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

fn wav_channel<'a>(wav: &'a Wav, meta: &Value, label: &str) -> &'a [i16] {
    let channel = meta["wav"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c == label)
        .unwrap_or_else(|| panic!("label {label} in wav channels {}", meta["wav"]));
    &wav.channels[channel]
}

fn stream_meta<'a>(meta: &'a Value, label: &str) -> &'a Value {
    meta["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == label)
        .unwrap_or_else(|| panic!("stream {label} in {}", meta["streams"]))
}

fn participant<'a>(meta: &'a Value, aor: &str) -> &'a Value {
    meta["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["aor"] == aor)
        .unwrap_or_else(|| panic!("participant {aor} in {}", meta["participants"]))
}

fn time_of(v: &Value) -> SystemTime {
    parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("a time, got {v}")))
        .unwrap_or_else(|| panic!("RFC 3339 time, got {v}"))
}

fn pcap_from(dir: &Path, src: SocketAddr) -> usize {
    tshark_count(
        &dir.join("recording.pcap"),
        Some(&format!(
            "ip.src == {} && udp.srcport == {}",
            src.ip(),
            src.port()
        )),
    )
}

/// Row 1 of the table, origination side: D2 transfers to D3 on the same site. One recording; the
/// re-INVITE moves the agent stream to D3's address, port and SSRC; no audio is lost around it.
#[test]
fn customer_side_recording_continues_across_a_transfer() {
    let site = Site::start("cust", Vec::new());
    let d3_anchor = site.add_source(3);
    let call_uuid = uuid("CUST");
    let mut client = site.client();
    let t0 = now_text();
    let ports = invite(&site, &mut client, &call_uuid, &agent(2), &t0, &[]);
    let (_, first) = site.daemon.metadata_for(&client.call_id, false);

    let mut d1 = site.rtp(site.pair.sender_v4, 0, 0xD1D1_0001, ports[0]);
    let mut d2 = site.rtp(site.pair.sender_v4, 0, 0xD2D2_0002, ports[1]);
    let mut d3 = site.rtp(d3_anchor, 31010, 0xD3D3_0003, ports[1]);
    let d2_from = d2.socket.local_addr().unwrap();
    let d3_from = d3.socket.local_addr().unwrap();

    let start = Instant::now();
    paced(start, 0, 50, &mut [(&mut d1, D1_TONE), (&mut d2, D2_TONE)]);

    // The transfer: the agent stream now comes from D3's anchor, D2 leaves, D3 joins.
    let t_transfer = now_text();
    let sdp = offer_sdp(
        IpAddr::V4(site.pair.sender_v4),
        2,
        &[
            stream("1", 31000, None),
            stream("2", 31010, Some(d3_anchor)),
        ],
    );
    let xml = metadata_transfer_xml("p-d2", &agent(3), &t_transfer);
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reinvite = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reinvite.status, 200, "{}", reinvite.raw);
    assert_eq!(reinvite.answer_ports(), ports, "our ports stay the same");
    // D3's first packet is due at slot 50; when the re-INVITE ends later than that (a loaded
    // machine), the sender itself is silent that long, and the WAV must show no more than that.
    let sender_late = start
        .elapsed()
        .saturating_sub(Duration::from_millis(50 * 20));
    paced(start, 50, 50, &mut [(&mut d1, D1_TONE), (&mut d3, D3_TONE)]);
    assert_eq!(
        client
            .bye(&["Reason: SIP;cause=200;text=\"call completed\"".into()])
            .status,
        200
    );

    let (dir, meta) = site.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["id"], first["id"], "one recording across the transfer");
    assert_eq!(site.daemon.recordings().len(), 1);
    assert_eq!(meta["call_uuid"], call_uuid.as_str());
    assert_eq!(meta["end_reason"], "bye");

    // Zero loss: every packet sent is in the pcap, per device.
    let sent = d1.sent + d2.sent + d3.sent;
    assert_eq!(sent, 200);
    assert_eq!(
        tshark_count(&dir.join("recording.pcap"), None),
        sent as usize
    );
    assert_eq!(pcap_from(&dir, d2_from), d2.sent as usize);
    assert_eq!(pcap_from(&dir, d3_from), d3.sent as usize);
    let agent_stream = stream_meta(&meta, "2");
    assert_eq!(agent_stream["packets"], 100);
    assert_eq!(agent_stream["lost"], 0);
    let ssrcs: Vec<(u64, u64)> = agent_stream["ssrcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["ssrc"].as_u64().unwrap(), s["packets"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ssrcs,
        vec![(0xD2D2_0002, 50), (0xD3D3_0003, 50)],
        "the agent stream switched SSRC"
    );

    // Metadata: D2 left and D3 joined at the transfer; D1 stayed.
    let d2_meta = participant(&meta, "sip:7002@cc.example");
    let d3_meta = participant(&meta, "sip:7003@cc.example");
    assert_eq!(
        time_of(&d2_meta["joined_at"]),
        time_of(&Value::from(t0.clone()))
    );
    assert_eq!(
        time_of(&d2_meta["left_at"]),
        time_of(&Value::from(t_transfer.clone()))
    );
    assert_eq!(
        time_of(&d3_meta["joined_at"]),
        time_of(&Value::from(t_transfer.clone()))
    );
    assert!(d3_meta["left_at"].is_null(), "{d3_meta}");
    assert!(participant(&meta, "sip:+493012345678@carrier.example")["left_at"].is_null());

    // WAV: the customer channel carries D1 throughout; the agent channel D2 then D3, with no
    // silence longer than one packet time in between.
    let wav = read_wav(&dir.join("recording.wav"));
    assert_eq!(wav.rate, 8000);
    let tones = [D1_TONE, D2_TONE, D3_TONE];
    let cust = runs(&classify(wav_channel(&wav, &meta, "1"), wav.rate, &tones));
    assert_eq!(cust.len(), 1, "customer channel: {cust:?}");
    assert_eq!(cust[0].0, Some(0));
    assert!((99..=101).contains(&cust[0].1), "{cust:?}");
    let agent_runs = runs(&classify(wav_channel(&wav, &meta, "2"), wav.rate, &tones));
    let tones_only: Vec<usize> = agent_runs.iter().filter_map(|r| r.0).collect();
    assert_eq!(
        tones_only,
        vec![1, 2],
        "D2 then D3 on the agent channel: {agent_runs:?}"
    );
    // The gap itself, to the sample: the longest run of unwritten (zero) frames between D2's
    // first window and D3's last one must not exceed one packet time.
    let agent = wav_channel(&wav, &meta, "2");
    let windows = classify(agent, wav.rate, &tones);
    let from = windows.iter().position(|w| *w == Some(1)).unwrap() * PACKET_FRAMES;
    let to = (windows.iter().rposition(|w| *w == Some(2)).unwrap() + 1) * PACKET_FRAMES;
    let gap = longest_zero_run(&agent[from..to.min(agent.len())]);
    let allowed = PACKET_FRAMES + (sender_late.as_micros() as usize * 8 / 1000);
    assert!(
        gap <= allowed,
        "{gap} silent frames at the switch (one packet is {PACKET_FRAMES}, the sender was \
         {sender_late:?} late): {agent_runs:?}"
    );
    let d2_windows = agent_runs.iter().find(|r| r.0 == Some(1)).unwrap().1;
    let d3_windows = agent_runs.iter().find(|r| r.0 == Some(2)).unwrap().1;
    assert!((49..=51).contains(&d2_windows), "{agent_runs:?}");
    assert!((49..=51).contains(&d3_windows), "{agent_runs:?}");

    // The index knows it, with both agents and why it ended.
    let rows = site.index_rows(&call_uuid);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], meta["id"]);
    assert_eq!(rows[0]["end_reason"], "bye");
    let names: Vec<&str> = rows[0]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["aor"].as_str())
        .collect();
    for aor in ["sip:7002@cc.example", "sip:7003@cc.example"] {
        assert!(names.contains(&aor), "{names:?}");
    }
}

/// A re-INVITE may change only the metadata (the agent changes, the Media Server keeps the
/// stream: same port and SSRC) or only the media (new source port and SSRC, no metadata body).
/// Each keeps the one recording and changes only what it carries.
#[test]
fn reinvite_with_only_metadata_then_only_media() {
    let site = Site::start("mdmd", Vec::new());
    let call_uuid = uuid("MDMD");
    let mut client = site.client();
    let ports = invite(&site, &mut client, &call_uuid, &agent(2), &now_text(), &[]);
    let (_, first) = site.daemon.metadata_for(&client.call_id, false);
    let mut d1 = site.rtp(site.pair.sender_v4, 0, 0x5101, ports[0]);
    let mut agent_leg = site.rtp(site.pair.sender_v4, 0, 0x5102, ports[1]);
    let start = Instant::now();
    paced(
        start,
        0,
        15,
        &mut [(&mut d1, D1_TONE), (&mut agent_leg, D2_TONE)],
    );

    // Metadata only: the same SDP (new version), D2 leaves and D3 joins on the same stream.
    let t1 = now_text();
    let same = [stream("1", 31000, None), stream("2", 31002, None)];
    let sdp = offer_sdp(IpAddr::V4(site.pair.sender_v4), 2, &same);
    let xml = metadata_transfer_xml("p-d2", &agent(3), &t1);
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let r = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.answer_ports(), ports);
    paced(
        start,
        15,
        15,
        &mut [(&mut d1, D1_TONE), (&mut agent_leg, D3_TONE)],
    );

    // Media only: the agent stream moves to a new port and SSRC; no metadata body.
    let sdp = offer_sdp(
        IpAddr::V4(site.pair.sender_v4),
        3,
        &[stream("1", 31000, None), stream("2", 31030, None)],
    );
    let r = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.answer_ports(), ports);
    let mut moved = site.rtp(site.pair.sender_v4, 31030, 0x5103, ports[1]);
    paced(
        start,
        30,
        15,
        &mut [(&mut d1, D1_TONE), (&mut moved, D3_TONE)],
    );
    assert_eq!(client.bye(&[]).status, 200);

    let (dir, meta) = site.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["id"], first["id"]);
    assert_eq!(site.daemon.recordings().len(), 1);
    // Media: nothing lost, the SSRC changed once (at the media-only re-INVITE).
    let agent_stream = stream_meta(&meta, "2");
    assert_eq!(agent_stream["packets"], 45);
    assert_eq!(agent_stream["lost"], 0);
    let ssrcs: Vec<(u64, u64)> = agent_stream["ssrcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["ssrc"].as_u64().unwrap(), s["packets"].as_u64().unwrap()))
        .collect();
    assert_eq!(ssrcs, vec![(0x5102, 30), (0x5103, 15)]);
    assert_eq!(
        tshark_count(&dir.join("recording.pcap"), None),
        (d1.sent + agent_leg.sent + moved.sent) as usize
    );
    // Metadata: one change (D2 -> D3 at t1), untouched by the media-only re-INVITE.
    assert_eq!(
        meta["metadata_versions"].as_array().unwrap().len(),
        2,
        "initial + the metadata re-INVITE: {}",
        meta["metadata_versions"]
    );
    let d2_meta = participant(&meta, "sip:7002@cc.example");
    let d3_meta = participant(&meta, "sip:7003@cc.example");
    assert_eq!(
        time_of(&d2_meta["left_at"]),
        time_of(&Value::from(t1.clone()))
    );
    assert_eq!(time_of(&d3_meta["joined_at"]), time_of(&Value::from(t1)));
    assert!(d3_meta["left_at"].is_null());
    // WAV: D2's voice then D3's on the agent channel, through both re-INVITEs.
    let wav = read_wav(&dir.join("recording.wav"));
    let tones = [D1_TONE, D2_TONE, D3_TONE];
    let agent_runs = runs(&classify(wav_channel(&wav, &meta, "2"), wav.rate, &tones));
    // The test pauses its own sending during each re-INVITE (signaling before media), so a
    // silent window may split D3's run under load; the voices' order is what counts here.
    let mut order: Vec<usize> = agent_runs.iter().filter_map(|r| r.0).collect();
    order.dedup();
    assert_eq!(order, vec![1, 2], "{agent_runs:?}");
    let d3_windows: usize = agent_runs
        .iter()
        .filter(|r| r.0 == Some(2))
        .map(|r| r.1)
        .sum();
    assert!((29..=31).contains(&d3_windows), "{agent_runs:?}");
}

/// Row 2 of the table, termination side: the recording of agent D2 ends with BYE at the transfer
/// (its `Reason` kept); the recording of D3 is a separate one with the same CallUUID.
#[test]
fn agent_side_recording_ends_at_the_transfer_and_the_next_is_separate() {
    let site = Site::start("agnt", Vec::new());
    let call_uuid = uuid("AGNT");

    // Recording of D2's leg (D1 <-> D2).
    let mut leg2 = site.client();
    let t0 = now_text();
    let ports = invite(&site, &mut leg2, &call_uuid, &agent(2), &t0, &[]);
    let mut d1 = site.rtp(site.pair.sender_v4, 0, 0xA1, ports[0]);
    let mut d2 = site.rtp(site.pair.sender_v4, 0, 0xA2, ports[1]);
    paced(
        Instant::now(),
        0,
        40,
        &mut [(&mut d1, D1_TONE), (&mut d2, D2_TONE)],
    );
    let reason = "SIP;cause=480;text=\"Call transferred\"";
    let bye = leg2.bye(&[format!("Reason: {reason}")]);
    assert_eq!(bye.status, 200);
    let (dir2, meta2) = site.daemon.metadata_for(&leg2.call_id, true);
    let d1_sent_first = d1.sent;

    // D3 answers; the platform starts a new recording of D3's leg (D1 <-> D3).
    let mut leg3 = site.client();
    let t1 = now_text();
    let ports3 = invite(&site, &mut leg3, &call_uuid, &agent(3), &t1, &[]);
    let mut d1b = site.rtp(site.pair.sender_v4, 0, 0xB1, ports3[0]);
    let mut d3 = site.rtp(site.pair.sender_v4, 0, 0xB3, ports3[1]);
    paced(
        Instant::now(),
        0,
        30,
        &mut [(&mut d1b, D1_TONE), (&mut d3, D3_TONE)],
    );
    assert_eq!(leg3.bye(&[]).status, 200);
    let (dir3, meta3) = site.daemon.metadata_for(&leg3.call_id, true);

    // Two recordings, the first ended by the transfer's BYE with its Reason.
    assert_ne!(meta2["id"], meta3["id"]);
    assert_eq!(site.daemon.recordings().len(), 2);
    assert_eq!(meta2["end_reason"], "bye");
    assert!(
        meta2["end_detail"]
            .as_str()
            .is_some_and(|d| d.contains("cause=480") && d.contains("Call transferred")),
        "Reason header kept: {}",
        meta2["end_detail"]
    );
    for m in [&meta2, &meta3] {
        assert_eq!(m["call_uuid"], call_uuid.as_str());
        assert_eq!(m["state"], "complete");
    }
    assert!(time_of(&meta3["started_at"]) >= time_of(&meta2["ended_at"]));

    // Files: each recording has its own packets and its own agent's voice only.
    assert_eq!(
        tshark_count(&dir2.join("recording.pcap"), None),
        (d1_sent_first + d2.sent) as usize
    );
    assert_eq!(
        tshark_count(&dir3.join("recording.pcap"), None),
        (d1b.sent + d3.sent) as usize
    );
    let tones = [D1_TONE, D2_TONE, D3_TONE];
    for (dir, meta, agent_tone, windows) in [(&dir2, &meta2, 1, 40), (&dir3, &meta3, 2, 30)] {
        let wav = read_wav(&dir.join("recording.wav"));
        let agent_runs = runs(&classify(wav_channel(&wav, meta, "2"), wav.rate, &tones));
        assert_eq!(agent_runs.len(), 1, "{agent_runs:?}");
        assert_eq!(agent_runs[0].0, Some(agent_tone), "{agent_runs:?}");
        assert!(
            (windows - 1..=windows + 1).contains(&agent_runs[0].1),
            "{agent_runs:?}"
        );
        let cust = runs(&classify(wav_channel(&wav, meta, "1"), wav.rate, &tones));
        assert_eq!(cust.len(), 1, "{cust:?}");
        assert_eq!(cust[0].0, Some(0));
    }
    // Participants: D2 only in the first, D3 only in the second.
    participant(&meta2, "sip:7002@cc.example");
    participant(&meta3, "sip:7003@cc.example");
    assert!(!meta2["participants"].to_string().contains("7003"));
    assert!(!meta3["participants"].to_string().contains("7002"));

    // The index lists both, in time order, with why each ended.
    let rows = site.index_rows(&call_uuid);
    let ids: Vec<&Value> = rows.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, vec![&meta2["id"], &meta3["id"]]);
    assert_eq!(rows[0]["end_reason"], "bye");
    assert!(rows[0]["end_detail"]
        .as_str()
        .is_some_and(|d| d.contains("Call transferred")));
    assert_eq!(rows[1]["end_reason"], "bye");

    // The second recording continues the interaction: linked to the first, in its metadata
    // and in the index.
    assert!(
        meta2.get("interaction").is_none_or(Value::is_null),
        "{meta2}"
    );
    assert_eq!(meta3["interaction"], meta2["id"]);
    assert_eq!(meta3["previous"], meta2["id"]);
    assert_eq!(rows[1]["interaction"], meta2["id"]);
    assert_eq!(rows[1]["previous"], meta2["id"]);

    // `recorder show` prints the interaction's timeline: both recordings in order, who was on
    // each, why the first ended, and the gap between them.
    let id3 = meta3["id"].as_str().unwrap();
    let text = site.cli(&["show", id3]);
    let id2 = meta2["id"].as_str().unwrap();
    let (p2, p3) = (
        text.find(&format!("1. {id2}"))
            .unwrap_or_else(|| panic!("{text}")),
        text.find(&format!("2. {id3} (this)"))
            .unwrap_or_else(|| panic!("{text}")),
    );
    assert!(p2 < p3, "{text}");
    assert!(text.contains("Call transferred"), "{text}");
    assert!(text.contains("gap "), "{text}");
    assert!(text.contains("Agent D2 <sip:7002@cc.example>"), "{text}");
    assert!(text.contains("Agent D3 <sip:7003@cc.example>"), "{text}");
}

/// A later, unrelated session that reuses a SIP Call-ID (same Call-ID, new dialog, another
/// CallUUID) is a recording of its own, linked to nothing.
#[test]
fn a_reused_call_id_does_not_merge_recordings() {
    let site = Site::start("reus", Vec::new());
    let (uuid_a, uuid_b) = (uuid("REUA"), uuid("REUB"));
    let mut first = site.client();
    let ports = invite(&site, &mut first, &uuid_a, &agent(2), &now_text(), &[]);
    let mut d2 = site.rtp(site.pair.sender_v4, 0, 0xC2, ports[1]);
    paced(Instant::now(), 0, 10, &mut [(&mut d2, D2_TONE)]);
    assert_eq!(first.bye(&[]).status, 200);
    let (_, meta_a) = site.daemon.metadata_for(&first.call_id, true);

    let mut second = site.client();
    second.call_id = first.call_id.clone();
    let ports = invite(&site, &mut second, &uuid_b, &agent(3), &now_text(), &[]);
    let mut d3 = site.rtp(site.pair.sender_v4, 0, 0xC3, ports[1]);
    paced(Instant::now(), 0, 15, &mut [(&mut d3, D3_TONE)]);
    assert_eq!(second.bye(&[]).status, 200);

    // Both share the Call-ID: wait until both are finished.
    let deadline = Instant::now() + Duration::from_secs(15);
    let metas: Vec<Value> = loop {
        let metas: Vec<Value> = site
            .daemon
            .recordings()
            .iter()
            .filter_map(|d| tests::daemon::read_json(&d.join("metadata.json")))
            .collect();
        if metas.len() == 2 && metas.iter().all(|m| m["state"] != "active") {
            break metas;
        }
        assert!(
            Instant::now() < deadline,
            "two finished recordings: {metas:?}"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling files another process writes
    };
    let meta_b = metas.iter().find(|m| m["id"] != meta_a["id"]).unwrap();
    assert_eq!(meta_b["sip_call_id"], meta_a["sip_call_id"]);
    assert_eq!(meta_b["call_uuid"], uuid_b.as_str());
    assert!(
        meta_b.get("interaction").is_none_or(Value::is_null),
        "{meta_b}"
    );
    assert!(
        meta_b.get("previous").is_none_or(Value::is_null),
        "{meta_b}"
    );
    assert_eq!(stream_meta(&meta_a, "2")["packets"], 10);
    assert_eq!(stream_meta(meta_b, "2")["packets"], 15);
    assert_eq!(site.index_rows(&uuid_a).len(), 1);
    assert_eq!(site.index_rows(&uuid_b).len(), 1);
}

/// Two sites, blue and purple, each with its own recorder in its own namespaces and address,
/// sharing one PostgreSQL index. Fields drop in order: the daemons stop before the database.
struct TwoSites {
    blue: Site,
    purple: Site,
    _pg: Postgres,
}

impl TwoSites {
    fn start(tag: &str) -> Self {
        let pg = Postgres::start();
        let flags = |site: &str| -> Vec<String> {
            [
                "--index-backend",
                "postgres",
                "--index-url",
                &pg.url(),
                "--site",
                site,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let blue = Site::start(&format!("b{tag}"), flags("blue"));
        let purple = Site::start(&format!("p{tag}"), flags("purple"));
        Self {
            blue,
            purple,
            _pg: pg,
        }
    }

    /// The interaction as each host lists it; both must agree. Returns blue's answer.
    fn rows(&self, call_uuid: &str) -> Vec<Value> {
        let blue = self.blue.index_rows(call_uuid);
        let purple = self.purple.index_rows(call_uuid);
        assert_eq!(blue, purple, "both hosts list the same interaction");
        blue
    }
}

/// A Genesys-style Request-URI: the site's local connection id and the CallUUID.
fn genesys_uri(client: &mut SipClient, conn_id: &str, call_uuid: &str) {
    client.request_uri = format!(
        "sip:record={conn_id}@{};calluuid={call_uuid};dn=7002",
        client.server
    );
}

fn row_summary(rows: &[Value]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("").to_string(),
                r["host"].as_str().unwrap_or("").to_string(),
                r["end_reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn aors(row: &Value) -> Vec<String> {
    row["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["aor"].as_str().map(str::to_string))
        .collect()
}

/// Row "re-INVITE" of the two-site table: blue's SIP Server stays in the path, media stays
/// anchored at blue; blue's recorder keeps its one recording, purple's records nothing.
#[test]
fn two_sites_transfer_by_reinvite_stays_one_recording_at_blue() {
    let sites = TwoSites::start("ri");
    let (blue, purple) = (&sites.blue, &sites.purple);
    let call_uuid = uuid("TSRI");
    let mut client = blue.client();
    genesys_uri(&mut client, "00BLUE01", &call_uuid);
    let ports = invite(blue, &mut client, &call_uuid, &agent(2), &now_text(), &[]);
    let mut d1 = blue.rtp(blue.pair.sender_v4, 0, 0xE1, ports[0]);
    let mut d2 = blue.rtp(blue.pair.sender_v4, 0, 0xE2, ports[1]);
    // D3 is at purple, but its audio reaches blue's Media Server: a new port and SSRC there.
    let mut d3 = blue.rtp(blue.pair.sender_v4, 31020, 0xE3, ports[1]);
    let start = Instant::now();
    paced(start, 0, 25, &mut [(&mut d1, D1_TONE), (&mut d2, D2_TONE)]);
    let t_transfer = now_text();
    let sdp = offer_sdp(
        IpAddr::V4(blue.pair.sender_v4),
        2,
        &[stream("1", 31000, None), stream("2", 31020, None)],
    );
    let xml = metadata_transfer_xml("p-d2", &agent(3), &t_transfer);
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    assert_eq!(client.invite(Some((&ctype, &body)), &[]).status, 200);
    paced(start, 25, 25, &mut [(&mut d1, D1_TONE), (&mut d3, D3_TONE)]);
    assert_eq!(client.bye(&[]).status, 200);

    let (dir, meta) = blue.daemon.metadata_for(&client.call_id, true);
    assert_eq!(blue.daemon.recordings().len(), 1);
    assert!(
        purple.daemon.recordings().is_empty(),
        "purple records nothing"
    );
    assert_eq!(meta["host"], "blue");
    assert_eq!(meta["connection_id"], "00BLUE01");
    assert_eq!(
        tshark_count(&dir.join("recording.pcap"), None),
        (d1.sent + d2.sent + d3.sent) as usize
    );
    assert_eq!(
        time_of(&participant(&meta, "sip:7002@cc.example")["left_at"]),
        time_of(&Value::from(t_transfer.clone()))
    );
    assert_eq!(
        time_of(&participant(&meta, "sip:7003@cc.example")["joined_at"]),
        time_of(&Value::from(t_transfer))
    );
    let wav = read_wav(&dir.join("recording.wav"));
    let tones = [D1_TONE, D2_TONE, D3_TONE];
    let agent_runs = runs(&classify(wav_channel(&wav, &meta, "2"), wav.rate, &tones));
    let mut order: Vec<usize> = agent_runs.iter().filter_map(|r| r.0).collect();
    order.dedup();
    assert_eq!(order, vec![1, 2], "{agent_runs:?}");

    let rows = sites.rows(&call_uuid);
    assert_eq!(
        row_summary(&rows),
        vec![(
            meta["id"].as_str().unwrap().to_string(),
            "blue".into(),
            "bye".into()
        )]
    );
    let listed = aors(&rows[0]);
    assert!(
        listed.contains(&"sip:7002@cc.example".to_string()),
        "{listed:?}"
    );
    assert!(
        listed.contains(&"sip:7003@cc.example".to_string()),
        "{listed:?}"
    );
}

/// One recording at a site: customer stream `1` from D1, agent stream `2` from `agent`, for
/// `packets` packet times; ended by BYE with `reason`. Returns (dir, finished metadata).
fn record_leg(
    site: &Site,
    call_uuid: &str,
    conn_id: &str,
    agent_n: u32,
    tone: f64,
    packets: u32,
    reason: Option<&str>,
) -> (std::path::PathBuf, Value, u64) {
    let mut client = site.client();
    genesys_uri(&mut client, conn_id, call_uuid);
    let ports = invite(
        site,
        &mut client,
        call_uuid,
        &agent(agent_n),
        &now_text(),
        &[],
    );
    let mut d1 = site.rtp(site.pair.sender_v4, 0, 0xF100 + agent_n, ports[0]);
    let mut da = site.rtp(site.pair.sender_v4, 0, 0xF200 + agent_n, ports[1]);
    paced(
        Instant::now(),
        0,
        packets,
        &mut [(&mut d1, D1_TONE), (&mut da, tone)],
    );
    let extra: Vec<String> = reason.map(|r| format!("Reason: {r}")).into_iter().collect();
    assert_eq!(client.bye(&extra).status, 200);
    let (dir, meta) = site.daemon.metadata_for(&client.call_id, true);
    (dir, meta, d1.sent + da.sent)
}

/// The REFER-style handoff and the agent transfer across sites have the same shape at the
/// recorders: blue's recording ends with BYE (Reason kept), purple's new recording later carries
/// the same CallUUID with its own connection id, and is linked to blue's.
fn handoff_across_sites(tag: &str, recorded_agent_at_purple: u32, reason: &str) {
    let sites = TwoSites::start(tag);
    let (blue, purple) = (&sites.blue, &sites.purple);
    let call_uuid = uuid("TSHO");
    let (blue_dir, blue_meta, blue_sent) =
        record_leg(blue, &call_uuid, "00BLUE07", 2, D2_TONE, 30, Some(reason));
    let (purple_dir, purple_meta, purple_sent) = record_leg(
        purple,
        &call_uuid,
        "00PURP42",
        recorded_agent_at_purple,
        D3_TONE,
        40,
        None,
    );

    // Blue's recording ended at the transfer, why kept; purple's is separate and later.
    assert_eq!(blue_meta["host"], "blue");
    assert_eq!(purple_meta["host"], "purple");
    assert_eq!(blue_meta["end_reason"], "bye");
    assert_eq!(blue_meta["end_detail"], reason);
    assert_ne!(blue_meta["id"], purple_meta["id"]);
    assert_eq!(blue_meta["connection_id"], "00BLUE07");
    assert_eq!(purple_meta["connection_id"], "00PURP42");
    assert_eq!(purple_meta["call_uuid"], call_uuid.as_str());
    assert!(time_of(&purple_meta["started_at"]) >= time_of(&blue_meta["ended_at"]));
    assert_eq!(blue.daemon.recordings().len(), 1);
    assert_eq!(purple.daemon.recordings().len(), 1);
    // Purple found blue's recording in the shared index: linked.
    assert_eq!(purple_meta["interaction"], blue_meta["id"]);
    assert_eq!(purple_meta["previous"], blue_meta["id"]);

    // Files: every packet, each agent's voice in its own recording.
    assert_eq!(
        tshark_count(&blue_dir.join("recording.pcap"), None),
        blue_sent as usize
    );
    assert_eq!(
        tshark_count(&purple_dir.join("recording.pcap"), None),
        purple_sent as usize
    );
    let tones = [D1_TONE, D2_TONE, D3_TONE];
    for (dir, meta, tone) in [(&blue_dir, &blue_meta, 1), (&purple_dir, &purple_meta, 2)] {
        let wav = read_wav(&dir.join("recording.wav"));
        let agent_runs = runs(&classify(wav_channel(&wav, meta, "2"), wav.rate, &tones));
        assert_eq!(agent_runs.len(), 1, "{agent_runs:?}");
        assert_eq!(agent_runs[0].0, Some(tone), "{agent_runs:?}");
    }

    // Either host lists the interaction in time order, with site, participants, why it ended.
    let rows = sites.rows(&call_uuid);
    let id = |m: &Value| m["id"].as_str().unwrap().to_string();
    assert_eq!(
        row_summary(&rows),
        vec![
            (id(&blue_meta), "blue".into(), "bye".into()),
            (id(&purple_meta), "purple".into(), "bye".into()),
        ]
    );
    assert_eq!(rows[0]["end_detail"], reason);
    assert!(aors(&rows[0]).contains(&"sip:7002@cc.example".to_string()));
    let purple_agent = format!("sip:700{recorded_agent_at_purple}@cc.example");
    assert!(aors(&rows[1]).contains(&purple_agent));
    assert_eq!(rows[1]["connection_id"], "00PURP42");
    let text = purple.cli(&["recordings", "--call-uuid", &call_uuid]);
    let (b, p) = (
        text.find(&id(&blue_meta))
            .unwrap_or_else(|| panic!("{text}")),
        text.find(&id(&purple_meta))
            .unwrap_or_else(|| panic!("{text}")),
    );
    assert!(b < p, "{text}");
    assert!(text.contains("purple") && text.contains("blue"), "{text}");

    // `show` of blue's recording on purple (not in purple's spool: from the shared index)
    // prints the whole interaction with the gap between the sites.
    let text = purple.cli(&["show", &id(&blue_meta)]);
    assert!(
        text.contains(&format!("1. {} (this)  site blue", id(&blue_meta))),
        "{text}"
    );
    assert!(
        text.contains(&format!("2. {}  site purple", id(&purple_meta))),
        "{text}"
    );
    assert!(text.contains("gap "), "{text}");
    assert!(text.contains(reason), "{text}");
}

/// Row "REFER" of the two-site table: the customer-side recording started at blue ends there;
/// purple records the customer with D3 as a new, linked recording.
#[test]
fn two_sites_transfer_by_refer_ends_at_blue_and_continues_at_purple() {
    handoff_across_sites("rf", 3, "SIP;cause=200;text=\"REFER transfer to purple\"");
}

/// Agent recording transferred to the other site: blue's recording of D2 ends; purple's
/// recording of D3 is a separate recording.
#[test]
fn two_sites_agent_recording_ends_at_blue_and_purple_records_the_new_agent() {
    handoff_across_sites("ag", 3, "Q.850;cause=16;text=\"agent transferred\"");
}
