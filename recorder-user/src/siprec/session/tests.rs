//! Tests of the recording sessions: the harness and the INVITE answer path.

use std::sync::{Arc, Mutex};

use super::*;
use crate::flow::{FlowError, MemoryFlows};

/// MemoryFlows plus packet counters the tests set, for the idle timeout.
#[derive(Default)]
pub(super) struct TestFlows {
    pub(super) table: MemoryFlows,
    pub(super) packets: HashMap<u64, u64>,
    /// Refuse to pin anything (a table that fails).
    pub(super) refuse: bool,
}

impl FlowControl for TestFlows {
    fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError> {
        if self.refuse {
            return Err(FlowError::NotFound(spec.local));
        }
        self.table.insert(spec)
    }
    fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError> {
        if self.refuse {
            return Err(FlowError::NotFound(old_local));
        }
        self.table.rewrite(old_local, new)
    }
    fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError> {
        self.table.remove(local)
    }
    fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
        self.table.lookup(local)
    }
    fn packets(&self, flow_id: u64) -> u64 {
        self.packets.get(&flow_id).copied().unwrap_or(0)
    }
}

pub(super) const MEDIA: [u8; 4] = [10, 20, 0, 50];
pub(super) const CLIENT: &str = "10.20.0.10:5060";

pub(super) fn config() -> SiprecConfig {
    SiprecConfig {
        media_address: IpAddr::from(MEDIA),
        rtp_ports: (40000, 40099),
        ..SiprecConfig::default()
    }
}

pub(super) const SDP_7: &str =
    "v=0\r\no=SRC 700100 1 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 31000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=label:1\r\na=sendonly\r\n\
m=audio 31002 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=label:2\r\na=sendonly\r\n";

pub(super) const META_7: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <group group_id="Q2dXbH1xTr6yb0f8kP3aJg==">
<associate-time>2025-03-04T10:15:02Z</associate-time>
  </group>
  <session session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<sipSessionID>3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f</sipSessionID>
<group-ref>Q2dXbH1xTr6yb0f8kP3aJg==</group-ref>
<start-time>2025-03-04T10:15:02Z</start-time>
  </session>
  <participant participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==">
<nameID aor="sip:+493012345678@carrier.example"><name xml:lang="en">Customer</name></nameID>
  </participant>
  <participant participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
<nameID aor="sip:7002@cc.example"><name xml:lang="en">Agent 7002</name></nameID>
  </participant>
  <stream stream_id="s1Fw9uR3Q7iL2c8Vb4NxEw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><label>1</label></stream>
  <stream stream_id="s2Kp7eT5W1oN6d3Ym8ZqJw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><label>2</label></stream>
  <sessionrecordingassoc session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<associate-time>2025-03-04T10:15:02Z</associate-time>
  </sessionrecordingassoc>
  <participantsessionassoc participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==">
<send>s1Fw9uR3Q7iL2c8Vb4NxEw==</send>
<recv>s2Kp7eT5W1oN6d3Ym8ZqJw==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
<send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
<recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
  </participantstreamassoc>
</recording>
"#;

pub(super) const SDP_8: &str =
    "v=0\r\no=SRC 700100 2 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 31000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\na=label:1\r\na=sendonly\r\n\
m=audio 31010 RTP/AVP 18 101\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=label:2\r\na=sendonly\r\n";

pub(super) const META_8: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>partial</datamode>
  <participant participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==">
<nameID aor="sip:7003@cc.example"><name xml:lang="en">Agent 7003</name></nameID>
  </participant>
  <participantsessionassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
<associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
<disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantstreamassoc>
  <participantstreamassoc participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==">
<send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
<recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
<associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantstreamassoc>
</recording>
"#;

/// A two-part SIPREC body (SDP + metadata).
pub(super) fn multipart(sdp: &str, xml: &str) -> (String, String) {
    let body = format!(
        "--rsb-42\r\nContent-Type: application/sdp\r\nContent-Disposition: session;handling=required\r\n\r\n{sdp}\r\n\
--rsb-42\r\nContent-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n\r\n{xml}\r\n--rsb-42--\r\n"
    );
    ("multipart/mixed;boundary=rsb-42".to_string(), body)
}

/// A two-stream SDP offer with our choice of ports, direction and source address.
pub(super) fn sdp(version: u32, ports: &[u16], direction: &str) -> String {
    let mut s = format!(
        "v=0\r\no=SRC 700100 {version} IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n"
    );
    for (i, port) in ports.iter().enumerate() {
        s += &format!(
            "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=label:{}\r\na={direction}\r\n",
            i + 1
        );
    }
    s
}

/// What a test request looks like before it is written out.
pub(super) struct Req<'a> {
    pub(super) method: &'a str,
    pub(super) call_id: &'a str,
    pub(super) from_tag: &'a str,
    pub(super) to_tag: Option<&'a str>,
    pub(super) cseq: u32,
    pub(super) headers: Vec<String>,
    pub(super) body: Option<(String, String)>,
}

impl<'a> Req<'a> {
    pub(super) fn new(method: &'a str, call_id: &'a str) -> Self {
        Self {
            method,
            call_id,
            from_tag: "sbc-7731",
            to_tag: None,
            cseq: 1,
            headers: Vec::new(),
            body: None,
        }
    }

    pub(super) fn siprec(mut self) -> Self {
        self.headers
            .push("Contact: <sip:src@10.20.0.10:5060>;+sip.src".into());
        self.headers.push("Require: siprec".into());
        self
    }

