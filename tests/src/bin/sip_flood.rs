//! A SIP flood for the recorder: malformed messages and valid SIPREC INVITEs, paced evenly at
//! a target rate from several source addresses and ports, for a given time; prints one JSON
//! object (what was sent by kind, the responses by status code).
//!
//! It answers what it must and nothing else: a 200 to one of its INVITEs gets an ACK and then
//! a BYE (so the flood leaves no session behind), any other final response to an INVITE gets
//! the ACK RFC 3261 §17.1.1.3 asks for (else the server retransmits it until Timer H).
//!
//! ```text
//! sip_flood --target 10.0.0.2:5060 --source 10.0.0.1 --source 10.0.0.3 --rate 5000 \
//!           --seconds 10 [--sockets-per-source 4] [--invite-share 0.3] [--tcp 2]
//!           [--drain-secs 3] [--media-ip 10.0.0.1]
//! ```
//!
//! After the last request it keeps reading until every INVITE has its final answer and every
//! BYE its response, for `--drain-secs` at most.
//!
//! Kinds: `invite` (valid; multipart SDP + RFC 7865 metadata), `garbage` (random bytes),
//! `truncated` (headers cut off, no blank line), `oversized` (a 60 kB header), `bad_length`
//! (Content-Length larger than the body, or not a number), `bad_sdp` (an INVITE whose SDP is
//! nonsense), `bad_multipart` (a multipart body without its boundary). `--tcp N` adds N TCP
//! connections that carry valid INVITEs only (a malformed stream closes its connection).

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde_json::json;
use tests::client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Invite,
    Garbage,
    Truncated,
    Oversized,
    BadLength,
    BadSdp,
    BadMultipart,
}

impl Kind {
    const MALFORMED: [Kind; 6] = [
        Kind::Garbage,
        Kind::Truncated,
        Kind::Oversized,
        Kind::BadLength,
        Kind::BadSdp,
        Kind::BadMultipart,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Invite => "invite",
            Kind::Garbage => "garbage",
            Kind::Truncated => "truncated",
            Kind::Oversized => "oversized",
            Kind::BadLength => "bad_length",
            Kind::BadSdp => "bad_sdp",
            Kind::BadMultipart => "bad_multipart",
        }
    }
}

struct Args {
    target: SocketAddr,
    sources: Vec<IpAddr>,
    sockets_per_source: usize,
    rate: f64,
    seconds: f64,
    invite_share: f64,
    tcp: usize,
    drain: Duration,
    media_ip: Option<IpAddr>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        target: "127.0.0.1:5060".parse().expect("literal"),
        sources: Vec::new(),
        sockets_per_source: 4,
        rate: 5000.0,
        seconds: 10.0,
        invite_share: 0.3,
        tcp: 0,
        drain: Duration::from_secs(3),
        media_ip: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => args.target = value()?.parse().context("--target")?,
            "--source" => args.sources.push(value()?.parse().context("--source")?),
            "--sockets-per-source" => {
                args.sockets_per_source = value()?.parse().context("--sockets-per-source")?
            }
            "--rate" => args.rate = value()?.parse().context("--rate")?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--invite-share" => args.invite_share = value()?.parse().context("--invite-share")?,
            "--tcp" => args.tcp = value()?.parse().context("--tcp")?,
            "--drain-secs" => {
                args.drain = Duration::from_secs_f64(value()?.parse().context("--drain-secs")?)
            }
            "--media-ip" => args.media_ip = Some(value()?.parse().context("--media-ip")?),
            "--help" | "-h" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.sources.is_empty() {
        args.sources.push(if args.target.ip().is_loopback() {
            args.target.ip()
        } else {
            bail!("--source is required for a non-loopback target")
        });
    }
    if !(args.rate > 0.0 && args.seconds > 0.0 && (0.0..=1.0).contains(&args.invite_share)) {
        bail!("--rate and --seconds must be positive, --invite-share within 0..1");
    }
    Ok(args)
}

