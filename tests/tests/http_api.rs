//! The HTTP API against the real daemon after real SIPREC calls (veth pair in network
//! namespaces, real XDP capture, real RTP): search filters and cursor pagination, 401/403/404,
//! Range requests checked byte for byte against the files, the audit log of downloads, live
//! sessions and stop, one interaction's segments and gaps, `/metrics` read by a Prometheus text
//! parser, and the same API over HTTPS. The console in headless Chromium (search, interaction
//! timeline, player, pcap download), and two sites sharing PostgreSQL across a REFER handoff.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{scratch_dir, Daemon, DaemonOptions},
    net::{ip, VethPair},
    postgres::Postgres,
    rtp::{send_paced, RtpStream},
};

const HTTP_PORT: u16 = 8080;
const READ_TOKEN: &str = "qa-7f3c0b8e2d";
const ADMIN_TOKEN: &str = "ops-91aa44c1e0";

/// One HTTP response as the client saw it.
struct HttpResponse {
    status: u16,
    /// Lower-case names.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The `error` of a JSON error body with this status.
    fn error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{:?}",
            self.headers
        );
        self.json()["error"]
            .as_str()
            .expect("an error message")
            .to_string()
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), read to the end: the
/// response head, then a Content-Length or chunked body.
fn exchange(
    stream: impl Read + Write,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    exchange_body(stream, method, target, headers, b"")
}

/// [`exchange`] with a request body (a POST without one says `Content-Length: 0`).
fn exchange_body(
    mut stream: impl Read + Write,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut request = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str("Host: recorder\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header line");
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length") {
        body.resize(len.parse().unwrap(), 0);
        reader.read_exact(&mut body).unwrap();
    } else if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// A plain HTTP client in the sender namespace.
struct Api<'a> {
    pair: &'a VethPair,
    addr: SocketAddr,
}

impl Api<'_> {
    fn request(
        &self,
        method: &str,
        target: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        self.pair.in_sender(|| {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .expect("connect to the HTTP API");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            exchange(stream, method, target, &headers)
        })
    }

    fn get(&self, target: &str, token: Option<&str>) -> HttpResponse {
        self.request("GET", target, token, &[])
    }

    /// A `read`-token GET that must succeed with JSON.
    fn json(&self, target: &str) -> Value {
        let r = self.get(target, Some(READ_TOKEN));
        assert_eq!(
            r.status,
            200,
            "{target}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tokens file with a `read` token (qa) and an `admin` token (ops).
fn tokens_file(dir: &Path) -> PathBuf {
    let path = dir.join("api-tokens");
    std::fs::write(
        &path,
        format!(
            "# name role sha256\nqa read {}\nops admin {}\n",
            sha256_hex(READ_TOKEN),
            sha256_hex(ADMIN_TOKEN)
        ),
    )
    .unwrap();
    path
}

fn participants(customer: &str) -> Vec<MetaParticipant> {
    vec![
        MetaParticipant {
            id: "p-customer".into(),
            aor: customer.into(),
            name: "Customer".into(),
            sends: vec!["1".into()],
        },
        MetaParticipant {
            id: "p-agent".into(),
            aor: "sip:7001@cc.example".into(),
            name: "Agent".into(),
            sends: vec!["2".into()],
        },
    ]
}

/// Opens a two-stream SIPREC session with metadata, sends `packets` tone packets per stream
/// and returns the client (the call still up).
fn call(
    pair: &VethPair,
    daemon: &Daemon,
    call_uuid: &str,
    customer: &str,
    packets: usize,
) -> SipClient {
    let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let offered: Vec<OfferedStream> = [(31000, "1", 0), (31002, "2", 8)]
        .into_iter()
        .map(|(port, label, pt)| OfferedStream::sendonly(label, port, pt))
        .collect();
    let sdp = offer_sdp(IpAddr::V4(pair.sender_v4), 1, &offered);
    let xml = metadata_xml(
        Some(call_uuid),
        &["1", "2"],
        &participants(customer),
        "2026-12-02T10:00:00Z",
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let ports = reply.answer_ports();
    assert_eq!(ports.len(), 2);
    let mut streams: Vec<RtpStream> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
            RtpStream::new(
                socket,
                SocketAddr::new(IpAddr::V4(pair.recorder_v4), *port),
                0x7000 + i as u32,
                if i == 0 { 0 } else { 8 },
            )
        })
        .collect();
    // In real time: the WAV places audio by time, and the stitched interaction is checked
    // against the segments' wall-clock starts.
    let mut paced: Vec<(&mut RtpStream, f64)> = streams
        .iter_mut()
        .enumerate()
        .map(|(i, s)| (s, 440.0 + 300.0 * i as f64))
        .collect();
    send_paced(&mut paced, Duration::from_millis(20 * packets as u64));
    client
}

/// A finished call: its recording's id and metadata.
fn finished_call(
    pair: &VethPair,
    daemon: &Daemon,
    call_uuid: &str,
    customer: &str,
) -> (String, Value) {
    let mut client = call(pair, daemon, call_uuid, customer, 50);
    assert_eq!(client.bye(&[]).status, 200);
    let (dir, meta) = daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["state"], "complete");
    let id = dir.file_name().unwrap().to_string_lossy().to_string();
    (id, meta)
}