    pub(super) fn header(mut self, line: &str) -> Self {
        self.headers.push(line.to_string());
        self
    }

    pub(super) fn body(mut self, content_type: &str, body: &str) -> Self {
        self.body = Some((content_type.to_string(), body.to_string()));
        self
    }

    pub(super) fn in_dialog(mut self, tag: &'a str, cseq: u32) -> Self {
        self.to_tag = Some(tag);
        self.cseq = cseq;
        self
    }

    pub(super) fn text(&self, branch: u64) -> String {
        let to = match self.to_tag {
            Some(tag) => format!("<sip:srs@10.20.0.50>;tag={tag}"),
            None => "<sip:srs@10.20.0.50>".to_string(),
        };
        let cseq_method = if self.method == "ACK" {
            "ACK"
        } else {
            self.method
        };
        let mut s = format!(
            "{} sip:srs@10.20.0.50:5060;transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP {CLIENT};branch=z9hG4bK-{branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:src@sbc1.cc.example>;tag={}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {} {cseq_method}\r\n",
            self.method, self.from_tag, self.call_id, self.cseq
        );
        if !self.headers.iter().any(|h| h.starts_with("Contact:")) {
            s += "Contact: <sip:src@10.20.0.10:5060>\r\n";
        }
        for h in &self.headers {
            s += h;
            s += "\r\n";
        }
        match &self.body {
            Some((ct, body)) => {
                s += &format!(
                    "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            None => s += "Content-Length: 0\r\n\r\n",
        }
        s
    }
}

pub(super) type Events = Arc<Mutex<Vec<SessionEvent>>>;

/// Recorder + real endpoint on virtual time, over one TCP connection.
pub(super) struct Harness {
    pub(super) rec: Recorder<TestFlows>,
    pub(super) ep: Endpoint,
    pub(super) now: Instant,
    pub(super) events: Events,
    pub(super) branch: u64,
    /// Status lines of the final responses sent (rsip drops reason phrases of known codes).
    pub(super) status_lines: Vec<String>,
}

impl Harness {
    pub(super) fn new(config: SiprecConfig) -> Self {
        let events: Events = Arc::default();
        let sink = events.clone();
        let rec = Recorder::new(
            config,
            TestFlows::default(),
            Box::new(move |e| sink.lock().unwrap().push(e)),
        );
        let ep = Endpoint::new(crate::sip::EndpointConfig {
            contact_host: "10.20.0.50".into(),
            contact_params: vec!["+sip.srs".into()],
            app_handles_options: true,
            ..Default::default()
        });
        Self {
            rec,
            ep,
            now: Instant::now(),
            events,
            branch: 0,
            status_lines: Vec::new(),
        }
    }

    /// Delivers a request (fresh Via branch) and returns every message sent back.
    pub(super) fn send(&mut self, req: &Req) -> Vec<rsip::SipMessage> {
        self.branch += 1;
        let text = req.text(self.branch);
        self.send_raw(&text)
    }

    pub(super) fn send_raw(&mut self, text: &str) -> Vec<rsip::SipMessage> {
        self.ep.handle_incoming(
            self.now,
            crate::sip::Incoming {
                transport: crate::sip::Transport::Tcp,
                source: CLIENT.parse().unwrap(),
                local: "10.20.0.50:5060".parse().unwrap(),
                connection: Some(1),
                bytes: bytes::Bytes::copy_from_slice(text.as_bytes()),
            },
        );
        self.pump()
    }

    /// Hands endpoint events to the recorder until both are quiet; returns what was sent.
    pub(super) fn pump(&mut self) -> Vec<rsip::SipMessage> {
        let mut out = Vec::new();
        loop {
            let mut busy = false;
            while let Some(event) = self.ep.poll_event() {
                busy = true;
                self.rec.handle_event(self.now, event, &mut self.ep);
            }
            while let Some(t) = self.ep.poll_transmit() {
                busy = true;
                let line = String::from_utf8_lossy(&t.bytes)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if line.starts_with("SIP/2.0 ") && !line.starts_with("SIP/2.0 1") {
                    self.status_lines.push(line);
                }
                out.push(rsip::SipMessage::try_from(&t.bytes[..]).expect("we send valid SIP"));
            }
            if !busy {
                return out;
            }
        }
    }

    /// Moves virtual time forward, firing every timer due on the way.
    pub(super) fn advance(&mut self, by: Duration) -> Vec<rsip::SipMessage> {
        let target = self.now + by;
        let mut out = Vec::new();
        loop {
            let next = [self.ep.poll_timeout(), self.rec.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= target => {
                    self.now = self.now.max(at);
                    self.ep.handle_timeout(self.now);
                    self.rec.handle_timeout(self.now, &mut self.ep);
                    out.extend(self.pump());
                }
                _ => break,
            }
        }
        self.now = target;
        out
    }

    pub(super) fn take_events(&self) -> Vec<SessionEvent> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// INVITE, expect 200, ACK it. Returns the 200 and the recording id.
    pub(super) fn establish(&mut self, req: Req) -> (rsip::Response, String) {
        let resp = final_response(&self.send(&req));
        assert_eq!(resp.status_code.code(), 200, "{resp}");
        let tag = to_tag(&resp.headers).expect("200 has a To tag");
        self.send(&ack(req.call_id, req.from_tag, &tag, req.cseq));
        let id = match self.take_events().first() {
            Some(SessionEvent::Started { id, .. }) => id.clone(),
            other => panic!("expected Started, got {other:?}"),
        };
        (resp, id)
    }

    /// (flow id, generation, remote) pinned at a local port.
    pub(super) fn flow(&self, port: u16) -> Option<(u64, u32, Option<SocketAddr>)> {
        self.rec
            .flows()
            .table
            .flows
            .get(&SocketAddr::new(IpAddr::from(MEDIA), port))
            .map(|(spec, generation)| (spec.flow_id, *generation, spec.remote))
    }
}

pub(super) fn ack<'a>(call_id: &'a str, from_tag: &'a str, to_tag: &'a str, cseq: u32) -> Req<'a> {
    let mut r = Req::new("ACK", call_id).in_dialog(to_tag, cseq);
    r.from_tag = from_tag;
    r
}

