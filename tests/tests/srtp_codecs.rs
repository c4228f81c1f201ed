//! SRTP and codecs end to end: ffmpeg (its own RTP packetizers, SRTP implementation and
//! encoders) sends one tone per stream into a SIPREC session to the real daemon; the WAV must
//! hold each tone on its stream's channel, at the right time, at the widest stream's rate.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    client::{siprec_body, SipClient},
    daemon::{Daemon, DaemonOptions},
    net::VethPair,
};

/// Seconds of tone each sender sends.
const TONE_SECS: f64 = 3.0;
const CUSTOMER_TONE: f64 = 440.0;
const AGENT_TONE: f64 = 1000.0;

/// How one stream is offered and sent.
#[derive(Clone)]
struct Media {
    label: &'static str,
    /// Where the sender sends from (the m-line port).
    port: u16,
    pt: u8,
    /// `a=rtpmap` value.
    rtpmap: &'static str,
    /// ffmpeg encoder and its input sample rate and channels.
    encoder: &'static str,
    rate: u32,
    channels: u8,
    /// SDES suite and base64 key+salt, for RTP/SAVP.
    srtp: Option<(&'static str, String)>,
    freq: f64,
}

fn key(n: usize, seed: u8) -> String {
    let bytes: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    recorder::media::sdes::base64_encode(&bytes)
}

fn pcmu(label: &'static str, port: u16, freq: f64) -> Media {
    Media {
        label,
        port,
        pt: 0,
        rtpmap: "PCMU/8000",
        encoder: "pcm_mulaw",
        rate: 8000,
        channels: 1,
        srtp: None,
        freq,
    }
}

fn g722(label: &'static str, port: u16, freq: f64) -> Media {
    Media {
        pt: 9,
        rtpmap: "G722/8000",
        encoder: "g722",
        rate: 16000,
        ..pcmu(label, port, freq)
    }
}

fn opus(label: &'static str, port: u16, freq: f64) -> Media {
    Media {
        pt: 111,
        rtpmap: "opus/48000/2",
        encoder: "libopus",
        rate: 48000,
        channels: 2,
        ..pcmu(label, port, freq)
    }
}

fn srtp(m: Media, suite: &'static str, seed: u8) -> Media {
    Media {
        srtp: Some((suite, key(30, seed))),
        ..m
    }
}

fn offer(ip: IpAddr, media: &[Media]) -> String {
    let mut sdp = format!("v=0\r\no=SRC 800100 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n");
    for m in media {
        let proto = if m.srtp.is_some() {
            "RTP/SAVP"
        } else {
            "RTP/AVP"
        };
        sdp.push_str(&format!(
            "m=audio {} {proto} {}\r\na=rtpmap:{} {}\r\na=ptime:20\r\na=label:{}\r\na=sendonly\r\n",
            m.port, m.pt, m.pt, m.rtpmap, m.label
        ));
        if let Some((suite, key)) = &m.srtp {
            sdp.push_str(&format!("a=crypto:1 {suite} inline:{key}\r\n"));
        }
    }
    sdp
}

/// ffmpeg sending `m`'s tone from the sender namespace to `dest`, paced in real time.
fn ffmpeg(pair: &VethPair, m: &Media, dest: SocketAddr, from_port: u16) -> Child {
    let frame = m.rate / 50;
    let source = format!(
        "sine=frequency={}:sample_rate={}:samples_per_frame={frame}:duration={TONE_SECS}",
        m.freq, m.rate
    );
    let mut cmd = VethPair::command(&pair.sender_ns, "ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", &source])
        .args(["-ac", &m.channels.to_string(), "-c:a", m.encoder])
        .args(["-f", "rtp", "-payload_type", &m.pt.to_string()]);
    let scheme = match &m.srtp {
        Some((suite, key)) => {
            cmd.args(["-srtp_out_suite", suite, "-srtp_out_params", key]);
            "srtp"
        }
        None => "rtp",
    };
    cmd.arg(format!(
        "{scheme}://{dest}?localrtpport={from_port}&localrtcpport={}&pkt_size=1400",
        from_port + 1
    ))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd.spawn().expect("ffmpeg (apt-get install ffmpeg)")
}

fn wait_ok(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Call {
    pair: VethPair,
    daemon: Daemon,
    client: SipClient,
}

impl Call {
    fn new(tag: &str) -> Self {
        Self::with_options(tag, DaemonOptions::default())
    }

    fn with_options(tag: &str, options: DaemonOptions) -> Self {
        let pair = VethPair::new(tag);
        let daemon = Daemon::start(&pair, options);
        let client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
        Call {
            pair,
            daemon,
            client,
        }
    }

    /// INVITE with `media`; returns our answer's ports and body.
    fn invite(&mut self, media: &[Media]) -> (Vec<u16>, String) {
        let sdp = offer(IpAddr::V4(self.pair.sender_v4), media);
        let (ctype, body) = siprec_body(&sdp, None);
        let reply = self.client.invite(Some((&ctype, &body)), &[]);
        assert_eq!(reply.status, 200, "{}", reply.raw);
        let ports = reply.answer_ports();
        assert_eq!(ports.len(), media.len());
        (ports, reply.body())
    }

    fn dest(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.pair.recorder_v4), port)
    }

    fn bye(&mut self) -> (std::path::PathBuf, Value) {
        assert_eq!(self.client.bye(&[]).status, 200);
        self.daemon.metadata_for(&self.client.call_id, true)
    }
}