fn ids(list: &Value) -> Vec<String> {
    list["recordings"]
        .as_array()
        .expect("recordings array")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// The mono mix of a WAV the recorder wrote (channels added, saturating, as the API does).
fn mono(path: &Path) -> Vec<i16> {
    let data = std::fs::read(path).unwrap();
    let channels = u16::from_le_bytes([data[22], data[23]]) as usize;
    data[44..]
        .chunks_exact(2 * channels)
        .map(|f| {
            f.chunks_exact(2).fold(0i16, |m, s| {
                m.saturating_add(i16::from_le_bytes([s[0], s[1]]))
            })
        })
        .collect()
}

/// A recording's start (metadata.json) in milliseconds, as the index keeps it.
fn start_ms(meta: &Value) -> u128 {
    recorder::writer::metadata::parse_rfc3339(meta["started_at"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Every page of a listing, following `next_cursor`.
fn all_pages(api: &Api, query: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut target = format!("/api/v1/recordings?{query}");
    loop {
        let page = api.json(&target);
        pages.push(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => target = format!("/api/v1/recordings?{query}&cursor={cursor}"),
            None => return pages,
        }
    }
}

/// Waits until the listing with `query` has `count` recordings.
fn wait_listed(api: &Api, query: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listed = ids(&api.json(&format!("/api/v1/recordings?{query}")));
        if listed.len() == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{query}: {listed:?}, not {count}"
        );
        std::thread::sleep(Duration::from_millis(50)); // polling an index another process writes
    }
}

fn start_daemon(pair: &VethPair, dir: &Path, extra: Vec<String>) -> Daemon {
    let http = SocketAddr::new(IpAddr::V4(pair.recorder_v4), HTTP_PORT);
    start_site(pair, dir, "blue", http, extra)
}

fn start_site(
    pair: &VethPair,
    dir: &Path,
    site: &str,
    http: SocketAddr,
    extra: Vec<String>,
) -> Daemon {
    let mut args = vec![
        "--http-listen".to_string(),
        http.to_string(),
        "--api-tokens-file".into(),
        tokens_file(dir).display().to_string(),
        "--site".into(),
        site.into(),
    ];
    args.extend(extra);
    Daemon::start_with_spool(
        pair,
        DaemonOptions {
            extra: args,
            ..Default::default()
        },
        dir.to_path_buf(),
        dir.join("spool"),
    )
}

#[test]
fn api_after_real_calls() {
    let pair = VethPair::new("http");
    let dir = scratch_dir("http");
    let audit = dir.join("audit.log");
    let daemon = start_daemon(
        &pair,
        &dir,
        vec!["--audit-log".into(), audit.display().to_string()],
    );
    let api = Api {
        pair: &pair,
        addr: SocketAddr::new(IpAddr::V4(pair.recorder_v4), HTTP_PORT),
    };

    // Three finished calls, one after the other: two segments of interaction U1, one of U2.
    let (a, meta_a) = finished_call(
        &pair,
        &daemon,
        "HTTP0UUID0000000000000000000001",
        "sip:+4930111@carrier.example",
    );
    let (b, meta_b) = finished_call(
        &pair,
        &daemon,
        "HTTP0UUID0000000000000000000001",
        "sip:+4930222@carrier.example",
    );
    let (c, _) = finished_call(
        &pair,
        &daemon,
        "HTTP0UUID0000000000000000000002",
        "sip:+4930111@carrier.example",
    );

    // The index follows the metadata files (the writer updates it after each one).
    wait_listed(&api, "state=complete", 3);

    // Auth: nothing, a wrong token and a wrong scheme are 401; the read token may not stop.
    for token in [None, Some("not-a-token")] {
        let r = api.get("/api/v1/recordings", token);
        r.error(401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    api.request(
        "GET",
        "/api/v1/recordings",
        None,
        &[("Authorization", &format!("Basic {READ_TOKEN}"))],
    )
    .error(401);
    // Before the 404: an unauthenticated caller learns nothing about ids.
    api.get(&format!("/api/v1/recordings/{a}/audio"), None)
        .error(401);
    let forbidden = api
        .request(
            "POST",
            &format!("/api/v1/sessions/{a}/stop"),
            Some(READ_TOKEN),
            &[],
        )
        .error(403);
    assert!(forbidden.contains("admin"), "{forbidden}");

    // Newest first; filters.
    let all = api.json("/api/v1/recordings");
    assert_eq!(ids(&all), [c.as_str(), b.as_str(), a.as_str()]);
    assert!(all["next_cursor"].is_null());
    let row = &all["recordings"][2];
    assert_eq!(row["host"], "blue");
    assert_eq!(row["state"], "complete");
    assert_eq!(row["call_uuid"], "HTTP0UUID0000000000000000000001");
    assert_eq!(
        ids(&api.json("/api/v1/recordings?call_uuid=HTTP0UUID0000000000000000000001")),
        [b.as_str(), a.as_str()]
    );
    // AOR without scheme and in another case; combined with the CallUUID.
    assert_eq!(
        ids(&api.json("/api/v1/recordings?aor=%2B4930111%40Carrier.Example")),
        [c.as_str(), a.as_str()]
    );
    assert_eq!(
        ids(&api.json(
            "/api/v1/recordings?aor=sip:%2B4930111%40carrier.example&call_uuid=HTTP0UUID0000000000000000000002"
        )),
        [c.as_str()]
    );
    assert_eq!(
        ids(&api.json("/api/v1/recordings?state=complete&limit=10")),
        [c.as_str(), b.as_str(), a.as_str()]
    );
    assert!(ids(&api.json("/api/v1/recordings?state=active")).is_empty());
    // A participant by AOR or by name.
    assert_eq!(
        ids(&api.json("/api/v1/recordings?participant=%2B4930222%40carrier.example")),
        [b.as_str()]
    );
    assert_eq!(
        ids(&api.json("/api/v1/recordings?participant=customer")),
        [c.as_str(), b.as_str(), a.as_str()]
    );
    let enc = |t: &Value| t.as_str().unwrap().replace('+', "%2B");
    // until: started before b started; since: still running at or after b's end.
    assert_eq!(
        ids(&api.json(&format!(
            "/api/v1/recordings?until={}",
            enc(&meta_b["started_at"])
        ))),
        [a.as_str()]
    );
    assert_eq!(
        ids(&api.json(&format!(
            "/api/v1/recordings?since={}",
            enc(&meta_b["ended_at"])
        ))),
        [c.as_str(), b.as_str()]
    );
    assert_eq!(
        ids(&api.json(&format!(
            "/api/v1/recordings?since={}&until={}",
            enc(&meta_a["ended_at"]),
            enc(&meta_b["ended_at"])
        ))),
        [b.as_str(), a.as_str()]
    );
    // Pages of one and of two, by cursor, give the same order as one page.
    assert_eq!(
        all_pages(&api, "limit=1"),
        [vec![c.clone()], vec![b.clone()], vec![a.clone()]]
    );
    assert_eq!(
        all_pages(&api, "limit=2"),
        [vec![c.clone(), b.clone()], vec![a.clone()]]
    );
    // Bad parameters are 400 with a JSON error.
    for bad in [
        "limit=0",
        "limit=abc",
        "since=yesterday",
        "state=lost",
        "cursor=zz",
        "colour=blue",
    ] {
        api.get(&format!("/api/v1/recordings?{bad}"), Some(READ_TOKEN))
            .error(400);
    }

    // One recording: index fields plus its metadata.json.
    let shown = api.json(&format!("/api/v1/recordings/{a}"));
    assert_eq!(shown["id"], a.as_str());
    assert_eq!(shown["host"], "blue");
    assert_eq!(shown["metadata"]["id"], a.as_str());
    assert_eq!(shown["metadata"]["ended_at"], meta_a["ended_at"]);
    assert_eq!(shown["metadata"]["state"], "complete");
    assert_eq!(shown["participants"].as_array().unwrap().len(), 2);
    api.get("/api/v1/recordings/20990101T000000Z-none", Some(READ_TOKEN))
        .error(404);
    api.get("/api/v1/recordings/..%2F..%2Fetc", Some(READ_TOKEN))
        .error(400);
    api.get("/api/v1/nothing-here", Some(READ_TOKEN)).error(404);

    // Audio: the whole file, then ranges, each byte for byte against the file.
    let wav = std::fs::read(daemon.spool.join(&a).join("recording.wav")).unwrap();
    let len = wav.len();
    assert!(len > 1000, "a WAV of 1 s of two channels: {len} bytes");
    let audio = format!("/api/v1/recordings/{a}/audio");
    let whole = api.get(&audio, Some(READ_TOKEN));
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("content-type"), Some("audio/wav"));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(whole.body == wav, "the WAV as on disk");
    let mut downloads = vec![(a.clone(), "audio", 200u16)];
    for (range, want) in [
        ("bytes=0-43", 0..44),
        ("bytes=100-", 100..len),
        ("bytes=-200", len - 200..len),
        ("bytes=10-99999999", 10..len),
    ] {
        let r = api.request("GET", &audio, Some(READ_TOKEN), &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {}-{}/{len}", want.start, want.end - 1).as_str()),
            "{range}"
        );
        assert!(r.body == wav[want.clone()], "{range}: bytes as in the file");
        downloads.push((a.clone(), "audio", 206));
    }
    let r = api.request(
        "GET",
        &audio,
        Some(READ_TOKEN),
        &[("Range", &format!("bytes={len}-"))],
    );
    r.error(416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );

    // The pcap, with the admin token this time.
    let pcap = std::fs::read(daemon.spool.join(&c).join("recording.pcap")).unwrap();
    let r = api.get(&format!("/api/v1/recordings/{c}/pcap"), Some(ADMIN_TOKEN));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.tcpdump.pcap")
    );
    assert!(r.body == pcap, "the pcap as on disk");
    downloads.push((c.clone(), "pcap", 200));
    api.get(
        "/api/v1/recordings/20990101T000000Z-none/pcap",
        Some(READ_TOKEN),
    )
    .error(404);

    // The audit log: one line per download that sent bytes (not the 416, not the 404), each
    // with the token's name, the recording, the client's address and the time.
    let text = std::fs::read_to_string(&audit).expect("audit log written");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), downloads.len(), "{text}");
    for (line, (id, file, status)) in lines.iter().zip(&downloads) {
        assert_eq!(line["recording"], id.as_str(), "{line}");
        assert_eq!(line["file"], *file, "{line}");
        assert_eq!(line["status"], *status, "{line}");
        let want_token = if *file == "pcap" { "ops" } else { "qa" };
        assert_eq!(line["token"], want_token, "{line}");
        let client: SocketAddr = line["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(client.ip(), IpAddr::V4(pair.sender_v4), "{line}");
        let time = line["time"].as_str().unwrap();
        assert!(time.starts_with("20") && time.ends_with('Z'), "{line}");
    }
    assert_eq!(lines[1]["range"], "bytes=0-43");

    // One interaction: both segments of U1 in time order, the gap between them.
    let i = api.json("/api/v1/interactions/HTTP0UUID0000000000000000000001");
    let segments = i["segments"].as_array().unwrap();
    let seg_ids: Vec<&str> = segments.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(seg_ids, [a.as_str(), b.as_str()]);
    assert!(segments
        .iter()
        .all(|s| s["host"] == "blue" && s["end_reason"] == "bye"));
    let gaps = i["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{i}");
    assert_eq!(gaps[0]["after"], a.as_str());
    assert_eq!(gaps[0]["before"], b.as_str());
    let gap = gaps[0]["seconds"].as_f64().unwrap();
    assert!(gap > 0.0 && gap < 30.0, "{gap}");
    let ended: Vec<&Value> = i["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "ended")
        .collect();
    assert_eq!(ended.len(), 2);
    api.get("/api/v1/interactions/NO-SUCH-UUID", Some(READ_TOKEN))
        .error(404);

    // The interaction as one WAV: a's audio (both channels mixed) from 0, b's from its start's
    // offset, silence between.
    let mono_a = mono(&daemon.spool.join(&a).join("recording.wav"));
    let mono_b = mono(&daemon.spool.join(&b).join("recording.wav"));
    assert!(mono_a.iter().any(|&s| s != 0), "a's WAV has the tones");
    let offset_b = (start_ms(&meta_b) - start_ms(&meta_a)) as usize * 8;
    assert!(mono_a.len() <= offset_b, "a ended before b started");
    let r = api.get(
        "/api/v1/interactions/HTTP0UUID0000000000000000000001/audio",
        Some(READ_TOKEN),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("audio/wav"));
    assert_eq!(u16::from_le_bytes([r.body[22], r.body[23]]), 1, "mono");
    let stitched: Vec<i16> = r.body[44..]
        .chunks_exact(2)
        .map(|s| i16::from_le_bytes([s[0], s[1]]))
        .collect();
    assert_eq!(stitched.len(), offset_b + mono_b.len());
    assert!(stitched[..mono_a.len()] == mono_a[..], "a at 0");
    assert!(
        stitched[mono_a.len()..offset_b].iter().all(|&s| s == 0),
        "silence in the gap"
    );
    assert!(stitched[offset_b..] == mono_b[..], "b at its offset");
    let part = api.request(
        "GET",
        "/api/v1/interactions/HTTP0UUID0000000000000000000001/audio",
        Some(READ_TOKEN),
        &[("Range", "bytes=-1000")],
    );
    assert_eq!(part.status, 206);
    assert!(part.body == r.body[r.body.len() - 1000..]);
    let lines = std::fs::read_to_string(&audit).unwrap();
    let last: Vec<Value> = lines
        .lines()
        .rev()
        .take(2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (line, status) in last.iter().zip([206, 200]) {
        assert_eq!(line["file"], "interaction_audio", "{line}");
        assert_eq!(line["recording"], "HTTP0UUID0000000000000000000001");
        assert_eq!(line["status"], status);
    }

    // Live sessions, and stop (admin) as `recorder stop` does.
    let mut live = call(
        &pair,
        &daemon,
        "HTTP0UUID0000000000000000000003",
        "sip:live@x",
        10,
    );
    let (live_dir, _) = daemon.metadata_for(&live.call_id, false);
    let live_id = live_dir.file_name().unwrap().to_string_lossy().to_string();
    wait_listed(&api, "state=active", 1);
    let sessions = api.json("/api/v1/sessions");
    let listed: Vec<&str> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [live_id.as_str()]);
    assert!(sessions[0]["packets"].as_u64().is_some());
    assert!(sessions[0]["lost"].as_u64().is_some());
    assert_eq!(
        ids(&api.json("/api/v1/recordings?state=active")),
        [live_id.as_str()]
    );
    let stop = format!("/api/v1/sessions/{live_id}/stop");
    let r = api.request("POST", &stop, Some(ADMIN_TOKEN), &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["stopped"], live_id.as_str());
    // The client gets the BYE; the recording ends as stopped by the operator.
    let bye = live
        .recv_request(Duration::from_secs(5))
        .expect("BYE from the recorder");
    assert_eq!(bye.method, rsip::Method::Bye);
    let (_, meta) = daemon.metadata_for(&live.call_id, true);
    assert_eq!(meta["end_reason"], "operator");
    api.request("POST", &stop, Some(ADMIN_TOKEN), &[])
        .error(404);
    assert_eq!(api.json("/api/v1/sessions"), Value::Array(vec![]));

    // /metrics (open by default), read by a Prometheus text parser.
    let r = api.get("/metrics", None);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(r.body).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("parsable exposition");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} {label:?} missing:\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(value("recorder_sessions_started_total", None), 4.0);
    assert_eq!(
        value("recorder_sessions_ended_total", Some(("reason", "bye"))),
        3.0
    );
    assert_eq!(
        value(
            "recorder_sessions_ended_total",
            Some(("reason", "operator"))
        ),
        1.0
    );
    assert_eq!(value("recorder_sessions_active", None), 0.0);
    assert!(value("recorder_xdp_packets_captured_total", None) >= 4.0 * 2.0 * 10.0);
    assert_eq!(
        value("recorder_sip_requests_total", Some(("method", "INVITE"))),
        4.0
    );
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "recorder_write_latency_seconds")
        .expect("the write latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &latency.value else {
        panic!("{:?}", latency.value);
    };
    assert!(buckets.len() > 2, "{buckets:?}");
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert_eq!(
        inf.count,
        value("recorder_write_latency_seconds_count", None)
    );

    // Revoking a token is editing the file: no restart.
    let tokens = dir.join("api-tokens");
    std::fs::write(&tokens, format!("ops admin {}\n", sha256_hex(ADMIN_TOKEN))).unwrap();
    api.get("/api/v1/recordings", Some(READ_TOKEN)).error(401);
    assert_eq!(api.get("/api/v1/recordings", Some(ADMIN_TOKEN)).status, 200);
    // A file that does not parse refuses every token until it is fixed.
    std::fs::write(&tokens, "ops admin not-a-hash\n").unwrap();
    api.get("/api/v1/recordings", Some(ADMIN_TOKEN)).error(401);
    std::fs::write(&tokens, format!("qa read {}\n", sha256_hex(READ_TOKEN))).unwrap();
    assert_eq!(api.get("/api/v1/recordings", Some(READ_TOKEN)).status, 200);
}