pub(super) fn responses(msgs: &[rsip::SipMessage]) -> Vec<&rsip::Response> {
    msgs.iter()
        .filter_map(|m| match m {
            rsip::SipMessage::Response(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The final response among what was sent.
pub(super) fn final_response(msgs: &[rsip::SipMessage]) -> rsip::Response {
    responses(msgs)
        .into_iter()
        .rev()
        .find(|r| r.status_code.code() >= 200)
        .cloned()
        .unwrap_or_else(|| panic!("no final response in {msgs:?}"))
}

pub(super) fn requests(msgs: &[rsip::SipMessage]) -> Vec<&rsip::Request> {
    msgs.iter()
        .filter_map(|m| match m {
            rsip::SipMessage::Request(r) => Some(r),
            _ => None,
        })
        .collect()
}

pub(super) fn body(resp: &rsip::Response) -> String {
    String::from_utf8(resp.body.clone()).unwrap()
}

/// Ports of the m-lines of an SDP, in order.
pub(super) fn m_ports(sdp: &str) -> Vec<u16> {
    sdp.lines()
        .filter_map(|l| l.strip_prefix("m="))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect()
}

/// The `o=` version of an SDP.
pub(super) fn o_version(sdp: &str) -> u64 {
    let o = sdp.lines().find_map(|l| l.strip_prefix("o=")).unwrap();
    o.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Lines of the m-section `index` (0-based).
pub(super) fn m_section(sdp: &str, index: usize) -> Vec<String> {
    let mut sections: Vec<Vec<String>> = Vec::new();
    for line in sdp.lines() {
        if line.starts_with("m=") {
            sections.push(Vec::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push(line.trim().to_string());
        }
    }
    sections.get(index).cloned().unwrap_or_default()
}

pub(super) fn spec_invite() -> Req<'static> {
    let (ct, b) = multipart(SDP_7, META_7);
    Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
        .siprec()
        .header("Supported: timer, replaces")
        .header("Session-Expires: 1800;refresher=uac")
        .header("Min-SE: 90")
        .header("X-Genesys-CallUUID: 0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A")
        .body(&ct, &b)
}

pub(super) fn status(h: &mut Harness, req: &Req) -> (u16, rsip::Response) {
    let r = final_response(&h.send(req));
    (r.status_code.code(), r)
}

#[test]
fn plain_session_is_answered_pinned_and_ended_by_bye() {
    let mut h = Harness::new(config());
    let req = spec_invite();
    let (resp, id) = {
        let resp = final_response(&h.send(&req));
        assert_eq!(resp.status_code.code(), 200, "{resp}");
        let events = h.take_events();
        let Some(SessionEvent::Started {
            id,
            ids,
            streams,
            participants,
            metadata,
            ..
        }) = events.first()
        else {
            panic!("expected Started, got {events:?}");
        };
        assert_eq!(ids.sip_call_id, "rs-0c6e2b11@10.20.0.10");
        assert_eq!(
            ids.call_uuid.as_deref(),
            Some("0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A")
        );
        assert_eq!(streams.len(), 2);
        assert_eq!(participants.len(), 2);
        let metadata = metadata.as_ref().expect("metadata version 1");
        assert_eq!((metadata.version, metadata.method.as_str()), (1, "INVITE"));
        assert_eq!(metadata.xml.trim(), META_7.trim());
        // Recording id: UTC timestamp + random suffix.
        let (stamp, suffix) = id.split_once('-').unwrap();
        assert_eq!((stamp.len(), suffix.len()), (16, 8), "{id}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[8] == b'T', "{id}");
        // Streams pinned at the ports we answered, with distinct flow ids.
        let sdp = body(&resp);
        let ports = m_ports(&sdp);
        assert_eq!(
            ports,
            streams.iter().map(|s| s.local_port).collect::<Vec<_>>()
        );
        for s in streams {
            assert_eq!(h.flow(s.local_port).map(|f| f.0), Some(s.flow_id));
            let rtcp = s.rtcp_port.expect("no rtcp-mux offered: RTCP port");
            assert_eq!(rtcp, s.local_port + 1);
            assert_eq!(h.flow(rtcp).map(|f| f.0), s.rtcp_flow_id);
            assert_eq!(s.codec.name, "PCMA");
            assert!(!s.paused);
        }
        assert_eq!(h.rec.flows().table.flows.len(), 4);
        (resp, id.clone())
    };
    let contact = header_value(&resp.headers, "Contact").unwrap();
    assert!(contact.contains("+sip.srs"), "{contact}");
    assert!(header_tokens(&resp.headers, "Require").contains(&"siprec".to_string()));
    assert_eq!(
        header_value(&resp.headers, "Session-Expires").as_deref(),
        Some("1800;refresher=uac")
    );
    assert!(header_value(&resp.headers, "Content-Type")
        .unwrap()
        .contains("application/sdp"));
    let sdp = body(&resp);
    for (i, label) in ["1", "2"].iter().enumerate() {
        let m = m_section(&sdp, i);
        assert!(m.contains(&"a=recvonly".to_string()), "{m:?}");
        assert!(m.contains(&format!("a=label:{label}")), "{m:?}");
        assert!(m[0].contains(" 8"), "PCMA answered: {m:?}");
    }
    let tag = to_tag(&resp.headers).unwrap();
    h.send(&ack(req.call_id, req.from_tag, &tag, 1));
    assert!(h.rec.sessions()[0].confirmed);

    let bye = Req::new("BYE", req.call_id)
        .in_dialog(&tag, 2)
        .header("Reason: Q.850;cause=16");
    let (code, _) = status(&mut h, &bye);
    assert_eq!(code, 200);
    assert!(h.rec.flows().table.flows.is_empty());
    assert!(h.rec.sessions().is_empty());
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: e, reason: EndReason::Bye { reason: Some(r) }, .. }]
            if *e == id && r == "Q.850;cause=16"),
        "{events:?}"
    );
    assert_eq!(h.rec.counters().sessions_ended.get("bye"), Some(&1));
}

#[test]
fn strict_acceptance_policy_answers_400_with_a_warning_naming_the_gap() {
    let mut h = Harness::new(SiprecConfig {
        require_siprec_tag: true,
        require_metadata: true,
        require_label: true,
        ..config()
    });
    let unlabelled = sdp(1, &[20000], "sendonly").replace("a=label:1\r\n", "");
    let (ct, with_meta) = multipart(SDP_7, META_7);
    let (ct_nolabel, nolabel_meta) = multipart(&unlabelled, META_7);
    let cases = [
        (
            Req::new("INVITE", "p-1").body(&ct, &with_meta),
            "Require header must have the siprec option tag",
            "missing_siprec_tag",
        ),
        (
            Req::new("INVITE", "p-2")
                .header("Require: siprec")
                .header("Contact: <sip:src@10.20.0.10:5060>")
                .body(&ct, &with_meta),
            "Contact must have the +sip.src feature tag",
            "missing_siprec_tag",
        ),
        (
            Req::new("INVITE", "p-3")
                .siprec()
                .body("application/sdp", &sdp(1, &[20000], "sendonly")),
            "INVITE must have a recording metadata part",
            "missing_metadata",
        ),
        (
            Req::new("INVITE", "p-4")
                .siprec()
                .body(&ct_nolabel, &nolabel_meta),
            "SDP must have label media attribute",
            "missing_label",
        ),
    ];
    for (req, what, cause) in &cases {
        let (code, resp) = status(&mut h, req);
        assert_eq!(code, 400, "{resp}");
        assert_eq!(
            header_value(&resp.headers, "Warning").as_deref(),
            Some(format!("399 10.20.0.50:5060 \"{what}\"").as_str()),
            "{resp}"
        );
        assert!(
            h.rec.counters().rejections.contains_key(&(400, *cause)),
            "{cause}"
        );
    }
    assert!(h.take_events().is_empty());
    assert!(h.rec.flows().table.flows.is_empty());

    // A conforming INVITE is recorded; a later unlabelled offer is refused, the session kept.
    let (resp, _) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
        .siprec()
        .in_dialog(&tag, 2)
        .body("application/sdp", &unlabelled.replace(" 1 IN", " 2 IN"));
    let (code, resp) = status(&mut h, &reinvite);
    assert_eq!(code, 400, "{resp}");
    assert_eq!(h.rec.sessions().len(), 1);
    assert!(h.take_events().is_empty());
}

#[test]
fn inactive_first_answers_inactive_pins_flows_and_resumes_on_a_client_reoffer() {
    let mut h = Harness::new(SiprecConfig {
        answer_inactive: true,
        ..config()
    });
    let req = Req::new("INVITE", "inact-1")
        .siprec()
        .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
    let resp = final_response(&h.send(&req));
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    let tag = to_tag(&resp.headers).unwrap();
    h.send(&ack("inact-1", "sbc-7731", &tag, 1));
    let answer = body(&resp);
    let ports = m_ports(&answer);
    assert_eq!(ports.len(), 2, "{answer}");
    for (i, port) in ports.iter().enumerate() {
        let section = m_section(&answer, i);
        assert!(section.contains(&"a=inactive".to_string()), "{answer}");
        assert!(!section.contains(&"a=recvonly".to_string()), "{answer}");
        assert!(h.flow(*port).is_some(), "flow of m-line {i} pinned");
    }
    let events = h.take_events();
    let [SessionEvent::Started { id, streams, .. }] = &events[..] else {
        panic!("{events:?}");
    };
    assert!(streams.iter().all(|s| s.paused), "{streams:?}");

    // The client re-offers (same media, o= bumped): recording starts.
    let reinvite = Req::new("INVITE", "inact-1")
        .siprec()
        .in_dialog(&tag, 2)
        .body("application/sdp", &sdp(2, &[20000, 20002], "sendonly"));
    let (code, resp) = status(&mut h, &reinvite);
    assert_eq!(code, 200, "{resp}");
    let answer = body(&resp);
    assert_eq!(m_ports(&answer), ports);
    for i in 0..2 {
        assert!(
            m_section(&answer, i).contains(&"a=recvonly".to_string()),
            "{answer}"
        );
    }
    let resumed: Vec<_> = h
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Resumed { id: rid, label, .. } if rid == *id => Some(label),
            _ => None,
        })
        .collect();
    assert_eq!(resumed, vec!["1".to_string(), "2".to_string()]);
}