const USAGE: &str = "usage: sip_flood --target IP:PORT [--source IP]... [--sockets-per-source N] \
[--rate PER_S] [--seconds S] [--invite-share 0..1] [--tcp N] [--drain-secs S] [--media-ip IP]";

/// What the receivers count and what they need to answer 200s.
#[derive(Default)]
struct Tally {
    /// Responses to the flood's INVITEs, by kind of request and status.
    responses: Mutex<BTreeMap<(Kind, u16), u64>>,
    /// Responses to the flood's BYEs, by status.
    bye_responses: Mutex<BTreeMap<u16, u64>>,
    /// Kind of every request sent, by Call-ID (responses carry it back).
    kinds: Mutex<HashMap<String, Kind>>,
    /// Call-IDs of valid INVITEs that got a final response (retransmitted finals count once).
    answered: Mutex<std::collections::HashSet<String>>,
    acks: AtomicU64,
    byes: AtomicU64,
    unparsed_responses: AtomicU64,
    send_errors: AtomicU64,
}

impl Tally {
    /// Every valid INVITE has its final answer and every BYE sent its response.
    fn settled(&self, invites_sent: u64) -> bool {
        let bye_answers: u64 = self.bye_responses.lock().unwrap().values().sum();
        self.answered.lock().unwrap().len() as u64 >= invites_sent
            && bye_answers >= self.byes.load(Relaxed)
    }
}

fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One request of `kind` from `local`, with a fresh Call-ID, branch and tag.
fn build(
    kind: Kind,
    local: SocketAddr,
    target: SocketAddr,
    media: IpAddr,
    transport: &str,
) -> (String, Vec<u8>) {
    let mut rng = rand::thread_rng();
    let call_id = format!("flood-{}", token());
    if kind == Kind::Garbage {
        let len = rng.gen_range(1..1400);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        return (call_id, bytes);
    }
    let head = |content_type: &str, length: &str, extra: &str| {
        format!(
            "INVITE sip:srs@{target} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:flood@{ip}>;tag={tag}\r\n\
             To: <sip:srs@{tip}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:flood@{local};transport={tl}>;+sip.src\r\n\
             Require: siprec\r\n\
             Accept: application/sdp, application/rs-metadata+xml\r\n\
             User-Agent: sip_flood\r\n{extra}\
             Content-Type: {content_type}\r\n\
             Content-Length: {length}\r\n\r\n",
            branch = token(),
            ip = local.ip(),
            tag = token(),
            tip = target.ip(),
            tl = transport.to_ascii_lowercase(),
        )
    };
    let valid_body = |rng: &mut rand::rngs::ThreadRng| {
        let port = rng.gen_range(20_000u16..30_000) & !1;
        let sdp = offer_sdp(
            media,
            1,
            &[
                OfferedStream::sendonly("1", port, 0),
                OfferedStream::sendonly("2", port + 2, 0),
            ],
        );
        let people = [
            MetaParticipant {
                id: "p1".into(),
                aor: "sip:customer@example.com".into(),
                name: "Customer".into(),
                sends: vec!["1".into()],
            },
            MetaParticipant {
                id: "p2".into(),
                aor: "sip:agent@example.com".into(),
                name: "Agent".into(),
                sends: vec!["2".into()],
            },
        ];
        let xml = metadata_xml(Some(&token()), &["1", "2"], &people, "2026-01-01T00:00:00Z");
        siprec_body(&sdp, Some(&xml))
    };
    let bytes = match kind {
        Kind::Invite => {
            let (ctype, body) = valid_body(&mut rng);
            let mut b = head(&ctype, &body.len().to_string(), "").into_bytes();
            b.extend_from_slice(&body);
            b
        }
        Kind::Truncated => {
            let (ctype, body) = valid_body(&mut rng);
            let full = head(&ctype, &body.len().to_string(), "");
            let cut = rng.gen_range(20..full.len() - 4);
            full.as_bytes()[..cut].to_vec()
        }
        Kind::Oversized => {
            let filler = format!("X-Filler: {}\r\n", "a".repeat(60_000));
            head("application/sdp", "0", &filler).into_bytes()
        }
        Kind::BadLength => {
            let (ctype, body) = valid_body(&mut rng);
            let length = if rng.gen_bool(0.5) {
                (body.len() + 500).to_string()
            } else {
                "ten".to_string()
            };
            let mut b = head(&ctype, &length, "").into_bytes();
            b.extend_from_slice(&body);
            b
        }
        Kind::BadSdp => {
            let body = b"v=9\r\nm=audio banana RTP/AVP\r\nc=IN IP9 nowhere\r\n";
            let mut b = head("application/sdp", &body.len().to_string(), "").into_bytes();
            b.extend_from_slice(body);
            b
        }
        Kind::BadMultipart => {
            let body = b"--nope\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n";
            let mut b = head("multipart/mixed", &body.len().to_string(), "").into_bytes();
            b.extend_from_slice(body);
            b
        }
        Kind::Garbage => unreachable!(),
    };
    (call_id, bytes)
}