#[test]
fn https_and_metrics_listen_serve_the_same_api() {
    let pair = VethPair::new("https");
    let dir = scratch_dir("https");
    let certified = rcgen::generate_simple_self_signed(vec!["recorder.test".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let metrics = SocketAddr::new(IpAddr::V4(pair.recorder_v4), 9464);
    let mut daemon = start_daemon(
        &pair,
        &dir,
        vec![
            "--http-tls-certificate".into(),
            cert.display().to_string(),
            "--http-tls-private-key".into(),
            key.display().to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ],
    );
    let (id, _) = finished_call(
        &pair,
        &daemon,
        "HTTPS0UUID000000000000000000001",
        "sip:tls@x",
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let https = SocketAddr::new(IpAddr::V4(pair.recorder_v4), HTTP_PORT);
    let get = |target: &str, token: Option<&str>| {
        pair.in_sender(|| {
            let name = rustls_pki_types::ServerName::try_from("recorder.test").unwrap();
            let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
            let tcp = TcpStream::connect_timeout(&https, Duration::from_secs(5)).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            exchange(rustls::StreamOwned::new(conn, tcp), "GET", target, &headers)
        })
    };
    let r = get("/api/v1/recordings", Some(READ_TOKEN));
    assert_eq!(r.status, 200);
    let list = r.json();
    assert_eq!(ids(&list), [id.as_str()]);
    get("/api/v1/recordings", None).error(401);
    let wav = std::fs::read(daemon.spool.join(&id).join("recording.wav")).unwrap();
    let r = get(&format!("/api/v1/recordings/{id}/audio"), Some(READ_TOKEN));
    assert_eq!(r.status, 200);
    assert!(r.body == wav, "the WAV over TLS");
    // Without audit_log, downloads are logged by the daemon.
    let log = daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("audit: recording downloaded")
                && l.contains(&id)
                && l.contains("qa")
                && l.contains(&pair.sender_v4.to_string())),
        "{log}"
    );
    // Plain HTTP on the TLS port is not served.
    let plain = pair.in_sender(|| {
        let mut s = TcpStream::connect_timeout(&https, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    });
    assert!(
        !plain.starts_with(b"HTTP/1.1 200"),
        "plain HTTP answered on the TLS port"
    );

    // metrics_listen: the same router, plain HTTP.
    let api = Api {
        pair: &pair,
        addr: metrics,
    };
    let r = api.get("/metrics", None);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("recorder_sessions_started_total 1"));
    assert_eq!(ids(&api.json("/api/v1/recordings")), [id.as_str()]);

    // A client that keeps its connection open does not hold up shutdown (the connections hold
    // the writer, which shutdown needs back).
    let idle =
        pair.in_sender(|| TcpStream::connect_timeout(&metrics, Duration::from_secs(5)).unwrap());
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
    drop(idle);
}

/// Chromium's command-line flags here: headless as root, and no background connections (this
/// machine's network refuses them).
const CHROMIUM_FLAGS: [&str; 11] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,1000",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Headless Chromium in the sender namespace, driven over WebDriver (chromedriver): each page
/// opens in a new browser session (empty sessionStorage, so a token given to one page is not
/// kept for the next), and its DOM is read once the console marks its view ready, that is
/// after its fetches and the player's media metadata.
struct Browser<'a> {
    pair: &'a VethPair,
    dir: PathBuf,
    driver: std::process::Child,
    addr: SocketAddr,
}