#[test]
fn plain_sdp_invite_without_metadata_is_recorded() {
    let mut h = Harness::new(config());
    let req =
        Req::new("INVITE", "nbr-1@cube").body("application/sdp", &sdp(1, &[20000], "sendonly"));
    let resp = final_response(&h.send(&req));
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    assert!(header_value(&resp.headers, "Require").is_none());
    assert!(header_value(&resp.headers, "Session-Expires").is_none());
    let events = h.take_events();
    let [SessionEvent::Started {
        streams,
        participants,
        metadata,
        ids,
        ..
    }] = &events[..]
    else {
        panic!("{events:?}");
    };
    assert_eq!((streams.len(), participants.len(), metadata), (1, 0, &None));
    assert_eq!(ids.sip_call_id, "nbr-1@cube");
    assert_eq!(streams[0].label, "1");
    assert_eq!(m_ports(&body(&resp)), vec![streams[0].local_port]);
}

#[test]
fn reinvite_moves_a_stream_and_keeps_the_recording() {
    let mut h = Harness::new(config());
    let req = spec_invite();
    let (resp, id) = h.establish(req);
    let tag = to_tag(&resp.headers).unwrap();
    let ports = m_ports(&body(&resp));
    let before: Vec<_> = ports.iter().map(|p| h.flow(*p).unwrap()).collect();

    let (ct, b) = multipart(SDP_8, META_8);
    let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
        .in_dialog(&tag, 2)
        .header("Session-Expires: 1800;refresher=uac")
        .body(&ct, &b);
    let (code, resp2) = status(&mut h, &reinvite);
    assert_eq!(code, 200, "{resp2}");
    h.send(&ack(reinvite.call_id, reinvite.from_tag, &tag, 2));
    let sdp2 = body(&resp2);
    assert_eq!(m_ports(&sdp2), ports, "local ports stay");
    assert_eq!(o_version(&sdp2), o_version(&body(&resp)) + 1);
    assert!(
        m_section(&sdp2, 1)[0].contains(" 18"),
        "G.729 answered: {sdp2}"
    );

    // Label 1 untouched; label 2 rewritten in place (same key and flow id, next generation).
    assert_eq!(h.flow(ports[0]), Some(before[0]));
    let (flow_id, generation, _) = h.flow(ports[1]).unwrap();
    assert_eq!((flow_id, generation), (before[1].0, before[1].1 + 1));

    let events = h.take_events();
    assert!(events.iter().all(|e| e.recording_id() == id), "{events:?}");
    let streams = events
        .iter()
        .find_map(|e| match e {
            SessionEvent::MediaChanged { streams, .. } => Some(streams.clone()),
            _ => None,
        })
        .expect("MediaChanged");
    assert_eq!(streams[1].codec.name, "G729");
    assert_eq!(streams[1].remote, Some("10.20.0.10:31010".parse().unwrap()));
    assert_eq!(streams[0].codec.name, "PCMA");
    let (participants, metadata) = events
        .iter()
        .find_map(|e| match e {
            SessionEvent::ParticipantsChanged {
                participants,
                metadata,
                ..
            } => Some((participants.clone(), metadata.clone())),
            _ => None,
        })
        .expect("ParticipantsChanged");
    assert_eq!(metadata.unwrap().version, 2);
    let by_aor = |aor: &str| {
        participants
            .iter()
            .find(|p| p.aor.as_deref().is_some_and(|a| a.contains(aor)))
            .unwrap_or_else(|| panic!("{aor} in {participants:?}"))
            .clone()
    };
    assert!(by_aor("7002").left_at.is_some());
    let joined = by_aor("7003");
    assert!(joined.joined_at.is_some() && joined.left_at.is_none());
    assert_eq!(h.rec.sessions()[0].id, id);
}