/// A decoded WAV: its rate and one Vec per channel.
struct Wav {
    rate: u32,
    channels: Vec<Vec<i16>>,
}

fn read_wav(path: &Path) -> Wav {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((&bytes[0..4], &bytes[8..12]), (&b"RIFF"[..], &b"WAVE"[..]));
    let (mut pos, mut channels, mut rate, mut data) = (12, 0usize, 0u32, &[][..]);
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let body = pos + 8;
        match &bytes[pos..pos + 4] {
            b"fmt " => {
                channels = u16::from_le_bytes([bytes[body + 2], bytes[body + 3]]) as usize;
                rate = u32::from_le_bytes(bytes[body + 4..body + 8].try_into().unwrap());
            }
            b"data" => {
                data = &bytes[body..(body + len).min(bytes.len())];
                break;
            }
            _ => {}
        }
        pos = body + len + (len & 1);
    }
    let mut out = vec![Vec::new(); channels];
    for (i, s) in data.chunks_exact(2).enumerate() {
        out[i % channels].push(i16::from_le_bytes([s[0], s[1]]));
    }
    Wav {
        rate,
        channels: out,
    }
}

/// Share of a window's energy at `freq` (Goertzel; 1.0 for a pure tone).
fn tone_share(w: &[i16], freq: f64, rate: u32) -> f64 {
    let coeff = 2.0 * (2.0 * std::f64::consts::PI * freq / f64::from(rate)).cos();
    let (mut s1, mut s2, mut energy) = (0.0f64, 0.0f64, 0.0f64);
    for &x in w {
        let x = f64::from(x);
        energy += x * x;
        let s = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    if energy < 1e3 * w.len() as f64 {
        return 0.0;
    }
    2.0 * (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (energy * w.len() as f64)
}

/// Seconds of `ch` (20 ms windows) that carry `freq`, and when the first such window starts.
fn tone_span(ch: &[i16], rate: u32, freq: f64) -> (f64, Option<f64>) {
    let n = rate as usize / 50;
    let hits: Vec<usize> = ch
        .chunks_exact(n)
        .enumerate()
        .filter(|(_, w)| tone_share(w, freq, rate) > 0.8)
        .map(|(i, _)| i)
        .collect();
    (
        hits.len() as f64 * 0.02,
        hits.first().map(|&i| i as f64 * 0.02),
    )
}

fn stream<'a>(meta: &'a Value, label: &str) -> &'a Value {
    meta["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == label)
        .unwrap_or_else(|| panic!("stream {label} in {meta}"))
}

/// One call: every stream of `media` sends its tone at once; checks the WAV's rate, length,
/// and each tone on its own channel (not on the others), from when it was sent.
fn record_call(tag: &str, media: &[Media], wav_rate: u32) -> (Value, Wav) {
    let mut call = Call::new(tag);
    let (ports, answer) = call.invite(media);
    let answered = Instant::now();
    for m in media.iter().filter(|m| m.srtp.is_some()) {
        let suite = m.srtp.as_ref().unwrap().0;
        assert!(
            answer.contains(&format!("a=crypto:1 {suite} inline:")),
            "{answer}"
        );
        assert!(!answer.contains(&m.srtp.as_ref().unwrap().1), "our own key");
    }
    let senders: Vec<Child> = media
        .iter()
        .zip(&ports)
        .map(|(m, &p)| ffmpeg(&call.pair, m, call.dest(p), m.port))
        .collect();
    senders.into_iter().for_each(wait_ok);
    let elapsed = answered.elapsed().as_secs_f64();
    let (dir, meta) = call.bye();
    let wav = read_wav(&dir.join("recording.wav"));
    assert_eq!(wav.rate, wav_rate);
    assert_eq!(meta["wav"]["sample_rate"], wav_rate);
    assert_eq!(wav.channels.len(), media.len());
    let secs = wav.channels[0].len() as f64 / f64::from(wav.rate);
    assert!(
        secs >= TONE_SECS && secs <= elapsed + 1.0,
        "WAV of {secs} s for a call of {elapsed} s"
    );
    for (i, m) in media.iter().enumerate() {
        let (len, first) = tone_span(&wav.channels[i], wav.rate, m.freq);
        assert!(
            len >= TONE_SECS - 0.2,
            "channel {i} ({}) holds {len} s of its {} Hz tone",
            m.encoder,
            m.freq
        );
        // The tone lies where it arrived: after the answer, and early enough to end by the
        // time ffmpeg had sent it all (the BYE followed).
        let first = first.unwrap();
        assert!(
            first + len <= elapsed + 0.1,
            "tone on channel {i} from {first} s for {len} s, call of {elapsed} s"
        );
        for (j, other) in media.iter().enumerate().filter(|(j, _)| *j != i) {
            let (leak, _) = tone_span(&wav.channels[j], wav.rate, m.freq);
            assert!(
                leak < 0.1 || other.freq == m.freq,
                "{} Hz on channel {j} too",
                m.freq
            );
        }
        let s = stream(&meta, m.label);
        assert_eq!(s["decoded"], true, "{s}");
        assert!(s["decoded_packets"].as_u64().unwrap() >= 145, "{s}");
        assert_eq!(s["auth_failures"], 0, "{s}");
        assert_eq!(s["decode_errors"], 0, "{s}");
        assert_eq!(
            s["srtp_suite"],
            m.srtp
                .as_ref()
                .map_or(Value::Null, |(suite, _)| (*suite).into())
        );
    }
    // The keys are the client's secrets: never in what the recorder writes beside the audio.
    let text = std::fs::read_to_string(dir.join("metadata.json")).unwrap();
    let log = call.daemon.log_text();
    for (_, key) in media.iter().filter_map(|m| m.srtp.as_ref()) {
        assert!(!text.contains(key.as_str()), "key in metadata.json");
        assert!(!log.contains(key.as_str()), "key in the log");
    }
    (meta, wav)
}

#[test]
fn srtp_aes_cm_128_hmac_sha1_80_pcmu() {
    let media = [
        srtp(
            pcmu("1", 31000, CUSTOMER_TONE),
            "AES_CM_128_HMAC_SHA1_80",
            1,
        ),
        srtp(pcmu("2", 31002, AGENT_TONE), "AES_CM_128_HMAC_SHA1_80", 2),
    ];
    record_call("s80", &media, 8000);
}

#[test]
fn srtp_aes_cm_128_hmac_sha1_32_pcmu() {
    let media = [
        srtp(
            pcmu("1", 31000, CUSTOMER_TONE),
            "AES_CM_128_HMAC_SHA1_32",
            3,
        ),
        pcmu("2", 31002, AGENT_TONE),
    ];
    record_call("s32", &media, 8000);
}

#[test]
fn pcmu_plain() {
    let media = [
        pcmu("1", 31000, CUSTOMER_TONE),
        pcmu("2", 31002, AGENT_TONE),
    ];
    record_call("pcmu", &media, 8000);
}

#[test]
fn g722_is_decoded_at_16k() {
    let media = [
        g722("1", 31000, CUSTOMER_TONE),
        g722("2", 31002, AGENT_TONE),
    ];
    let (meta, _) = record_call("g722", &media, 16000);
    assert_eq!(stream(&meta, "1")["sample_rate"], 16000);
    assert_eq!(stream(&meta, "1")["clock_rate"], 8000);
}

#[test]
fn opus_is_decoded_at_48k() {
    let media = [
        srtp(
            opus("1", 31000, CUSTOMER_TONE),
            "AES_CM_128_HMAC_SHA1_80",
            4,
        ),
        opus("2", 31002, AGENT_TONE),
    ];
    let (meta, _) = record_call("opus", &media, 48000);
    assert_eq!(stream(&meta, "2")["sample_rate"], 48000);
}

#[test]
fn mixed_call_customer_g722_agent_pcmu_resampled() {
    let media = [
        g722("1", 31000, CUSTOMER_TONE),
        pcmu("2", 31002, AGENT_TONE),
    ];
    let (meta, _) = record_call("mix", &media, 16000);
    assert_eq!(stream(&meta, "2")["sample_rate"], 8000);
}

/// What a [`Relay`] does to every 10th packet (the 6th, 16th, ...).
#[derive(Clone, Copy, PartialEq)]
enum Mangle {
    /// Flips a payload bit.
    Flip,
    /// Does not forward it.
    Drop,
}

/// A relay in the sender namespace between ffmpeg and the recorder: forwards from the offered
/// port, mangling every 10th packet.
struct Relay {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
    mangled: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Relay {
    fn start(call: &Call, from_port: u16, dest: SocketAddr, mangle: Mangle) -> Self {
        let pair = &call.pair;
        let input = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
        let output = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, from_port)).unwrap());
        input
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = input.local_addr().unwrap();
        let (done, mangled, received) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (done, mangled, received) = (done.clone(), mangled.clone(), received.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                // Drains what is queued after the sender ended before it stops.
                loop {
                    let n = match input.recv(&mut buf) {
                        Ok(n) => n,
                        Err(_) if done.load(Ordering::Acquire) => break,
                        Err(_) => continue,
                    };
                    if received.fetch_add(1, Ordering::Relaxed) % 10 == 5 {
                        mangled.fetch_add(1, Ordering::Relaxed);
                        if mangle == Mangle::Drop {
                            continue;
                        }
                        buf[20] ^= 0x04;
                    }
                    output.send_to(&buf[..n], dest).unwrap();
                }
            })
        };
        Relay {
            addr,
            done,
            mangled,
            received,
            thread,
        }
    }

    /// (packets mangled, packets received) once the sender is done.
    fn finish(self) -> (u64, u64) {
        self.done.store(true, Ordering::Release);
        self.thread.join().unwrap();
        (
            self.mangled.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// Opus loss concealment: every 10th packet is lost on the way; libopus' PLC fills each gap.
#[test]
fn lost_opus_packets_are_concealed() {
    let m = opus("1", 31000, CUSTOMER_TONE);
    let mut call = Call::new("plc");
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    let relay = Relay::start(&call, m.port, call.dest(ports[0]), Mangle::Drop);
    wait_ok(ffmpeg(&call.pair, &m, relay.addr, 32000));
    let (dropped, received) = relay.finish();
    let (dir, meta) = call.bye();
    let s = stream(&meta, "1");
    assert!(dropped >= 14, "{dropped} of {received}");
    assert_eq!(s["concealed_frames"], dropped, "{s}");
    assert_eq!(s["decoded_packets"], received - dropped, "{s}");
    assert_eq!(s["lost"], dropped, "{s}");
    let wav = read_wav(&dir.join("recording.wav"));
    // Concealment continues the tone: far more of it than the forwarded packets alone hold.
    let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    let bare = (received - 2 * dropped) as f64 * 0.02;
    assert!(
        len > bare + 0.2,
        "{len} s of tone, {bare} s without concealment"
    );
}

/// SRTP through a relay that flips one bit in every 10th packet.
#[test]
fn tampered_srtp_packets_are_auth_failures_and_the_tone_survives() {
    let m = srtp(
        pcmu("1", 31000, CUSTOMER_TONE),
        "AES_CM_128_HMAC_SHA1_80",
        5,
    );
    let metrics = SocketAddr::new(IpAddr::V4("10.231.0.2".parse().unwrap()), 9464);
    let options = DaemonOptions {
        extra: vec!["--metrics-listen".into(), metrics.to_string()],
        ..DaemonOptions::default()
    };
    let mut call = Call::with_options("tamp", options);
    assert_eq!(IpAddr::V4(call.pair.recorder_v4), metrics.ip());
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    let relay = Relay::start(&call, m.port, call.dest(ports[0]), Mangle::Flip);
    wait_ok(ffmpeg(&call.pair, &m, relay.addr, 32000));
    let (tampered, forwarded) = relay.finish();
    let tampered_now = tampered;
    // `recorder sessions` shows them while the call is up (the writer republishes its
    // per-stream counters every 250 ms: polled until they arrive, bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(tests::daemon::recorder_bin())
            .args(["sessions", "--json", "--socket"])
            .arg(&call.daemon.control)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if v[0]["auth_failures"] == tampered_now {
            let text = format!("{v}");
            assert!(
                !text.contains(m.srtp.as_ref().unwrap().1.as_str()),
                "key in {text}"
            );
            assert!(
                text.contains("\"srtp_suite\":\"AES_CM_128_HMAC_SHA1_80\""),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "auth failures never shown: {v}");
        thread::sleep(Duration::from_millis(50)); // polling the writer's republish
    }
    let line = format!("recorder_srtp_auth_failures_total {tampered_now}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(&call.pair, metrics);
        assert!(
            !body.contains(m.srtp.as_ref().unwrap().1.as_str()),
            "key in the metrics"
        );
        if body.lines().any(|l| l == line) {
            break;
        }
        assert!(Instant::now() < deadline, "no {line:?} in\n{body}");
        thread::sleep(Duration::from_millis(50)); // polling the writer's counters
    }
    let table = Command::new(tests::daemon::recorder_bin())
        .args(["sessions", "--socket"])
        .arg(&call.daemon.control)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap().contains("AUTH FAIL"),
        "{table}"
    );
    let (dir, meta) = call.bye();
    let s = stream(&meta, "1");
    assert!(tampered >= 14, "{tampered} of {forwarded}");
    assert_eq!(s["auth_failures"], tampered, "{s}");
    assert_eq!(s["decoded_packets"], forwarded - tampered, "{s}");
    assert_eq!(s["packets"], forwarded, "every packet is in the pcap: {s}");
    let wav = read_wav(&dir.join("recording.wav"));
    let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    // Each dropped packet leaves 20 ms of silence, which spoils up to two 20 ms windows.
    let expected = (forwarded - 2 * tampered) as f64 * 0.02 - 0.1;
    assert!(len >= expected, "{len} s of tone, expected {expected}");
    assert!(
        len < TONE_SECS - 0.2,
        "{len} s: the tampered packets were not silent"
    );
}

/// libsrtp (Debian's, through `python3-pylibsrtp`) as an independent SRTP sender: each line on
/// its stdin is `<profile> <key hex> <plain RTP hex>`, protected with that key's session (one
/// per key, kept: its packet index goes on) and sent from `from` to `dest`.
const PY_SRTP: &str = r#"
import socket, sys
from pylibsrtp import Policy, Session
from pylibsrtp._binding import ffi

def aes256(policy, rtp_tag):
    # RFC 6188 suites have no libsrtp profile: set its srtp_crypto_policy_t fields (cipher,
    # key+salt length, auth, auth key length, tag length, services) to SRTP_AES_ICM_256.
    for crypto, tag in ((policy._policy.rtp, rtp_tag), (policy._policy.rtcp, 10)):
        f = ffi.cast("int *", ffi.addressof(crypto))
        f[0], f[1], f[4] = 5, 46, tag
src, dst = sys.argv[1].rsplit(":", 1), sys.argv[2].rsplit(":", 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((src[0], int(src[1])))
sessions = {}
for line in sys.stdin:
    profile, key, packet = line.split()
    if (profile, key) not in sessions:
        # A name, or libsrtp's srtp_profile_t number for those pylibsrtp does not name.
        wide = profile.startswith("AES256_CM_SHA1_")
        name = "AES128_CM_SHA1_80" if wide else profile
        number = int(name) if name.isdigit() else getattr(Policy, "SRTP_PROFILE_" + name)
        policy = Policy(key=bytes.fromhex(key), ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                        srtp_profile=number)
        if wide:
            aes256(policy, 10 if profile.endswith("_80") else 4)
        sessions[(profile, key)] = Session(policy=policy)
    sock.sendto(sessions[(profile, key)].protect(bytes.fromhex(packet)), (dst[0], int(dst[1])))
"#;

struct LibSrtp {
    child: Child,
    stdin: std::process::ChildStdin,
}

impl LibSrtp {
    fn start(pair: &VethPair, from: SocketAddr, dest: SocketAddr) -> Self {
        let mut child = VethPair::command(&pair.sender_ns, "/usr/bin/python3")
            .args(["-c", PY_SRTP, &from.to_string(), &dest.to_string()])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 (apt-get install python3-pylibsrtp)");
        let stdin = child.stdin.take().unwrap();
        Self { child, stdin }
    }

    fn send(&mut self, profile: &str, key: &[u8], packet: &[u8]) {
        use std::io::Write;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        writeln!(self.stdin, "{profile} {} {}", hex(key), hex(packet)).unwrap();
        self.stdin.flush().unwrap();
    }

    fn finish(self) {
        drop(self.stdin);
        wait_ok(self.child);
    }
}

fn key_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// PCMU tone packets of one SSRC, starting at sequence number `seq`.
struct PcmuSource {
    rtp: tests::rtp::RtpStream,
}

impl PcmuSource {
    fn new(ssrc: u32, seq: u16) -> Self {
        // The socket is python's; this one only numbers and fills the packets.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rtp = tests::rtp::RtpStream::new(socket, "127.0.0.1:9".parse().unwrap(), ssrc, 0);
        rtp.seq = seq;
        Self { rtp }
    }

    fn next(&mut self, freq: f64) -> Vec<u8> {
        let samples = tests::rtp::tone(freq, 8000.0, self.rtp.sample, 160);
        self.rtp.sample += 160;
        let payload = tests::rtp::encode(0, &samples);
        self.rtp.packet(&payload)
    }
}

/// Paces `n` packets at 20 ms (real-time media, not synchronisation), from `start`.
fn pace(start: Instant, n: u32) {
    let due = start + Duration::from_millis(20 * u64::from(n));
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
}

fn offer_srtp_pcmu(label: &'static str, port: u16, suite: &'static str, key: &[u8]) -> Media {
    Media {
        srtp: Some((suite, recorder::media::sdes::base64_encode(key))),
        ..pcmu(label, port, CUSTOMER_TONE)
    }
}

/// GCM suites (RFC 7714) and AES-256 counter mode suites (RFC 6188) from libsrtp, with the
/// sequence number wrapping after 35 packets: the rollover counter must follow or every
/// packet after the wrap fails authentication.
#[test]
fn gcm_and_aes_256_suites_from_libsrtp_across_the_sequence_wrap() {
    for (profile, suite, len) in [
        ("AEAD_AES_128_GCM", "AEAD_AES_128_GCM", 28),
        ("AEAD_AES_256_GCM", "AEAD_AES_256_GCM", 44),
        ("AES256_CM_SHA1_80", "AES_256_CM_HMAC_SHA1_80", 46),
        ("AES256_CM_SHA1_32", "AES_256_CM_HMAC_SHA1_32", 46),
    ] {
        let key = key_bytes(len, 7);
        let m = offer_srtp_pcmu("1", 31000, suite, &key);
        let mut call = Call::new("gcm");
        let (ports, answer) = call.invite(std::slice::from_ref(&m));
        assert!(
            answer.contains(&format!("a=crypto:1 {suite} inline:")),
            "{answer}"
        );
        let from = SocketAddr::new(IpAddr::V4(call.pair.sender_v4), m.port);
        let mut tx = LibSrtp::start(&call.pair, from, call.dest(ports[0]));
        let mut src = PcmuSource::new(0x5eed, 65_500);
        let start = Instant::now();
        for n in 0..150 {
            pace(start, n);
            tx.send(profile, &key, &src.next(CUSTOMER_TONE));
        }
        tx.finish();
        let (dir, meta) = call.bye();
        let s = stream(&meta, "1");
        assert_eq!(s["srtp_suite"], suite);
        assert_eq!(
            (s["decoded_packets"].as_u64(), s["auth_failures"].as_u64()),
            (Some(150), Some(0)),
            "{s}"
        );
        let wav = read_wav(&dir.join("recording.wav"));
        let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
        assert!(len >= 2.9, "{suite}: {len} s of tone");
    }
}

/// A re-INVITE with a new key mid-call (a transfer): the audio goes on on the same channel,
/// and packets the client sent with the old key before it switched, arriving late, are kept.
#[test]
fn reinvite_with_a_new_key_loses_no_audio() {
    let (old, new) = (key_bytes(30, 11), key_bytes(30, 12));
    let profile = "AES128_CM_SHA1_80";
    let suite = "AES_CM_128_HMAC_SHA1_80";
    let m = offer_srtp_pcmu("1", 31000, suite, &old);
    let mut call = Call::new("rkey");
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    let from = SocketAddr::new(IpAddr::V4(call.pair.sender_v4), m.port);
    let mut tx = LibSrtp::start(&call.pair, from, call.dest(ports[0]));
    let mut src = PcmuSource::new(0xabc, 1000);
    let start = Instant::now();
    for n in 0..100 {
        pace(start, n);
        tx.send(profile, &old, &src.next(CUSTOMER_TONE));
    }
    // Two packets the client protected with the old key just before the switch, held up.
    let late = [src.next(CUSTOMER_TONE), src.next(CUSTOMER_TONE)];
    let m2 = offer_srtp_pcmu("1", 31000, suite, &new);
    let sdp = offer(IpAddr::V4(call.pair.sender_v4), &[m2]).replace(" 1 IN IP4", " 2 IN IP4");
    let (ctype, body) = siprec_body(&sdp, None);
    let reply = call.client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(reply.answer_ports(), ports);
    let restart = Instant::now();
    for n in 0..100 {
        pace(restart, n);
        tx.send(profile, &new, &src.next(CUSTOMER_TONE));
        if n == 2 {
            for p in &late {
                tx.send(profile, &old, p);
            }
        }
    }
    tx.finish();
    let (dir, meta) = call.bye();
    let s = stream(&meta, "1");
    assert_eq!(
        (s["decoded_packets"].as_u64(), s["auth_failures"].as_u64()),
        (Some(202), Some(0)),
        "{s}"
    );
    let wav = read_wav(&dir.join("recording.wav"));
    let (len, first) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    let first = first.unwrap();
    // 202 packets of tone with no gap but the re-INVITE's round trip.
    assert!(len >= 4.0, "{len} s of tone");
    let end = first + len;
    let silent: usize = wav.channels[0][(first * 8000.0) as usize..(end * 8000.0) as usize]
        .chunks_exact(160)
        .filter(|w| tone_share(w, CUSTOMER_TONE, 8000) < 0.8)
        .count();
    assert!(
        silent <= 10,
        "{silent} windows without the tone in the call"
    );
}

/// G.729 from bcg729's encoder (Debian libbcg729), two 10 ms frames per packet.
#[test]
fn g729_from_bcg729_is_decoded() {
    use recorder::media::g729::{Encoder, FRAME_SAMPLES};
    let m = Media {
        pt: 18,
        rtpmap: "G729/8000",
        ..pcmu("1", 31000, CUSTOMER_TONE)
    };
    let mut call = Call::new("g729");
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    let socket = call
        .pair
        .in_sender(|| UdpSocket::bind((call.pair.sender_v4, m.port)).unwrap());
    let mut rtp = tests::rtp::RtpStream::new(socket, call.dest(ports[0]), 0x729, 18);
    let mut enc = Encoder::new(false).unwrap();
    let start = Instant::now();
    for n in 0..150 {
        pace(start, n);
        let samples = tests::rtp::tone(CUSTOMER_TONE, 8000.0, u64::from(n) * 160, 160);
        let mut payload = Vec::new();
        for f in samples.chunks_exact(FRAME_SAMPLES) {
            payload.extend(enc.encode(f.try_into().unwrap()));
        }
        // 20 bytes advance the timestamp by 160 (the helper counts one per byte: G.711).
        let p = rtp.packet(&payload);
        rtp.timestamp = rtp.timestamp.wrapping_add(140);
        rtp.socket.send_to(&p, rtp.dest).unwrap();
    }
    let (dir, meta) = call.bye();
    let s = stream(&meta, "1");
    assert_eq!(
        (s["codec"].as_str(), s["decoded_packets"].as_u64()),
        (Some("G729"), Some(150)),
        "{s}"
    );
    let wav = read_wav(&dir.join("recording.wav"));
    assert_eq!(wav.rate, 8000);
    let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    assert!(len >= 2.8, "{len} s of tone");
}

fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let t = ((i32::from(u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// With `pcap_srtp = "decrypted"` the pcap holds plain RTP that tshark reads and plays: no
/// auth tag, valid lengths, and the tone in its payloads.
#[test]
fn decrypted_pcap_holds_plain_rtp() {
    let dir = tests::daemon::scratch_dir("pcapsrtp");
    let config = dir.join("recorder.toml");
    std::fs::write(&config, "pcap_srtp = \"decrypted\"\n").unwrap();
    let options = DaemonOptions {
        extra: vec!["--config".into(), config.display().to_string()],
        ..DaemonOptions::default()
    };
    let m = srtp(
        pcmu("1", 31000, CUSTOMER_TONE),
        "AES_CM_128_HMAC_SHA1_32",
        9,
    );
    let mut call = Call::with_options("pdec", options);
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    wait_ok(ffmpeg(&call.pair, &m, call.dest(ports[0]), m.port));
    let (rec, meta) = call.bye();
    assert_eq!(stream(&meta, "1")["auth_failures"], 0);
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(rec.join("recording.pcap"))
        .args([
            "-o",
            "rtp.heuristic_rtp:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
        ])
        .args(["-Y", "rtp", "-T", "fields"])
        .args([
            "-e",
            "udp.length",
            "-e",
            "ip.checksum.status",
            "-e",
            "rtp.payload",
        ])
        .output()
        .expect("tshark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut samples = Vec::new();
    let mut packets = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        // 8 (UDP) + 12 (RTP) + 160 (20 ms of PCMU): the 4-byte tag is gone.
        assert_eq!(f[0], "180", "{line}");
        assert_eq!(f[1], "1", "IPv4 checksum verified good: {line}");
        let hex = f[2].replace(':', "");
        let payload: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        samples.extend(payload.into_iter().map(ulaw_to_linear));
        packets += 1;
    }
    assert!(packets >= 145, "{packets} RTP packets in the pcap");
    let (len, _) = tone_span(&samples, 8000, CUSTOMER_TONE);
    assert!(
        len >= TONE_SECS - 0.2,
        "{len} s of tone in the pcap's payloads"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A re-INVITE switching the customer from PCMU to G.722 mid-call: the WAV keeps its 8 kHz
/// layout and timeline, G.722 is resampled into it, and the tone goes on on the same channel.
#[test]
fn reinvite_switching_pcmu_to_g722_keeps_the_timeline() {
    let first = pcmu("1", 31000, CUSTOMER_TONE);
    let mut call = Call::new("swch");
    let (ports, _) = call.invite(std::slice::from_ref(&first));
    let answered = Instant::now();
    wait_ok(ffmpeg(&call.pair, &first, call.dest(ports[0]), first.port));
    let switched_at = answered.elapsed().as_secs_f64();
    let second = g722("1", 31000, CUSTOMER_TONE);
    let sdp = offer(
        IpAddr::V4(call.pair.sender_v4),
        std::slice::from_ref(&second),
    )
    .replace(" 1 IN IP4", " 2 IN IP4");
    let (ctype, body) = siprec_body(&sdp, None);
    let reply = call.client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert!(
        reply.body().contains("a=rtpmap:9 G722/8000"),
        "{}",
        reply.body()
    );
    wait_ok(ffmpeg(
        &call.pair,
        &second,
        call.dest(ports[0]),
        second.port,
    ));
    let elapsed = answered.elapsed().as_secs_f64();
    let (dir, meta) = call.bye();
    let wav = read_wav(&dir.join("recording.wav"));
    assert_eq!(wav.rate, 8000);
    let ch = &wav.channels[0];
    let secs = ch.len() as f64 / 8000.0;
    assert!(
        secs >= 2.0 * TONE_SECS && secs <= elapsed + 1.0,
        "{secs} s WAV"
    );
    let at = (switched_at * 8000.0) as usize;
    let (before, _) = tone_span(&ch[..at], 8000, CUSTOMER_TONE);
    let (after, first_after) = tone_span(&ch[at..], 8000, CUSTOMER_TONE);
    assert!(before >= TONE_SECS - 0.2, "{before} s of PCMU tone");
    assert!(after >= TONE_SECS - 0.2, "{after} s of G.722 tone");
    assert!(
        first_after.unwrap() < 1.0,
        "G.722 tone starts {first_after:?} s after the switch"
    );
    let s = stream(&meta, "1");
    assert_eq!(
        (s["codec"].as_str(), s["sample_rate"].as_u64()),
        (Some("G722"), Some(16000))
    );
    assert!(s["decoded_packets"].as_u64().unwrap() >= 290, "{s}");
    assert_eq!(s["decode_errors"], 0);
}

/// UNENCRYPTED_SRTP and UNENCRYPTED_SRTCP (RFC 4568 §6.3.2): libsrtp's null-cipher
/// HMAC-SHA1-80 profile (srtp_profile_null_sha1_80 = 5) sends the audio in the clear but
/// authenticated; the recorder checks the tag, and our answer repeats the parameters.
#[test]
fn unencrypted_srtp_session_parameters() {
    let key = key_bytes(30, 21);
    let mut m = offer_srtp_pcmu("1", 31000, "AES_CM_128_HMAC_SHA1_80", &key);
    m.srtp = m
        .srtp
        .map(|(suite, k)| (suite, format!("{k} UNENCRYPTED_SRTP UNENCRYPTED_SRTCP")));
    let mut call = Call::new("unen");
    let (ports, answer) = call.invite(std::slice::from_ref(&m));
    assert!(
        answer.contains(" UNENCRYPTED_SRTP UNENCRYPTED_SRTCP\r\n"),
        "{answer}"
    );
    let from = SocketAddr::new(IpAddr::V4(call.pair.sender_v4), m.port);
    let mut tx = LibSrtp::start(&call.pair, from, call.dest(ports[0]));
    let mut src = PcmuSource::new(0x77, 100);
    let start = Instant::now();
    for n in 0..100 {
        pace(start, n);
        let mut p = src.next(CUSTOMER_TONE);
        if n == 40 {
            // Forged in the clear without the key: the tag cannot match.
            tx.send("5", &key_bytes(30, 99), &p);
            p = src.next(CUSTOMER_TONE);
        }
        tx.send("5", &key, &p);
    }
    tx.finish();
    let (dir, meta) = call.bye();
    let s = stream(&meta, "1");
    assert_eq!(
        (s["decoded_packets"].as_u64(), s["auth_failures"].as_u64()),
        (Some(100), Some(1)),
        "{s}"
    );
    let wav = read_wav(&dir.join("recording.wav"));
    let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    assert!(len >= 1.85, "{len} s of tone");
}

/// A restart mid-call (`--detach-on-exit`, then a new daemon adopts capture and session) on an
/// SRTP stream whose sequence number wraps while the first daemon still runs: the new daemon
/// decrypts with the key and rollover counter the handover carried.
#[test]
fn srtp_across_a_restart_and_the_sequence_wrap() {
    let key = key_bytes(30, 33);
    let m = offer_srtp_pcmu("1", 31000, "AES_CM_128_HMAC_SHA1_80", &key);
    let options = DaemonOptions {
        extra: vec!["--detach-on-exit".into()],
        ..DaemonOptions::default()
    };
    let mut call = Call::with_options("srst", options);
    let (ports, _) = call.invite(std::slice::from_ref(&m));
    let from = SocketAddr::new(IpAddr::V4(call.pair.sender_v4), m.port);
    let tx = LibSrtp::start(&call.pair, from, call.dest(ports[0]));
    let stop = Arc::new(AtomicBool::new(false));
    let (progress_tx, progress) = std::sync::mpsc::channel::<u32>();
    let sending = {
        let (stop, key) = (stop.clone(), key.clone());
        thread::spawn(move || {
            let mut tx = tx;
            let mut src = PcmuSource::new(0x5e55, 65_500);
            let start = Instant::now();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                pace(start, n);
                tx.send("AES128_CM_SHA1_80", &key, &src.next(CUSTOMER_TONE));
                n += 1;
                let _ = progress_tx.send(n);
            }
            tx.finish();
            n
        })
    };
    let wait = |sent: u32| while progress.recv().unwrap() < sent {};
    wait(60); // wrapped after 36
    assert_eq!(call.daemon.stop(), Some(0), "{}", call.daemon.log_text());
    // The handover carries the key to the next daemon: only there, readable by us alone.
    let handover = call.daemon.spool.join(".handover.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&handover).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{}", handover.display());
    let b64 = recorder::media::sdes::base64_encode(&key);
    assert!(std::fs::read_to_string(&handover).unwrap().contains(&b64));
    let (dir, _) = call.daemon.metadata_for(&call.client.call_id, false);
    let meta = std::fs::read_to_string(dir.join("metadata.json")).unwrap();
    assert!(!meta.contains(&b64), "key in the handed-over metadata.json");
    wait(110); // only the kernel holds these
    call.daemon.args.retain(|a| a != "--detach-on-exit");
    call.daemon.spawn(&call.pair);
    let log = call.daemon.log_text();
    assert!(log.contains("adopted the pinned capture"), "{log}");
    wait(170);
    stop.store(true, Ordering::Relaxed);
    let sent = sending.join().unwrap();
    let (dir, meta) = call.bye();
    assert_eq!(
        call.daemon.recordings().len(),
        1,
        "one recording across the restart"
    );
    let s = stream(&meta, "1");
    assert_eq!(
        (s["decoded_packets"].as_u64(), s["auth_failures"].as_u64()),
        (Some(u64::from(sent)), Some(0)),
        "{s}"
    );
    let wav = read_wav(&dir.join("recording.wav"));
    let (len, _) = tone_span(&wav.channels[0], wav.rate, CUSTOMER_TONE);
    assert!(
        len >= f64::from(sent) * 0.02 - 0.2,
        "{len} s of tone for {sent} packets"
    );
}

/// The body of `GET /metrics` from the sender namespace.
fn scrape(pair: &VethPair, addr: SocketAddr) -> String {
    let (head, body) = pair.get_metrics(addr);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}