/// A parsed response: status, CSeq method, and the headers an ACK or BYE copies.
struct Resp {
    status: u16,
    method: String,
    call_id: String,
    from: String,
    to: String,
    cseq: u32,
    branch: Option<String>,
}

fn parse_response(bytes: &[u8]) -> Option<Resp> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (head, _) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()?
        .strip_prefix("SIP/2.0 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let (mut call_id, mut from, mut to, mut cseq, mut branch) = (None, None, None, None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match name.trim().to_ascii_lowercase().as_str() {
            "call-id" | "i" => call_id = Some(value),
            "from" | "f" => from = Some(value),
            "to" | "t" => to = Some(value),
            "cseq" => cseq = Some(value),
            "via" | "v" if branch.is_none() => {
                branch = value
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix("branch=").map(str::to_string))
            }
            _ => {}
        }
    }
    let cseq = cseq?;
    let (number, method) = cseq.split_once(' ')?;
    Some(Resp {
        status,
        method: method.trim().to_string(),
        call_id: call_id?,
        from: from?,
        to: to?,
        cseq: number.trim().parse().ok()?,
        branch,
    })
}

/// ACK (same branch for a non-2xx, a new one for a 2xx) or BYE for a response's dialog.
fn in_dialog(
    method: &str,
    r: &Resp,
    branch: &str,
    cseq: u32,
    local: SocketAddr,
    target: SocketAddr,
    transport: &str,
) -> Vec<u8> {
    format!(
        "{method} sip:srs@{target} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
         User-Agent: sip_flood\r\nContent-Length: 0\r\n\r\n",
        from = r.from,
        to = r.to,
        call_id = r.call_id,
    )
    .into_bytes()
}