#[test]
fn reinvite_adds_and_removes_streams() {
    let mut h = Harness::new(config());
    let req = Req::new("INVITE", "add-rm@src")
        .siprec()
        .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
    let (resp, _) = h.establish(req);
    let tag = to_tag(&resp.headers).unwrap();
    let ports = m_ports(&body(&resp));

    // Stream 1 goes (port 0), stream 2 stays, stream 3 is new.
    let offer = sdp(2, &[0, 20002, 20004], "sendonly");
    let reinvite = Req::new("INVITE", "add-rm@src")
        .in_dialog(&tag, 2)
        .body("application/sdp", &offer);
    let (code, resp2) = status(&mut h, &reinvite);
    assert_eq!(code, 200);
    let new_ports = m_ports(&body(&resp2));
    assert_eq!(new_ports.len(), 3);
    assert_eq!(new_ports[0], 0);
    assert_eq!(new_ports[1], ports[1]);
    assert!(new_ports[2] != 0 && !ports.contains(&new_ports[2]));
    assert!(h.flow(ports[0]).is_none() && h.flow(ports[0] + 1).is_none());
    assert!(h.flow(ports[1]).is_some() && h.flow(new_ports[2]).is_some());
    let events = h.take_events();
    let Some(SessionEvent::MediaChanged { streams, .. }) = events.last() else {
        panic!("{events:?}");
    };
    let labels: Vec<_> = streams.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["2", "3"]);
    assert_eq!(h.rec.sessions()[0].streams.len(), 2);
}