impl<'a> Browser<'a> {
    const PORT: u16 = 9515;
    /// Resolves when `#view` carries `data-ready`: the console sets it when a route finished.
    const WAIT_READY: &'static str = r#"
        const done = arguments[arguments.length - 1];
        const view = document.getElementById("view");
        const ready = () => view.dataset.ready === "true";
        if (ready()) { done(true); return; }
        new MutationObserver((_, o) => { if (ready()) { o.disconnect(); done(true); } })
            .observe(view, { attributes: true, attributeFilter: ["data-ready"] });
    "#;

    fn start(pair: &'a VethPair, dir: &Path) -> Self {
        let mut driver = VethPair::command(&pair.sender_ns, "chromedriver")
            .arg(format!("--port={}", Self::PORT))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run chromedriver (cargo xtask setup installs chromium-driver)");
        // It says so on stdout once it listens.
        let mut out = BufReader::new(driver.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "chromedriver exited before it listened");
            if line.contains("started successfully") {
                break;
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Self {
            pair,
            dir: dir.to_path_buf(),
            driver,
            addr: SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), Self::PORT),
        }
    }

    /// One WebDriver command; its `value`, or a panic with WebDriver's error.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = self.pair.in_sender(|| {
            let stream = TcpStream::connect(self.addr).expect("connect to chromedriver");
            stream
                .set_read_timeout(Some(Duration::from_secs(90)))
                .unwrap();
            exchange_body(
                stream,
                method,
                path,
                // chromedriver answers only requests for its own (local) host.
                &[
                    ("Host", &format!("localhost:{}", Self::PORT)),
                    ("Content-Type", "application/json"),
                ],
                body.as_bytes(),
            )
        });
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    /// Clicks `#pcap` and resolves with the bytes the console saved (its `data-bytes`), or
    /// with the error it showed.
    const SAVE_PCAP: &'static str = r#"
        const done = arguments[arguments.length - 1];
        const button = document.getElementById("pcap");
        const settled = () => button.dataset.bytes || button.dataset.error;
        new MutationObserver((_, o) => {
            if (settled()) {
                o.disconnect();
                done(button.dataset.bytes ? Number(button.dataset.bytes) : "error " + button.dataset.error);
            }
        }).observe(button, { attributes: true });
        button.click();
    "#;

    /// The DOM of `url` once the console's view is ready.
    fn dom(&self, url: &str) -> String {
        self.dom_after(url, None, |_| ()).0
    }

    /// The DOM of `url` once the console's view is ready and then `script` (asynchronous, in
    /// WebDriver's form) has run, with the script's result. `then` runs with the result while
    /// the browser is still open (a download in progress ends with it). Downloads go to
    /// `downloads`.
    fn dom_after(
        &self,
        url: &str,
        script: Option<&str>,
        then: impl FnOnce(&Value),
    ) -> (String, Value) {
        let profile = self.dir.join(format!("chromium-{}", rand::random::<u32>()));
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = serde_json::json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "timeouts": { "script": 30_000, "pageLoad": 30_000 },
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": args,
                "prefs": {
                    "download.default_directory": self.downloads().display().to_string(),
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let session = self.command("POST", "/session", Some(caps));
        let id = session["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        let s = format!("/session/{id}");
        // Headless Chromium saves no download unless told where to, over DevTools.
        self.command(
            "POST",
            &format!("{s}/goog/cdp/execute"),
            Some(serde_json::json!({
                "cmd": "Browser.setDownloadBehavior",
                "params": { "behavior": "allow", "downloadPath": self.downloads() },
            })),
        );
        self.command(
            "POST",
            &format!("{s}/url"),
            Some(serde_json::json!({ "url": url })),
        );
        let mut result = self.command(
            "POST",
            &format!("{s}/execute/async"),
            Some(serde_json::json!({ "script": Self::WAIT_READY, "args": [] })),
        );
        if let Some(script) = script {
            result = self.command(
                "POST",
                &format!("{s}/execute/async"),
                Some(serde_json::json!({ "script": script, "args": [] })),
            );
        }
        then(&result);
        let dom = self.command("GET", &format!("{s}/source"), None);
        self.command("DELETE", &s, None);
        (dom.as_str().expect("the page source").to_string(), result)
    }

    /// Where the browser saves downloads.
    fn downloads(&self) -> PathBuf {
        self.dir.join("downloads")
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The bytes of `file` once the browser has saved all `len` of them (it writes a
/// `.crdownload` and renames it, in a process of its own that sends no event to wait for).
fn wait_for_file(file: &Path, len: usize) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match std::fs::read(file) {
            Ok(bytes) if bytes.len() == len => return bytes,
            _ if std::time::Instant::now() > deadline => {
                panic!("{} not saved with {len} bytes", file.display())
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A PNG of `url` from Chromium's own `--screenshot` (the page is drawn, nothing is read).
fn screenshot(pair: &VethPair, dir: &Path, url: &str, png: &Path) {
    let out = VethPair::command(&pair.sender_ns, "chromium")
        .args(CHROMIUM_FLAGS)
        // Virtual time runs until the page's fetches are done.
        .arg("--virtual-time-budget=15000")
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("run chromium (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn console_in_headless_chromium_finds_and_plays_an_interaction() {
    let pair = VethPair::new("cons");
    let dir = scratch_dir("console");
    let daemon = start_daemon(&pair, &dir, Vec::new());
    let uuid = "CONSOLE0UUID000000000000000001";
    let (a, _) = finished_call(&pair, &daemon, uuid, "sip:+4930111@carrier.example");
    let (b, _) = finished_call(&pair, &daemon, uuid, "sip:+4930222@carrier.example");
    let api = Api {
        pair: &pair,
        addr: SocketAddr::new(IpAddr::V4(pair.recorder_v4), HTTP_PORT),
    };
    wait_listed(&api, "state=complete", 2);
    // The assets are served without a token (they hold no data), the API still wants one.
    let page = api.get("/", None);
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some());
    let base = format!("http://{}:{HTTP_PORT}/", pair.recorder_v4);
    let browser = Browser::start(&pair, &dir);

    // Search by CallUUID: both recordings listed, with the link to the interaction.
    let dom = browser.dom(&format!(
        "{base}#/search?call_uuid={uuid}&token={READ_TOKEN}"
    ));
    for id in [&a, &b] {
        assert!(
            dom.contains(&format!("data-recording=\"{id}\"")),
            "{id} listed:\n{dom}"
        );
    }
    assert!(
        dom.contains(&format!("href=\"#/interaction/{uuid}\"")),
        "{dom}"
    );
    // Without a token the page says so instead of listing anything.
    let dom = browser.dom(&format!("{base}#/search?call_uuid={uuid}"));
    assert!(dom.contains("data-error=\"401\""), "{dom}");

    // The interaction: one lane per segment with its site, the gap between them, and the
    // player's audio (the stitched WAV) loaded.
    let url = format!("{base}#/interaction/{uuid}?token={READ_TOKEN}");
    let dom = browser.dom(&url);
    let lanes = dom.matches("class=\"segment\"").count();
    assert_eq!(lanes, 2, "{dom}");
    for id in [&a, &b] {
        assert!(
            dom.contains(&format!("data-segment=\"{id}\" data-host=\"blue\"")),
            "{id}:\n{dom}"
        );
    }
    assert_eq!(dom.matches("data-gap").count(), 1, "{dom}");
    assert!(dom.contains("data-mark=\"joined\""), "{dom}");
    let player = dom
        .split("<audio")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .unwrap_or_else(|| panic!("no audio element:\n{dom}"));
    assert!(player.contains("data-loaded=\"true\""), "{player}");
    let secs: f64 = player
        .split("data-duration=\"")
        .nth(1)
        .and_then(|d| d.split('"').next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("{player}"));
    assert!(secs > 2.0, "two segments of 1 s and the gap: {secs} s");

    // A recording's page: its participants and one waveform per channel.
    let dom = browser.dom(&format!("{base}#/recording/{a}?token={READ_TOKEN}"));
    assert_eq!(dom.matches("class=\"wave\"").count(), 2, "{dom}");
    assert!(dom.contains("Customer") && dom.contains("Agent"), "{dom}");
    // Its pcap, fetched with the token (a link could not send it) and saved by the browser:
    // the file's bytes, and the download audited under the token's name.
    let pcap = std::fs::read(daemon.spool.join(&a).join("recording.pcap")).unwrap();
    let file = browser.downloads().join(format!("{a}.pcap"));
    browser.dom_after(
        &format!("{base}#/recording/{a}?token={READ_TOKEN}"),
        Some(Browser::SAVE_PCAP),
        |saved| {
            assert_eq!(
                *saved,
                serde_json::json!(pcap.len()),
                "the console's download"
            );
            let got = wait_for_file(&file, pcap.len());
            assert!(got == pcap, "the saved pcap is the recording's");
        },
    );
    let log = daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("audit: recording downloaded")
                && l.contains(&a)
                && l.contains("pcap")
                && l.contains("qa")),
        "{log}"
    );

    let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-interaction.png");
    let _ = std::fs::remove_file(&png);
    screenshot(&pair, &dir, &url, &png);
    let bytes = std::fs::read(&png).expect("screenshot saved");
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
}

/// Two sites, blue and purple, sharing one PostgreSQL index, their recorder namespaces joined by
/// a link of their own (10.232.0.1 blue, 10.232.0.2 purple) over which each reaches the other's
/// public URL. One interaction is recorded first at blue, until a REFER hands the call to
/// purple, then at purple.
#[test]
fn two_sites_one_interaction_listed_and_stitched_from_either_host() {
    let pg = Postgres::start();
    let blue_pair = VethPair::new("hblu");
    let purple_pair = VethPair::new("hpur");
    let n: u16 = rand::random();
    let (blue_if, purple_if) = (format!("hlb{n}"), format!("hlp{n}"));
    ip(&[
        "link",
        "add",
        &blue_if,
        "netns",
        &blue_pair.recorder_ns,
        "type",
        "veth",
        "peer",
        "name",
        &purple_if,
        "netns",
        &purple_pair.recorder_ns,
    ]);
    for (ns, dev, addr) in [
        (&blue_pair.recorder_ns, &blue_if, "10.232.0.1/24"),
        (&purple_pair.recorder_ns, &purple_if, "10.232.0.2/24"),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    let any = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT));
    let site = |pair: &VethPair, name: &str, me: &str| {
        let dir = scratch_dir(name);
        let daemon = start_site(
            pair,
            &dir,
            name,
            any,
            [
                "--index-backend",
                "postgres",
                "--index-url",
                &pg.url(),
                "--public-url",
                &format!("http://{me}:{HTTP_PORT}"),
            ]
            .map(String::from)
            .to_vec(),
        );
        (daemon, dir)
    };
    let (blue, blue_dir) = site(&blue_pair, "blue", "10.232.0.1");
    let (purple, _purple_dir) = site(&purple_pair, "purple", "10.232.0.2");
    let at = |pair| Api {
        pair,
        addr: SocketAddr::new(IpAddr::V4(blue_pair.recorder_v4), HTTP_PORT),
    };
    let (blue_api, purple_api) = (at(&blue_pair), at(&purple_pair));

    // A REFER handoff: blue's SIP Server leaves the path, so blue's recording ends with a BYE
    // that says why; purple records the transferred call as a new session (its own Call-ID)
    // of the same interaction.
    let uuid = "TWOSITE0UUID000000000000000001";
    let customer = "sip:+4930111@carrier.example";
    let mut handed_off = call(&blue_pair, &blue, uuid, customer, 50);
    let refer = "Reason: SIP;cause=200;text=\"REFER\"".to_string();
    assert_eq!(handed_off.bye(&[refer]).status, 200);
    let (dir_a, meta_a) = blue.metadata_for(&handed_off.call_id, true);
    assert_eq!(meta_a["state"], "complete");
    let a = dir_a.file_name().unwrap().to_string_lossy().to_string();
    let (b, meta_b) = finished_call(&purple_pair, &purple, uuid, customer);
    assert_ne!(
        meta_a["sip_call_id"], meta_b["sip_call_id"],
        "{meta_a}\n{meta_b}"
    );
    wait_listed(&blue_api, &format!("call_uuid={uuid}&state=complete"), 2);

    // Either host lists both segments, with their hosts and where each host is reached.
    let path = format!("/api/v1/interactions/{uuid}");
    let from_blue = blue_api.json(&path);
    let from_purple = purple_api.json(&path);
    let summary = |v: &Value| -> Vec<(String, String, String)> {
        v["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
                (text("id"), text("host"), text("public_url"))
            })
            .collect()
    };
    let want = vec![
        (
            a.clone(),
            "blue".to_string(),
            format!("http://10.232.0.1:{HTTP_PORT}"),
        ),
        (
            b.clone(),
            "purple".to_string(),
            format!("http://10.232.0.2:{HTTP_PORT}"),
        ),
    ];
    assert_eq!(summary(&from_blue), want, "{from_blue}");
    assert_eq!(summary(&from_purple), want, "{from_purple}");
    assert_eq!(from_blue["gaps"].as_array().unwrap().len(), 1);
    // The handoff is an event of the interaction on either host: blue's segment ended by the
    // REFER's BYE.
    for view in [&from_blue, &from_purple] {
        let ends: Vec<(String, String, String)> = view["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "ended")
            .map(|e| {
                let text = |k: &str| e[k].as_str().unwrap_or("-").to_string();
                (text("recording"), text("reason"), text("detail"))
            })
            .collect();
        assert_eq!(ends.len(), 2, "{view}");
        assert_eq!(
            (ends[0].0.as_str(), ends[0].1.as_str()),
            (a.as_str(), "bye")
        );
        assert!(ends[0].2.contains("REFER"), "{view}");
        assert_eq!(ends[1].0, b, "{view}");
        assert!(!ends[1].2.contains("REFER"), "{view}");
    }
    // A host has the files of its own segments only, and says where the others are.
    let elsewhere = blue_api
        .get(&format!("/api/v1/recordings/{b}/audio"), Some(READ_TOKEN))
        .error(404);
    assert!(elsewhere.contains("purple"), "{elsewhere}");

    // The stitched audio from blue: its own segment at 0, purple's (fetched from purple with
    // the caller's token) at its offset, silence between. Then the same from purple.
    let mono_a = mono(&blue.spool.join(&a).join("recording.wav"));
    let mono_b = mono(&purple.spool.join(&b).join("recording.wav"));
    let offset = (start_ms(&meta_b) - start_ms(&meta_a)) as usize * 8;
    assert!(mono_a.len() <= offset && mono_a.iter().any(|&s| s != 0));
    for api in [&blue_api, &purple_api] {
        let r = api.get(&format!("{path}/audio"), Some(READ_TOKEN));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let stitched: Vec<i16> = r.body[44..]
            .chunks_exact(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]))
            .collect();
        assert_eq!(stitched.len(), offset + mono_b.len());
        assert!(stitched[..mono_a.len()] == mono_a[..], "blue's tones first");
        assert!(
            stitched[mono_a.len()..offset].iter().all(|&s| s == 0),
            "silence"
        );
        assert!(stitched[offset..] == mono_b[..], "then purple's");
    }
    // Purple authorised and audited blue's fetch under the caller's token, from blue's address.
    let log = purple.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("audit: recording downloaded")
                && l.contains(&b)
                && l.contains("qa")
                && l.contains("10.232.0.1")),
        "{log}"
    );
    // The console at blue: one lane per segment, on two sites, and the stitched audio loads.
    let url = format!(
        "http://{}:{HTTP_PORT}/#/interaction/{uuid}?token={READ_TOKEN}",
        blue_pair.recorder_v4
    );
    let dom = Browser::start(&blue_pair, &blue_dir).dom(&url);
    assert_eq!(dom.matches("class=\"segment\"").count(), 2, "{dom}");
    for (id, host) in [(&a, "blue"), (&b, "purple")] {
        assert!(
            dom.contains(&format!("data-segment=\"{id}\" data-host=\"{host}\"")),
            "{dom}"
        );
    }
    assert!(dom.contains("on 2 site(s)"), "{dom}");
    assert!(dom.contains("data-loaded=\"true\""), "{dom}");
    let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-two-sites.png");
    screenshot(&blue_pair, &blue_dir, &url, &png);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    // Without a token there is nothing to forward: 401 at the first host already.
    blue_api.get(&format!("{path}/audio"), None).error(401);
    drop((blue, purple));
}