/// Handles one received response; returns the requests to send back.
fn on_response(
    bytes: &[u8],
    tally: &Tally,
    local: SocketAddr,
    target: SocketAddr,
    transport: &str,
) -> Vec<Vec<u8>> {
    let Some(r) = parse_response(bytes) else {
        tally.unparsed_responses.fetch_add(1, Relaxed);
        return Vec::new();
    };
    let kind = tally.kinds.lock().unwrap().get(&r.call_id).copied();
    let Some(kind) = kind else {
        // Not ours (or its Call-ID was mangled by the server's parse): count it as garbage's.
        *tally
            .responses
            .lock()
            .unwrap()
            .entry((Kind::Garbage, r.status))
            .or_default() += 1;
        return Vec::new();
    };
    match r.method.as_str() {
        "INVITE" if r.status >= 200 => {
            *tally
                .responses
                .lock()
                .unwrap()
                .entry((kind, r.status))
                .or_default() += 1;
            if kind == Kind::Invite {
                tally.answered.lock().unwrap().insert(r.call_id.clone());
            }
            if (200..300).contains(&r.status) {
                tally.acks.fetch_add(1, Relaxed);
                tally.byes.fetch_add(1, Relaxed);
                let ack = in_dialog(
                    "ACK",
                    &r,
                    &format!("z9hG4bK{}", token()),
                    r.cseq,
                    local,
                    target,
                    transport,
                );
                let bye = in_dialog(
                    "BYE",
                    &r,
                    &format!("z9hG4bK{}", token()),
                    r.cseq + 1,
                    local,
                    target,
                    transport,
                );
                vec![ack, bye]
            } else if let Some(branch) = &r.branch {
                tally.acks.fetch_add(1, Relaxed);
                vec![in_dialog(
                    "ACK", &r, branch, r.cseq, local, target, transport,
                )]
            } else {
                Vec::new()
            }
        }
        "INVITE" => {
            *tally
                .responses
                .lock()
                .unwrap()
                .entry((kind, r.status))
                .or_default() += 1;
            Vec::new()
        }
        "BYE" => {
            *tally
                .bye_responses
                .lock()
                .unwrap()
                .entry(r.status)
                .or_default() += 1;
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Where one message goes.
enum Link {
    Udp(Arc<UdpSocket>),
    Tcp(Arc<Mutex<TcpStream>>, SocketAddr),
}

fn udp_receiver(
    socket: Arc<UdpSocket>,
    target: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let local = socket.local_addr().expect("bound");
    let mut buf = vec![0u8; 65_535];
    while !stop.load(Relaxed) {
        let Ok((len, _)) = socket.recv_from(&mut buf) else {
            continue;
        };
        for reply in on_response(&buf[..len], &tally, local, target, "UDP") {
            if socket.send_to(&reply, target).is_err() {
                tally.send_errors.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Complete message length in a stream buffer (headers + Content-Length), if all there.
fn framed_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| {
            n.trim().eq_ignore_ascii_case("content-length") || n.trim().eq_ignore_ascii_case("l")
        })
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= end + length).then_some(end + length)
}

fn tcp_receiver(
    stream: Arc<Mutex<TcpStream>>,
    mut reader: TcpStream,
    target: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let local = reader.local_addr().expect("connected");
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65_536];
    while !stop.load(Relaxed) {
        match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        while let Some(len) = framed_len(&buf) {
            let message: Vec<u8> = buf.drain(..len).collect();
            for reply in on_response(&message, &tally, local, target, "TCP") {
                if stream.lock().unwrap().write_all(&reply).is_err() {
                    tally.send_errors.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut links = Vec::new();
    let mut receivers = Vec::new();
    for ip in &args.sources {
        for _ in 0..args.sockets_per_source {
            let socket = UdpSocket::bind(SocketAddr::new(*ip, 0))
                .with_context(|| format!("binding UDP on {ip}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            // Answers come back at the flood's rate: none may be lost here.
            tests::net::big_receive_buffer(&socket);
            let socket = Arc::new(socket);
            links.push(Link::Udp(socket.clone()));
            let (tally, stop, target) = (tally.clone(), stop.clone(), args.target);
            receivers.push(std::thread::spawn(move || {
                udp_receiver(socket, target, tally, stop)
            }));
        }
    }
    for i in 0..args.tcp {
        let ip = args.sources[i % args.sources.len()];
        let socket = socket2_bind_connect(ip, args.target)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let local = socket.local_addr()?;
        let reader = socket.try_clone()?;
        let writer = Arc::new(Mutex::new(socket));
        links.push(Link::Tcp(writer.clone(), local));
        let (tally, stop, target) = (tally.clone(), stop.clone(), args.target);
        receivers.push(std::thread::spawn(move || {
            tcp_receiver(writer, reader, target, tally, stop)
        }));
    }

    let mut rng = rand::thread_rng();
    let mut sent: BTreeMap<Kind, u64> = BTreeMap::new();
    let total = (args.rate * args.seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now();
    // Sends per 10 ms bin, for the peak rate beside the mean (pacing is even, not bursts).
    let mut bins: Vec<u64> = vec![0; (args.seconds * 100.0).ceil() as usize + 1];
    let mut late = Duration::ZERO;
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            late = late.max(now - due);
        }
        let link = &links[(n as usize) % links.len()];
        let (kind, transport, local) = match link {
            Link::Udp(s) => {
                let kind = if rng.gen_bool(args.invite_share) {
                    Kind::Invite
                } else {
                    Kind::MALFORMED[rng.gen_range(0..Kind::MALFORMED.len())]
                };
                (kind, "UDP", s.local_addr()?)
            }
            Link::Tcp(_, local) => (Kind::Invite, "TCP", *local),
        };
        let media = args.media_ip.unwrap_or(local.ip());
        let (call_id, bytes) = build(kind, local, args.target, media, transport);
        tally.kinds.lock().unwrap().insert(call_id, kind);
        let ok = match link {
            Link::Udp(s) => s.send_to(&bytes, args.target).is_ok(),
            Link::Tcp(s, _) => s.lock().unwrap().write_all(&bytes).is_ok(),
        };
        if !ok {
            tally.send_errors.fetch_add(1, Relaxed);
        }
        *sent.entry(kind).or_default() += 1;
        let bin = (start.elapsed().as_millis() / 10) as usize;
        if let Some(b) = bins.get_mut(bin) {
            *b += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    let invites_sent = sent.get(&Kind::Invite).copied().unwrap_or(0);
    // Answers keep coming while the server works through its queue: wait until every INVITE has
    // its final answer and every BYE its response, or `--drain-secs` passes (the kernel may have
    // dropped some; those never get one).
    let drain_started = Instant::now();
    while drain_started.elapsed() < args.drain && !tally.settled(invites_sent) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for r in receivers {
        let _ = r.join();
    }

    let responses = tally.responses.lock().unwrap();
    let mut by_kind: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    for ((kind, code), n) in responses.iter() {
        *by_kind
            .entry(kind.name())
            .or_default()
            .entry(code.to_string())
            .or_default() += n;
        *by_code.entry(code.to_string()).or_default() += n;
    }
    let invite_finals = tally.answered.lock().unwrap().len() as u64;
    let report = json!({
        "target": args.target.to_string(),
        "sources": args.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "sockets": links.len(),
        "rate_target": args.rate,
        "seconds": args.seconds,
        "send_secs": send_secs,
        "rate_achieved": total as f64 / send_secs,
        "peak_10ms_rate": bins.iter().max().copied().unwrap_or(0) * 100,
        "max_late_ms": late.as_secs_f64() * 1000.0,
        "drain_secs": drain_secs,
        "sent_total": total,
        "sent": sent.iter().map(|(k, n)| (k.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "responses": by_code,
        "responses_by_kind": by_kind,
        "invites_unanswered": invites_sent.saturating_sub(invite_finals),
        "acks_sent": tally.acks.load(Relaxed),
        "byes_sent": tally.byes.load(Relaxed),
        "bye_responses": tally.bye_responses.lock().unwrap().iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "unparsed_responses": tally.unparsed_responses.load(Relaxed),
        "send_errors": tally.send_errors.load(Relaxed),
    });
    println!("{report}");
    Ok(())
}

/// A TCP connection from `ip` (any port) to `target` (std cannot bind before connecting).
fn socket2_bind_connect(ip: IpAddr, target: SocketAddr) -> Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket
        .bind(&SocketAddr::new(ip, 0).into())
        .with_context(|| format!("bind {ip}"))?;
    socket
        .connect(&target.into())
        .with_context(|| format!("connect {target}"))?;
    Ok(socket.into())
}