#[test]
fn inactive_pauses_and_sendonly_resumes() {
    let mut h = Harness::new(config());
    let req = Req::new("INVITE", "pause@src")
        .siprec()
        .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
    let (resp, _) = h.establish(req);
    let tag = to_tag(&resp.headers).unwrap();

    let pause = Req::new("INVITE", "pause@src")
        .in_dialog(&tag, 2)
        .body("application/sdp", &sdp(2, &[20000, 20002], "inactive"));
    let (code, resp2) = status(&mut h, &pause);
    assert_eq!(code, 200);
    assert!(m_section(&body(&resp2), 0).contains(&"a=inactive".to_string()));
    let events = h.take_events();
    let paused: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Paused { label, .. } => Some(label.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(paused, ["1", "2"]);
    assert!(h.rec.sessions()[0].streams.iter().all(|s| s.paused));
    assert!(
        matches!(events.last(), Some(SessionEvent::MediaChanged { streams, .. }) if streams.iter().all(|s| s.paused)),
        "{events:?}"
    );

    let resume = Req::new("UPDATE", "pause@src")
        .in_dialog(&tag, 3)
        .body("application/sdp", &sdp(3, &[20000, 20002], "sendonly"));
    let (code, resp3) = status(&mut h, &resume);
    assert_eq!(code, 200);
    assert!(m_section(&body(&resp3), 1).contains(&"a=recvonly".to_string()));
    let events = h.take_events();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, SessionEvent::Resumed { .. }))
            .count(),
        2,
        "{events:?}"
    );
    assert!(h.rec.sessions()[0].streams.iter().all(|s| !s.paused));
}

#[test]
fn offer_inactive_from_the_start_starts_paused() {
    let mut h = Harness::new(config());
    let req =
        Req::new("INVITE", "inactive@src").body("application/sdp", &sdp(1, &[20000], "inactive"));
    let (resp, _) = h.establish(req);
    assert!(m_section(&body(&resp), 0).contains(&"a=inactive".to_string()));
    assert!(h.rec.sessions()[0].streams[0].paused);
}

#[test]
fn cancel_before_answer_tears_down() {
    let mut h = Harness::new(SiprecConfig {
        answer_delay: Duration::from_secs(2),
        ..config()
    });
    let req = spec_invite();
    let sent = h.send(&req);
    assert!(
        responses(&sent).iter().all(|r| r.status_code.code() < 200),
        "{sent:?}"
    );
    assert_eq!(
        h.rec.flows().table.flows.len(),
        4,
        "pinned before the answer"
    );
    assert!(matches!(
        h.take_events().first(),
        Some(SessionEvent::Started { .. })
    ));

    // CANCEL carries the INVITE's branch.
    let invite_branch = h.branch;
    let sent = h.send_raw(&Req::new("CANCEL", req.call_id).text(invite_branch));
    let codes: Vec<u16> = responses(&sent)
        .iter()
        .map(|r| r.status_code.code())
        .collect();
    assert!(codes.contains(&200) && codes.contains(&487), "{codes:?}");
    assert!(h.rec.flows().table.flows.is_empty());
    assert!(h.rec.sessions().is_empty());
    let events = h.take_events();
    assert!(
        matches!(
            &events[..],
            [SessionEvent::Ended {
                reason: EndReason::Cancel,
                ..
            }]
        ),
        "{events:?}"
    );
    // Nothing is answered later.
    let later = h.advance(Duration::from_secs(5));
    assert!(
        responses(&later)
            .iter()
            .all(|r| r.status_code.code() != 200),
        "{later:?}"
    );
}

#[test]
fn delayed_answer_is_sent_from_the_timer() {
    let mut h = Harness::new(SiprecConfig {
        answer_delay: Duration::from_millis(300),
        ..config()
    });
    let req = spec_invite();
    h.send(&req);
    let sent = h.advance(Duration::from_secs(1));
    let resp = final_response(&sent);
    assert_eq!(resp.status_code.code(), 200);
    let tag = to_tag(&resp.headers).unwrap();
    h.send(&ack(req.call_id, req.from_tag, &tag, 1));
    // The dialog is known: BYE works.
    let (code, _) = status(&mut h, &Req::new("BYE", req.call_id).in_dialog(&tag, 2));
    assert_eq!(code, 200);
    assert!(h.rec.flows().table.flows.is_empty());
}

