//! Operating the recorder: the real `recorder` CLI against a running daemon in a network
//! namespace (every read command in text and JSON, operator stop), bad configuration rejected at
//! start, and SIGTERM finishing live recordings.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{
        cli, cli_json, cli_text, recorder_bin, scratch_dir, tshark_count, Daemon, DaemonOptions,
    },
    net::VethPair,
    rtp::RtpStream,
};

const UUID: &str = "OPS0CALL0UUID0000000000000000001";

fn participants() -> Vec<MetaParticipant> {
    vec![
        MetaParticipant {
            id: "p-customer".into(),
            aor: "sip:+4930555@carrier.example".into(),
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

/// A daemon with one answered two-stream call on which `packets` RTP packets per stream were
/// sent.
struct LiveCall {
    pair: VethPair,
    daemon: Daemon,
    client: SipClient,
    ports: Vec<u16>,
}

impl LiveCall {
    fn start(tag: &str, options: DaemonOptions) -> Self {
        let pair = VethPair::new(tag);
        let daemon = Daemon::start(&pair, options);
        let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
        let offered: Vec<OfferedStream> = [(31000, "1", 0), (31002, "2", 8)]
            .into_iter()
            .map(|(port, label, pt)| OfferedStream {
                label: label.into(),
                port,
                pt,
                direction: "sendonly",
                connection: None,
            })
            .collect();
        let sdp = offer_sdp(IpAddr::V4(pair.sender_v4), 1, &offered);
        let xml = metadata_xml(
            Some(UUID),
            &["1", "2"],
            &participants(),
            "2026-11-24T10:00:00Z",
        );
        let (ctype, body) = siprec_body(&sdp, Some(&xml));
        let reply = client.invite(Some((&ctype, &body)), &[]);
        assert_eq!(reply.status, 200, "{}", reply.raw);
        let ports = reply.answer_ports();
        assert_eq!(ports.len(), 2);
        // The writer has created the recording (its counters say so from here on).
        daemon.metadata_for(&client.call_id, false);
        Self {
            pair,
            daemon,
            client,
            ports,
        }
    }

    fn send(&self, packets: usize) {
        self.send_with_gap(packets, 0);
    }

    /// Sends `packets` per stream; the first stream skips `gap` sequence numbers halfway (loss).
    fn send_with_gap(&self, packets: usize, gap: u16) {
        for (i, port) in self.ports.iter().enumerate() {
            let socket = self
                .pair
                .in_sender(|| UdpSocket::bind((self.pair.sender_v4, 0)).unwrap());
            let mut stream = RtpStream::new(
                socket,
                SocketAddr::new(IpAddr::V4(self.pair.recorder_v4), *port),
                0x5000 + i as u32,
                if i == 0 { 0 } else { 8 },
            );
            for n in 0..packets {
                if i == 0 && n == packets / 2 {
                    stream.skip(gap);
                }
                stream.send_tone_packet(440.0 + 100.0 * i as f64);
            }
        }
    }

    fn control(&self) -> &Path {
        &self.daemon.control
    }

    /// Waits until the kernel counted `packets` on the call's flows (seen through `flows`).
    fn wait_flow_packets(&self, packets: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let flows = cli_json(self.control(), &["flows"]);
            let total: u64 = flows
                .as_array()
                .expect("flows is an array")
                .iter()
                .map(|f| f["packets"].as_u64().unwrap_or(0))
                .sum();
            if total >= packets {
                return flows;
            }
            assert!(
                Instant::now() < deadline,
                "flows never counted {packets} packets: {flows}"
            );
            std::thread::sleep(Duration::from_millis(20)); // polling counters of another process
        }
    }
}

fn xdp_attached(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .expect("ip link show");
    assert!(out.status.success(), "ip -n {ns} link show {dev} failed");
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

#[test]
fn every_read_command_in_text_and_json_and_operator_stop() {
    let mut call = LiveCall::start("cli", DaemonOptions::default());
    call.send_with_gap(50, 3);
    let flows = call.wait_flow_packets(100);
    let control = call.control().to_path_buf();

    // flows: one per RTP and RTCP port, our two RTP ports among them, 50 packets each.
    let flows = flows.as_array().unwrap();
    for port in &call.ports {
        let local = format!("{}:{port}", call.pair.recorder_v4);
        let flow = flows
            .iter()
            .find(|f| f["local"] == local.as_str())
            .unwrap_or_else(|| panic!("flow {local} in {flows:?}"));
        assert_eq!(flow["packets"], 50, "{flow}");
        assert_eq!(flow["in_kernel"], true);
    }
    let text = cli_text(&control, &["flows"]);
    assert!(text.starts_with("FLOW"), "{text}");
    for port in &call.ports {
        assert!(text.contains(&format!(":{port}")), "{text}");
    }

    // status
    let status = cli_json(&control, &["status"]);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["interfaces"][0]["name"], call.pair.recorder_if);
    assert!(status["interfaces"][0]["mode"].is_string());
    assert_eq!(status["sip"]["sessions_active"], 1);
    assert_eq!(status["sip"]["siprec"]["sessions_started"], 1);
    assert!(status["sip"]["endpoint"]["requests"]["INVITE"].as_u64() >= Some(1));
    assert!(status["xdp"]["captured"].as_u64() >= Some(100), "{status}");
    assert!(
        status["writer"]["packets_in"].is_u64(),
        "writer stats are JSON: {status}"
    );
    assert_eq!(status["writer"]["active_recordings"], 1);
    assert!(status["spool"]["free_bytes"].as_u64() > Some(0));
    let text = cli_text(&control, &["status"]);
    assert!(
        text.starts_with(&format!("recorder {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains(&format!("interface {}", call.pair.recorder_if)));
    assert!(text.contains("sessions active 1"), "{text}");

    // sessions
    let sessions = cli_json(&control, &["sessions"]);
    let sessions = sessions.as_array().expect("sessions is an array");
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    let id = session["id"].as_str().expect("session id").to_string();
    assert_eq!(session["call_ids"]["call_uuid"], UUID);
    assert_eq!(session["call_ids"]["sip_call_id"], call.client.call_id);
    assert_eq!(session["streams"].as_array().unwrap().len(), 2);
    assert_eq!(session["participants"].as_array().unwrap().len(), 2);
    assert_eq!(session["packets"], 100, "{session}");
    assert!(session["duration_secs"].is_u64());
    assert!(session["started_at"].as_str().unwrap().ends_with('Z'));
    // Sequence loss comes from the writer's reception statistics (republished every 250 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli_json(&control, &["sessions"])[0]["lost"] != 3 {
        assert!(Instant::now() < deadline, "loss of 3 never reported");
        std::thread::sleep(Duration::from_millis(50)); // polling the writer's flush
    }
    let text = cli_text(&control, &["sessions"]);
    assert!(text.lines().next().unwrap().contains("LOST"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} in {text}"));
    assert!(
        row.contains(UUID) && row.contains("Customer, Agent"),
        "{row}"
    );

    // stop: BYE to the client, reason operator.
    let unknown = cli(&control, &["stop", "no-such-recording"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-recording"));
    let text = cli_text(&control, &["stop", &id]);
    assert_eq!(text, format!("stopped {id}\n"));
    let bye = call
        .client
        .recv_request(Duration::from_secs(5))
        .expect("BYE from the recorder");
    assert_eq!(bye.method, rsip::Method::Bye);
    let (dir, meta) = call.daemon.metadata_for(&call.client.call_id, true);
    assert_eq!(meta["id"], id.as_str());
    assert_eq!(meta["state"], "complete");
    assert_eq!(meta["end_reason"], "operator");
    assert_eq!(tshark_count(&dir.join("recording.pcap"), Some("udp")), 100);
    let sessions = cli_json(&control, &["sessions"]);
    assert_eq!(sessions.as_array().unwrap().len(), 0);
    assert!(cli_text(&control, &["sessions"]).contains("(none)"));

    // recordings: all, then filtered by CallUUID (a miss and a hit) and by AOR.
    let all = cli_json(&control, &["recordings"]);
    let all = all.as_array().expect("recordings is an array");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["id"], id.as_str());
    assert_eq!(all[0]["state"], "complete");
    assert_eq!(all[0]["end_reason"], "operator");
    assert_eq!(all[0]["call_uuid"], UUID);
    let hit = cli_json(&control, &["recordings", "--call-uuid", UUID]);
    assert_eq!(hit.as_array().unwrap().len(), 1);
    let miss = cli_json(&control, &["recordings", "--call-uuid", "nope"]);
    assert_eq!(miss.as_array().unwrap().len(), 0);
    let by_aor = cli_json(&control, &["recordings", "--aor", "sip:7001@cc.example"]);
    assert_eq!(by_aor.as_array().unwrap().len(), 1);
    let text = cli_text(&control, &["recordings"]);
    let row = text
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} in {text}"));
    assert!(
        row.contains("complete") && row.contains("operator"),
        "{row}"
    );
    let since = cli_json(&control, &["recordings", "--since", "2000-01-01T00:00:00Z"]);
    assert_eq!(since.as_array().unwrap().len(), 1);
    let future = cli_json(&control, &["recordings", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(future.as_array().unwrap().len(), 0);
    let bad_since = cli(&control, &["recordings", "--since", "yesterday"]);
    assert_eq!(bad_since.status.code(), Some(1));

    // show
    let mut shown = cli_json(&control, &["show", &id]);
    // `show` adds the interaction's timeline (every recording of its CallUUID) to metadata.json.
    let timeline = shown
        .as_object_mut()
        .unwrap()
        .remove("timeline")
        .expect("show includes the timeline");
    assert_eq!(timeline[0]["id"], id.as_str());
    assert_eq!(shown, meta, "show prints metadata.json");
    let text = cli_text(&control, &["show", &id]);
    assert!(text.contains(&format!("id           {id}")), "{text}");
    assert!(text.contains("state        complete"), "{text}");
    assert!(text.contains("end_reason   operator"), "{text}");
    assert!(text.contains("participant  Customer <sip:+4930555@carrier.example>"));
    assert_eq!(text.matches("\nstream ").count(), 2, "{text}");
    assert!(text.contains("packets 50 lost 3"), "{text}");
    assert_eq!(cli(&control, &["show", "../etc"]).status.code(), Some(1));

    // A daemon that is not there: exit code 3.
    let gone = cli(&call.daemon.dir.join("nothing.sock"), &["status"]);
    assert_eq!(gone.status.code(), Some(3));
}

/// `recorder run --config <file>` with `toml` appended to a valid configuration; returns the exit
/// code and stderr.
fn run_with_config(toml: &str) -> (Option<i32>, String) {
    let dir = scratch_dir("badconf");
    let path = dir.join("recorder.toml");
    let base = format!(
        "interfaces = [\"lo\"]\nmedia_address = \"127.0.0.1\"\nspool = \"{}\"\ncontrol_socket = \"{}\"\n",
        dir.join("spool").display(),
        dir.join("control.sock").display()
    );
    std::fs::write(&path, format!("{base}{toml}")).unwrap();
    let mut child = Command::new(recorder_bin())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run recorder");
    // A configuration wrongly accepted would start a daemon: never wait for it forever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("recorder accepted the configuration:\n{toml}");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a child's exit
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_is_rejected_at_start_naming_the_key() {
    // Unknown key.
    let (code, err) = run_with_config("snap_len = 100\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("snap_len"), "{err}");
    // A value of the wrong form.
    let (code, err) = run_with_config("rtp_ports = \"30000-20000\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rtp_ports"), "{err}");
    // A value of the right type that validation refuses.
    let (code, err) = run_with_config("snaplen = 9000\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("snaplen"), "{err}");
    // A wrong type.
    let (code, err) = run_with_config("max_sessions = \"many\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("max_sessions"), "{err}");
}

#[test]
fn sigterm_finishes_live_recordings_and_detaches_xdp() {
    let mut call = LiveCall::start("term", DaemonOptions::default());
    call.send(30);
    call.wait_flow_packets(60);
    assert!(xdp_attached(&call.pair.recorder_ns, &call.pair.recorder_if));

    assert_eq!(call.daemon.stop(), Some(0), "{}", call.daemon.log_text());
    let bye = call
        .client
        .recv_request(Duration::from_secs(5))
        .expect("BYE from the recorder at shutdown");
    assert_eq!(bye.method, rsip::Method::Bye);
    let (dir, meta) = call.daemon.metadata_for(&call.client.call_id, true);
    assert_eq!(meta["state"], "complete");
    assert_eq!(meta["end_reason"], "shutdown");
    let log = call.daemon.log_text();
    let id = meta["id"].as_str().unwrap();
    for event in ["recording started", "recording ended"] {
        assert!(
            log.lines().any(|l| l.contains("recorder::daemon")
                && l.contains(event)
                && l.contains(id)
                && l.contains(UUID)),
            "one {event:?} line with the id and CallUUID:\n{log}"
        );
    }
    assert_eq!(tshark_count(&dir.join("recording.pcap"), Some("udp")), 60);
    assert!(
        !xdp_attached(&call.pair.recorder_ns, &call.pair.recorder_if),
        "XDP still attached after exit"
    );
    assert!(!call.daemon.control.exists(), "control socket removed");
}

/// `GET /metrics` from the sender namespace; returns the body after checking the response head.
fn scrape(pair: &VethPair, addr: SocketAddr) -> String {
    let (head, body) = pair.get_metrics(addr);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(head.contains(&format!("content-length: {}", body.len())));
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    body.to_string()
}

/// Samples of the text exposition format as `name{labels}` -> value. Every sample must belong
/// to a family announced by a `# TYPE` line.
fn parse_exposition(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            families.push(parts.next().unwrap().to_string());
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("sample with a value");
        let name = key.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| name == f
                || ["_bucket", "_sum", "_count", "_total"]
                    .iter()
                    .any(|s| name == format!("{f}{s}"))),
            "sample {name} without a TYPE line"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("{line}: value {e}"));
        assert!(
            samples.insert(key.to_string(), value).is_none(),
            "duplicate {key}"
        );
    }
    samples
}

fn metric(m: &std::collections::BTreeMap<String, f64>, key: &str) -> u64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from {m:?}")) as u64
}

#[test]
fn metrics_endpoint_parses_and_matches_the_cli() {
    let metrics_addr = SocketAddr::new(IpAddr::V4("10.231.0.2".parse().unwrap()), 9464);
    let mut call = LiveCall::start(
        "metr",
        DaemonOptions {
            extra: vec!["--metrics-listen".into(), metrics_addr.to_string()],
            ..Default::default()
        },
    );
    assert_eq!(IpAddr::V4(call.pair.recorder_v4), metrics_addr.ip());
    call.send(40);
    call.wait_flow_packets(80);

    // During the call.
    let m = parse_exposition(&scrape(&call.pair, metrics_addr));
    let status = cli_json(call.control(), &["status"]);
    assert_eq!(metric(&m, "recorder_sessions_active"), 1);
    assert_eq!(status["sip"]["sessions_active"], 1);
    assert_eq!(metric(&m, "recorder_sessions_started_total"), 1);

    // After the call, when nothing moves any more, every counter matches the CLI's.
    assert_eq!(call.client.bye(&[]).status, 200);
    let (dir, meta) = call.daemon.metadata_for(&call.client.call_id, true);
    assert_eq!(meta["end_reason"], "bye");
    let m = parse_exposition(&scrape(&call.pair, metrics_addr));
    let status = cli_json(call.control(), &["status"]);
    let xdp = &status["xdp"];
    assert_eq!(
        metric(&m, "recorder_xdp_packets_captured_total"),
        xdp["captured"].as_u64().unwrap()
    );
    assert_eq!(metric(&m, "recorder_xdp_packets_captured_total"), 80);
    assert_eq!(
        metric(&m, "recorder_xdp_packets_matched_total"),
        xdp["matched"].as_u64().unwrap()
    );
    for reason in ["ring_full", "copy_failed"] {
        assert_eq!(
            metric(
                &m,
                &format!("recorder_xdp_packets_dropped_total{{reason=\"{reason}\"}}")
            ),
            xdp[reason].as_u64().unwrap()
        );
    }
    assert_eq!(metric(&m, "recorder_sessions_active"), 0);
    assert_eq!(metric(&m, "recorder_sessions_started_total"), 1);
    assert_eq!(
        metric(&m, "recorder_sessions_ended_total{reason=\"bye\"}"),
        status["sip"]["siprec"]["sessions_ended"]["bye"]
            .as_u64()
            .unwrap()
    );
    let endpoint = &status["sip"]["endpoint"];
    let requests = endpoint["requests"].as_object().unwrap();
    assert!(requests.contains_key("INVITE") && requests.contains_key("BYE"));
    for (method, n) in requests {
        assert_eq!(
            metric(
                &m,
                &format!("recorder_sip_requests_total{{method=\"{method}\"}}")
            ),
            n.as_u64().unwrap(),
            "{method}"
        );
    }
    let responses = endpoint["responses_sent"].as_object().unwrap();
    assert!(responses.contains_key("200"));
    for (code, n) in responses {
        assert_eq!(
            metric(
                &m,
                &format!("recorder_sip_responses_sent_total{{code=\"{code}\"}}")
            ),
            n.as_u64().unwrap(),
            "{code}"
        );
    }
    let writer = &status["writer"];
    let bytes = metric(&m, "recorder_disk_bytes_written_total");
    assert_eq!(bytes, writer["bytes_written"].as_u64().unwrap());
    // At least the pcap records (16-byte header + frame each) of the 80 packets.
    let pcap_len = std::fs::metadata(dir.join("recording.pcap")).unwrap().len();
    assert!(bytes >= pcap_len - 24, "{bytes} < pcap {pcap_len}");
    assert_eq!(
        metric(&m, "recorder_ring_records_consumed_total"),
        writer["packets_in"].as_u64().unwrap()
    );
    assert_eq!(metric(&m, "recorder_ring_backlog_records"), 0);
    assert_eq!(metric(&m, "recorder_write_latency_seconds_count"), 80);
    assert_eq!(
        metric(&m, "recorder_write_latency_seconds_bucket{le=\"+Inf\"}"),
        writer["write_latency"]["count"].as_u64().unwrap()
    );
}

/// Waits until the daemon's log has `needle` at least `count` times.
fn wait_log(daemon: &Daemon, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log_text();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never logged {count} times:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling another process's log
    }
}

#[test]
fn sighup_reloads_acl_session_limit_and_drain_and_names_what_needs_a_restart() {
    let pair = VethPair::new("hup");
    let dir = scratch_dir("hup");
    let config = dir.join("recorder.toml");
    // The sender (10.231.0.1) is outside the ACL at first.
    std::fs::write(
        &config,
        "acl = [\"192.0.2.0/24\"]\nmax_sessions = 10\nsnaplen = 1500\n",
    )
    .unwrap();
    let mut daemon = Daemon::start_with_spool(
        &pair,
        DaemonOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
        dir.clone(),
        dir.join("spool"),
    );
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly("1", 31000, 0)],
    );
    let invite = |daemon: &Daemon| {
        let mut c = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
        let status = c
            .invite(Some(("application/sdp", sdp.as_bytes())), &[])
            .status;
        (status, c)
    };
    assert_eq!(invite(&daemon).0, 403, "ACL from the file");

    // Open the ACL, allow one session, change a key that needs a restart.
    std::fs::write(
        &config,
        "acl = [\"10.231.0.0/24\"]\nmax_sessions = 1\nsnaplen = 1000\n\
         log_level = \"warn,recorder::reload=info\"\n",
    )
    .unwrap();
    let debug_before = daemon.log_text().matches("DEBUG").count();
    assert!(debug_before > 0, "started with --log-level debug");
    daemon.signal(libc::SIGHUP);
    let log = wait_log(&daemon, "configuration reloaded", 1);
    assert!(
        log.lines()
            .any(|l| l.contains("need a restart") && l.contains("snaplen")),
        "{log}"
    );
    let (status, mut first) = invite(&daemon);
    assert_eq!(status, 200, "ACL reloaded");
    assert_eq!(invite(&daemon).0, 503, "session limit reloaded");
    let log = daemon.log_text();
    let after = &log[log.find("configuration reloaded").unwrap()..];
    assert!(
        !after.contains("DEBUG") && !after.contains("recording started"),
        "log level reloaded to warn:\n{after}"
    );
    let status = cli_json(&daemon.control, &["status"]);
    assert_eq!(
        status["sip"]["siprec"]["rejections"]["403 acl"], 1,
        "{status}"
    );

    // A bad file is refused; the running configuration stays.
    std::fs::write(&config, "max_sessions = 0\n").unwrap();
    daemon.signal(libc::SIGHUP);
    wait_log(&daemon, "configuration not reloaded", 1);
    assert_eq!(invite(&daemon).0, 503, "limit of 1 still in force");

    // `drain = true` in the file drains on reload: OPTIONS and new INVITEs get 503, the live
    // call still ends normally; `drain = false` takes sessions again.
    let reload = |text: &str, count: usize| {
        std::fs::write(&config, text).unwrap();
        daemon.signal(libc::SIGHUP);
        wait_log(&daemon, "configuration reloaded", count);
    };
    let options = |daemon: &Daemon| {
        let mut c = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
        c.non_invite("OPTIONS", None, &[]).status
    };
    reload(
        "acl = [\"10.231.0.0/24\"]\nmax_sessions = 10\ndrain = true\n",
        2,
    );
    assert_eq!(options(&daemon), 503, "draining after the reload");
    assert_eq!(invite(&daemon).0, 503, "no new session while draining");
    assert!(cli_text(&daemon.control, &["status"]).contains("draining"));
    let status = cli_json(&daemon.control, &["status"]);
    assert_eq!(status["sip"]["draining"], true, "{status}");
    assert_eq!(
        status["sip"]["siprec"]["rejections"]["503 draining"], 1,
        "{status}"
    );
    assert_eq!(first.bye(&[]).status, 200, "the live call ends as usual");
    reload(
        "acl = [\"10.231.0.0/24\"]\nmax_sessions = 10\ndrain = false\n",
        3,
    );
    assert_eq!(options(&daemon), 200);
    assert_eq!(invite(&daemon).0, 200, "the daemon survived every SIGHUP");
    assert_eq!(daemon.stop(), Some(0));
}

/// The capabilities the systemd unit grants (`AmbientCapabilities=`), as setpriv wants them.
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/recorder.service"),
    )
    .expect("packaging/recorder.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities in the unit");
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    assert_eq!(line, bounding, "ambient and bounding sets agree");
    line.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn runs_unprivileged_with_the_capabilities_of_the_systemd_unit() {
    let caps = unit_capabilities();
    let pair = VethPair::new("caps");
    let dir = scratch_dir("caps");
    let spool = dir.join("spool");
    let run = dir.join("run");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    for d in [&dir, &spool, &run] {
        // SAFETY: chown(2) on paths we created; 65534 is nobody/nogroup.
        let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    }
    // What the unit's ExecStartPre does: a pin dir the service user owns.
    let pin_dir = tests::net::daemon_bpffs().join(dir.file_name().unwrap());
    std::fs::create_dir_all(&pin_dir).unwrap();
    let c = std::ffi::CString::new(pin_dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: chown(2) on a directory we created.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    struct RemovePins(std::path::PathBuf);
    impl Drop for RemovePins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove_pins = RemovePins(pin_dir.clone());
    let control = run.join("control.sock");
    let log = std::fs::File::create(dir.join("recorder.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pair.recorder_ns, "setpriv"])
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--no-new-privs",
        ])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg(recorder_bin())
        .args(["run", "--interface", &pair.recorder_if])
        .args(["--sip-listen", &format!("{}:5060", pair.recorder_v4)])
        .args(["--media-address", &pair.recorder_v4.to_string()])
        .arg("--spool")
        .arg(&spool)
        .arg("--control-socket")
        .arg(&control)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .stderr(Stdio::from(log.try_clone().unwrap()))
        .stdout(Stdio::from(log))
        .spawn()
        .expect("setpriv (util-linux)");
    let log_text = || std::fs::read_to_string(dir.join("recorder.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("recorder exited ({exit}) with caps {caps}:\n{}", log_text());
        }
        let out = cli(&control, &["status", "--json"]);
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(50)); // polling another process's start
    };
    assert_eq!(status["interfaces"][0]["name"], pair.recorder_if);
    assert!(xdp_attached(&pair.recorder_ns, &pair.recorder_if));
    let pinned = |name: &str| {
        std::fs::read_dir(&pin_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|layout| layout.path().join(name).exists())
    };
    assert!(
        pinned("FLOWS") && pinned(&format!("link-{}", pair.recorder_if)),
        "the service user pins the capture:\n{}",
        log_text()
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.uid(), 65534, "socket owned by the service user");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // SAFETY: kill(2) on our child (ip netns exec and setpriv exec the recorder in place).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20)); // polling a child's exit
    };
    assert_eq!(exit.code(), Some(0), "{}", log_text());
    assert!(!xdp_attached(&pair.recorder_ns, &pair.recorder_if));
    assert!(!pinned("FLOWS"), "a clean exit unpins");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_carry_the_session_fields() {
    let mut call = LiveCall::start(
        "json",
        DaemonOptions {
            extra: vec!["--log-format".into(), "json".into()],
            ..Default::default()
        },
    );
    call.send(10);
    assert_eq!(call.client.bye(&[]).status, 200);
    let (_, meta) = call.daemon.metadata_for(&call.client.call_id, true);
    assert_eq!(call.daemon.stop(), Some(0));
    let log = call.daemon.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for message in ["recording started", "recording ended"] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == message && l["target"] == "recorder::daemon")
            .unwrap_or_else(|| panic!("{message:?} in {log}"));
        assert_eq!(line["fields"]["recording"], meta["id"], "{line}");
        assert_eq!(line["fields"]["call_uuid"], UUID, "{line}");
    }
}