#[test]
fn error_responses() {
    let mut h = Harness::new(SiprecConfig {
        acl: vec![(IpAddr::from([10, 20, 0, 0]), 16)],
        ..config()
    });
    let ok = sdp(1, &[20000], "sendonly");
    let cases: Vec<(Req, u16, &str)> = vec![
        (
            Req::new("INVITE", "e-420")
                .siprec()
                .header("Require: foo, siprec")
                .body("application/sdp", &ok),
            420,
            "",
        ),
        (
            Req::new("INVITE", "e-415")
                .siprec()
                .body("text/plain", "hello"),
            415,
            "",
        ),
        (
            Req::new("INVITE", "e-400-mp")
                .siprec()
                .body("multipart/mixed;boundary=zz", "--nope\r\nno boundary here"),
            400,
            "",
        ),
        (
            Req::new("INVITE", "e-400-sdp")
                .siprec()
                .body("application/sdp", "v=0\r\nm=audio banana\r\n"),
            400,
            "Bad SDP",
        ),
        (
            Req::new("INVITE", "e-400-xml").siprec().body(
                "multipart/mixed;boundary=rsb-42",
                &multipart(
                    &ok,
                    "<recording><participant participant_id=\"x\"></recording>",
                )
                .1,
            ),
            400,
            "",
        ),
        (Req::new("INVITE", "e-488-nosdp").siprec(), 488, ""),
        (
            Req::new("INVITE", "e-488-dtls").siprec().body(
                "application/sdp",
                "v=0\r\no=SRC 1 1 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 20000 UDP/TLS/RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendonly\r\n",
            ),
            488,
            "",
        ),
        (
            Req::new("INVITE", "e-488-port0")
                .siprec()
                .body("application/sdp", &sdp(1, &[0, 0], "sendonly")),
            488,
            "",
        ),
        (
            Req::new("INVITE", "e-422")
                .siprec()
                .header("Session-Expires: 30")
                .body("application/sdp", &ok),
            422,
            "",
        ),
        (Req::new("BYE", "e-481").in_dialog("nosuch", 2), 481, ""),
    ];
    for (req, want, phrase) in &cases {
        let (code, resp) = status(&mut h, req);
        assert_eq!(code, *want, "{}: {resp}", req.call_id);
        let line = h.status_lines.last().unwrap();
        assert!(line.contains(phrase), "{line}");
        match want {
            420 => assert_eq!(
                header_value(&resp.headers, "Unsupported").as_deref(),
                Some("foo")
            ),
            415 => assert!(header_value(&resp.headers, "Accept")
                .unwrap()
                .contains("application/sdp")),
            422 => assert_eq!(header_value(&resp.headers, "Min-SE").as_deref(), Some("90")),
            _ => {}
        }
    }
    assert!(h.rec.sessions().is_empty());
    assert!(
        h.rec.flows().table.flows.is_empty(),
        "no flow left by a rejection"
    );
    for code in [415, 400, 488, 422] {
        assert!(
            h.rec.counters().rejected(code) > 0,
            "{code} counted: {:?}",
            h.rec.counters()
        );
    }

    // ACL: a client outside 10.20/16.
    let mut text = Req::new("INVITE", "e-403")
        .siprec()
        .body("application/sdp", &ok)
        .text(999);
    text = text.replace(CLIENT, "192.0.2.1:5060");
    h.ep.handle_incoming(
        h.now,
        crate::sip::Incoming {
            transport: crate::sip::Transport::Tcp,
            source: "192.0.2.1:5060".parse().unwrap(),
            local: "10.20.0.50:5060".parse().unwrap(),
            connection: Some(2),
            bytes: bytes::Bytes::from(text),
        },
    );
    let resp = final_response(&h.pump());
    assert_eq!(resp.status_code.code(), 403);
    assert_eq!(h.rec.counters().rejected(403), 1);
}