/// Counts the open descriptors of a process.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[test]
fn new_sessions_get_503_while_file_descriptors_run_out() {
    let pair = VethPair::new("fds");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let pid = daemon.child.as_ref().unwrap().id();
    let invite = |n: u16| {
        let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
        let sdp = offer_sdp(
            IpAddr::V4(pair.sender_v4),
            1,
            &[OfferedStream::sendonly("1", 31000 + 2 * n, 0)],
        );
        let reply = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
        (reply, client)
    };
    // The soft limit (the hard one cannot be raised again) set just under the reserve of 256
    // free descriptors the daemon keeps for sessions.
    let set_soft_limit = |free: u64| {
        let soft = open_fds(pid) + free;
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={soft}:"))
            .status()
            .expect("prlimit (util-linux)");
        assert!(status.success());
    };
    let (live, mut live_client) = invite(0);
    assert_eq!(live.status, 200, "{}", live.raw);
    set_soft_limit(200);
    wait_log(&daemon, "file descriptors nearly exhausted", 1);
    let (refused, _) = invite(1);
    assert_eq!(refused.status, 503, "{}", refused.raw);
    assert!(refused.header("Retry-After").is_some());
    // A live session's BYE still goes through.
    assert_eq!(live_client.bye(&[]).status, 200);

    set_soft_limit(1000);
    wait_log(&daemon, "accepting new sessions again", 1);
    let (accepted, mut client) = invite(2);
    assert_eq!(accepted.status, 200, "{}", accepted.raw);
    assert_eq!(client.bye(&[]).status, 200);
}