#[test]
fn session_limit_and_not_accepting_give_503_with_retry_after() {
    let mut h = Harness::new(SiprecConfig {
        max_sessions: 1,
        retry_after: 17,
        ..config()
    });
    h.establish(
        Req::new("INVITE", "one@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
    );
    let (code, resp) = status(
        &mut h,
        &Req::new("INVITE", "two@src").body("application/sdp", &sdp(1, &[20002], "sendonly")),
    );
    assert_eq!(code, 503);
    assert_eq!(
        header_value(&resp.headers, "Retry-After").as_deref(),
        Some("17")
    );
    assert_eq!(
        h.rec.counters().rejections.get(&(503, "session_limit")),
        Some(&1)
    );
    let json = serde_json::to_value(h.rec.counters()).unwrap();
    assert_eq!(json["rejections"]["503 session_limit"], 1);
    assert_eq!(json["sessions_started"], 1);

    let mut h = Harness::new(config());
    h.rec.set_accepting(false, "disk full");
    let (code, resp) = status(
        &mut h,
        &Req::new("INVITE", "three@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
    );
    assert_eq!(code, 503);
    let line = h.status_lines.last().unwrap();
    assert!(line.contains("disk full"), "{line}");
    assert!(header_value(&resp.headers, "Retry-After").is_some());
}

#[test]
fn port_exhaustion_gives_503_and_cooldown_is_honoured() {
    // Room for exactly two RTP/RTCP pairs.
    let mut h = Harness::new(SiprecConfig {
        rtp_ports: (40000, 40003),
        port_cooldown: Duration::from_secs(10),
        ..config()
    });
    let two = sdp(1, &[20000, 20002], "sendonly");
    let (resp, _) = h.establish(Req::new("INVITE", "full@src").body("application/sdp", &two));
    let tag = to_tag(&resp.headers).unwrap();
    let (code, resp) = status(
        &mut h,
        &Req::new("INVITE", "more@src").body("application/sdp", &sdp(1, &[20004], "sendonly")),
    );
    assert_eq!(code, 503, "{resp}");
    assert!(header_value(&resp.headers, "Retry-After").is_some());
    assert_eq!(
        h.rec.counters().rejections.get(&(503, "ports_exhausted")),
        Some(&1)
    );

    let (code, _) = status(&mut h, &Req::new("BYE", "full@src").in_dialog(&tag, 2));
    assert_eq!(code, 200);
    // Released ports cool down: still no room.
    h.advance(Duration::from_secs(5));
    let (code, _) = status(
        &mut h,
        &Req::new("INVITE", "soon@src").body("application/sdp", &two),
    );
    assert_eq!(code, 503);
    assert!(
        h.rec.flows().table.flows.is_empty(),
        "a failed allocation leaves nothing pinned"
    );
    h.advance(Duration::from_secs(6));
    let (code, _) = status(
        &mut h,
        &Req::new("INVITE", "later@src").body("application/sdp", &two),
    );
    assert_eq!(code, 200);
}

#[test]
fn options_answer_503_while_a_new_session_would_be_refused() {
    let options = |h: &mut Harness, n: u32| {
        let call_id = format!("ping-{n}@kamailio");
        let (code, resp) = status(h, &Req::new("OPTIONS", &call_id));
        (code, resp)
    };
    let mut h = Harness::new(SiprecConfig {
        max_sessions: 1,
        retry_after: 9,
        ..config()
    });
    let (code, resp) = options(&mut h, 1);
    assert_eq!(code, 200, "{resp}");
    assert!(header_value(&resp.headers, "Allow").is_some());
    assert_eq!(h.rec.refusal(h.now), None);

    // Full: OPTIONS turn 503 before an INVITE would.
    let two = sdp(1, &[20000, 20002], "sendonly");
    let (resp, _) = h.establish(Req::new("INVITE", "one@src").body("application/sdp", &two));
    let tag = to_tag(&resp.headers).unwrap();
    let (code, resp) = options(&mut h, 2);
    assert_eq!(code, 503, "{resp}");
    assert_eq!(
        header_value(&resp.headers, "Retry-After").as_deref(),
        Some("9")
    );
    assert_eq!(
        h.status_lines.last().unwrap(),
        "SIP/2.0 503 Session limit reached"
    );
    let (code, _) = status(&mut h, &Req::new("BYE", "one@src").in_dialog(&tag, 2));
    assert_eq!(code, 200);
    assert_eq!(options(&mut h, 3).0, 200, "room again");
    h.take_events();

    // Draining: OPTIONS and new INVITEs 503, the live session's requests go on.
    let (resp, _) = h.establish(Req::new("INVITE", "live@src").body("application/sdp", &two));
    let tag = to_tag(&resp.headers).unwrap();
    h.rec.set_limits(Vec::new(), 10, Duration::from_secs(3600));
    h.rec.set_draining(true);
    assert!(h.rec.draining());
    let (code, resp) = options(&mut h, 4);
    assert_eq!(code, 503, "{resp}");
    assert!(h.status_lines.last().unwrap().contains("draining"));
    assert!(h.rec.refusal(h.now).unwrap().contains("draining"));
    let (code, _) = status(
        &mut h,
        &Req::new("INVITE", "new@src").body("application/sdp", &sdp(1, &[20004], "sendonly")),
    );
    assert_eq!(code, 503);
    assert_eq!(
        h.rec.counters().rejections.get(&(503, "draining")),
        Some(&1)
    );
    let moved = sdp(2, &[20010, 20012], "sendonly");
    let (code, _) = status(
        &mut h,
        &Req::new("INVITE", "live@src")
            .in_dialog(&tag, 2)
            .body("application/sdp", &moved),
    );
    assert_eq!(
        code, 200,
        "a re-INVITE of a live session is answered while draining"
    );
    let (code, _) = status(&mut h, &Req::new("BYE", "live@src").in_dialog(&tag, 3));
    assert_eq!(code, 200);
    assert!(h.rec.sessions().is_empty());
    h.rec.set_draining(false);
    assert_eq!(options(&mut h, 5).0, 200);

    // Not accepting (spool full, shutting down): 503 naming the reason.
    h.rec.set_accepting(false, "spool full");
    let (code, _) = options(&mut h, 6);
    assert_eq!(code, 503);
    assert!(h.status_lines.last().unwrap().contains("spool full"));
    h.rec.set_accepting(true, "");

    // OPTIONS are counted on their own, not as rejected requests.
    assert_eq!(h.rec.counters().options_unavailable, 3);
    assert_eq!(h.rec.counters().rejected(503), 1);

    // Out of media ports: room for one two-stream session only.
    let mut h = Harness::new(SiprecConfig {
        rtp_ports: (40000, 40003),
        ..config()
    });
    assert_eq!(options(&mut h, 7).0, 200);
    h.establish(Req::new("INVITE", "ports@src").body("application/sdp", &two));
    let (code, resp) = options(&mut h, 8);
    assert_eq!(code, 503, "{resp}");
    assert_eq!(
        h.status_lines.last().unwrap(),
        "SIP/2.0 503 Media ports exhausted"
    );
}

/// Partial metadata whose association names a participant and a stream never described.
pub(super) const META_GHOST: &str = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>partial</datamode>
  <participantstreamassoc participant_id="p-ghost"><send>s-ghost</send></participantstreamassoc>
</recording>"#;

/// Our snapshot-request UPDATEs among what was sent.
pub(super) fn snapshot_requests(msgs: &[rsip::SipMessage]) -> Vec<rsip::Request> {
    requests(msgs)
        .into_iter()
        .filter(|r| r.method == Method::Update)
        .cloned()
        .collect()
}

/// The client's answer to a request we sent.
pub(super) fn answer(h: &mut Harness, req: &rsip::Request, code: u16, reason: &str) {
    let mut text = format!("SIP/2.0 {code} {reason}\r\n");
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        text += &format!("{name}: {}\r\n", header_value(&req.headers, name).unwrap());
    }
    text += "Content-Length: 0\r\n\r\n";
    assert!(h.send_raw(&text).is_empty(), "a response needs no answer");
}

mod in_dialog;
