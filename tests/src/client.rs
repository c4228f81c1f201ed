//! A SIPREC client (SRC) for tests and the demo: builds recording INVITEs, re-INVITEs, BYE,
//! CANCEL and OPTIONS as real SIP text, sends them over UDP, TCP or TLS, and reads responses
//! with rsip.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use rsip::SipMessage;

/// A response as received: parsed by rsip, with the raw text kept for header checks.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub raw: String,
    pub message: rsip::Response,
}

impl Reply {
    /// Values of a header, matched case-insensitively by name (rsip parses the header list).
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.message
            .headers
            .iter()
            .filter_map(|h| {
                let text = h.to_string();
                let (n, v) = text.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    pub fn body(&self) -> String {
        String::from_utf8_lossy(self.message.body()).into_owned()
    }

    /// The CSeq method of this response.
    pub fn cseq_method(&self) -> String {
        self.header("CSeq")
            .and_then(|c| c.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default()
    }

    /// `tag=` of the To header.
    pub fn to_tag(&self) -> Option<String> {
        let to = self.header("To")?;
        to.split(';')
            .find_map(|p| p.trim().strip_prefix("tag=").map(str::to_string))
    }

    /// Local RTP ports of the SDP answer, in m-line order (0 for a rejected stream).
    pub fn answer_ports(&self) -> Vec<u16> {
        self.body()
            .lines()
            .filter_map(|l| l.strip_prefix("m="))
            .filter_map(|m| m.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
    Tls(Box<TlsStream>, Vec<u8>),
}

/// One SIP dialog's client side.
pub struct SipClient {
    link: Link,
    pub local: SocketAddr,
    pub server: SocketAddr,
    pub call_id: String,
    pub from_tag: String,
    pub to_tag: Option<String>,
    pub cseq: u32,
    branch_seq: u32,
    /// Extra header lines added to the next INVITE (e.g. `X-Genesys-CallUUID: ...`).
    pub extra_headers: Vec<String>,
    /// Request-URI user part and parameters (e.g. `record=abc` ... `;calluuid=X`).
    pub request_uri: String,
    /// Every message received, in order (tests inspect retransmissions).
    pub received: Vec<Reply>,
    last_invite_branch: String,
    last_invite_cseq: u32,
}

fn random_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl SipClient {
    /// A UDP client bound to `local_ip` (port chosen by the kernel).
    pub fn udp(local_ip: std::net::IpAddr, server: SocketAddr) -> Self {
        let socket = UdpSocket::bind((local_ip, 0)).expect("bind SIP client socket");
        let local = socket.local_addr().unwrap();
        Self::new(Link::Udp(socket), local, server)
    }

    /// A TCP client connected to `server` from `local_ip`.
    pub fn tcp(server: SocketAddr) -> Self {
        let stream = TcpStream::connect(server).expect("connect SIP over TCP");
        let local = stream.local_addr().unwrap();
        Self::new(Link::Tcp(stream, Vec::new()), local, server)
    }

    /// A TLS client connected to `server`, trusting only `ca_der` (e.g. the recorder's
    /// self-signed certificate) and checking it is valid for `server_name`. The handshake
    /// is completed here, so a bad certificate fails now.
    pub fn tls(server: SocketAddr, ca_der: &[u8], server_name: &str) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
            .expect("a DER certificate");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .expect("a valid server name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(server).expect("connect SIP over TLS");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let local = tcp.local_addr().unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("TLS handshake with the recorder");
        }
        Self::new(Link::Tls(Box::new(stream), Vec::new()), local, server)
    }

    fn new(link: Link, local: SocketAddr, server: SocketAddr) -> Self {
        Self {
            link,
            local,
            server,
            call_id: format!("{}@{}", random_token(), local.ip()),
            from_tag: random_token(),
            to_tag: None,
            cseq: 0,
            branch_seq: 0,
            extra_headers: Vec::new(),
            request_uri: format!("sip:srs@{server}"),
            received: Vec::new(),
            last_invite_branch: String::new(),
            last_invite_cseq: 0,
        }
    }

    fn transport(&self) -> &'static str {
        match self.link {
            Link::Udp(_) => "UDP",
            Link::Tcp(..) => "TCP",
            Link::Tls(..) => "TLS",
        }
    }

    fn new_branch(&mut self) -> String {
        self.branch_seq += 1;
        format!("z9hG4bK-{}-{}", random_token(), self.branch_seq)
    }

    /// Sends raw bytes as they are (for malformed-input tests and retransmissions).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Udp(s) => {
                s.send_to(bytes, self.server).expect("send SIP datagram");
            }
            Link::Tcp(s, _) => s.write_all(bytes).expect("send SIP over TCP"),
            Link::Tls(s, _) => {
                s.write_all(bytes).expect("send SIP over TLS");
                s.flush().expect("flush TLS");
            }
        }
    }

    /// Builds a request in this dialog. `body` is `(content type, bytes)`.
    pub fn request(
        &mut self,
        method: &str,
        branch: &str,
        cseq: u32,
        extra: &[String],
        body: Option<(&str, &[u8])>,
    ) -> Vec<u8> {
        let to_tag = self
            .to_tag
            .as_ref()
            .map(|t| format!(";tag={t}"))
            .unwrap_or_default();
        let mut text = format!(
            "{method} {uri} SIP/2.0\r\n\
             Via: SIP/2.0/{tr} {local};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:src@{local_ip}>;tag={from_tag}\r\n\
             To: <sip:srs@{server_ip}>{to_tag}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:src@{local};transport={trl}>;+sip.src\r\n\
             User-Agent: recorder-tests\r\n",
            uri = self.request_uri,
            tr = self.transport(),
            trl = self.transport().to_ascii_lowercase(),
            local = self.local,
            local_ip = self.local.ip(),
            from_tag = self.from_tag,
            server_ip = self.server.ip(),
            call_id = self.call_id,
        );
        for h in extra {
            text.push_str(h);
            text.push_str("\r\n");
        }
        let mut bytes = match body {
            Some((ctype, b)) => {
                text.push_str(&format!(
                    "Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                ));
                let mut v = text.into_bytes();
                v.extend_from_slice(b);
                v
            }
            None => {
                text.push_str("Content-Length: 0\r\n\r\n");
                text.into_bytes()
            }
        };
        bytes.shrink_to_fit();
        bytes
    }

    /// Reads the next SIP message (skipping requests the server sends, which are returned
    /// through `next_request` instead). `None` on timeout.
    pub fn recv_message(&mut self, timeout: Duration) -> Option<SipMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.checked_duration_since(Instant::now())?;
            let bytes = match &mut self.link {
                Link::Udp(s) => {
                    s.set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
                        .unwrap();
                    let mut buf = vec![0u8; 65536];
                    match s.recv_from(&mut buf) {
                        Ok((n, _)) => buf[..n].to_vec(),
                        Err(_) => return None,
                    }
                }
                Link::Tcp(s, pending) => loop {
                    if let Some(len) = complete_message_len(pending) {
                        break pending.drain(..len).collect();
                    }
                    s.set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
                        .unwrap();
                    let mut buf = [0u8; 8192];
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                },
                Link::Tls(s, pending) => loop {
                    if let Some(len) = complete_message_len(pending) {
                        break pending.drain(..len).collect();
                    }
                    s.sock
                        .set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
                        .unwrap();
                    let mut buf = [0u8; 8192];
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                },
            };
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                continue; // keep-alive
            }
            match SipMessage::try_from(bytes.as_slice()) {
                Ok(m) => return Some(m),
                Err(e) => panic!(
                    "server sent a message rsip cannot parse ({e}):\n{}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
    }

    /// Next response (requests from the server are answered 200 and skipped).
    pub fn recv_reply(&mut self, timeout: Duration) -> Option<Reply> {
        loop {
            match self.recv_message(timeout)? {
                SipMessage::Response(r) => {
                    let reply = Reply {
                        status: r.status_code.code(),
                        raw: r.to_string(),
                        message: r,
                    };
                    self.received.push(reply.clone());
                    return Some(reply);
                }
                SipMessage::Request(req) => self.answer_request(&req),
            }
        }
    }

    /// Waits for a request from the server (e.g. its BYE), answering it 200.
    pub fn recv_request(&mut self, timeout: Duration) -> Option<rsip::Request> {
        loop {
            match self.recv_message(timeout)? {
                SipMessage::Request(req) => {
                    self.answer_request(&req);
                    return Some(req);
                }
                SipMessage::Response(r) => self.received.push(Reply {
                    status: r.status_code.code(),
                    raw: r.to_string(),
                    message: r,
                }),
            }
        }
    }

    fn answer_request(&mut self, req: &rsip::Request) {
        if req.method == rsip::Method::Ack {
            return;
        }
        let mut text = String::from("SIP/2.0 200 OK\r\n");
        for h in req.headers.iter() {
            let line = h.to_string();
            let name = line
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                text.push_str(&line);
                text.push_str("\r\n");
            }
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        self.send_raw(text.as_bytes());
    }

    /// Final response to the request just sent, skipping provisionals.
    pub fn final_reply(&mut self, timeout: Duration) -> Reply {
        loop {
            let r = self
                .recv_reply(timeout)
                .expect("no final response from the recorder");
            if r.status >= 200 {
                return r;
            }
        }
    }

    /// Sends an INVITE (initial or re-INVITE) and returns the final response, ACKing a 2xx.
    pub fn invite(&mut self, body: Option<(&str, &[u8])>, extra: &[String]) -> Reply {
        let bytes = self.send_invite(body, extra);
        let _ = bytes;
        let reply = self.final_reply(Duration::from_secs(5));
        if (200..300).contains(&reply.status) {
            if self.to_tag.is_none() {
                self.to_tag = reply.to_tag();
            }
            self.ack();
        } else if reply.status >= 300 {
            self.ack_non_2xx();
        }
        reply
    }

    /// Sends an INVITE without waiting; returns the bytes sent (to retransmit them).
    pub fn send_invite(&mut self, body: Option<(&str, &[u8])>, extra: &[String]) -> Vec<u8> {
        self.cseq += 1;
        let branch = self.new_branch();
        let mut headers: Vec<String> = Vec::new();
        if self.to_tag.is_none() {
            headers.push("Require: siprec".into());
            headers.push("Supported: timer".into());
            headers.push("Allow: INVITE, ACK, CANCEL, BYE, UPDATE, OPTIONS".into());
            headers.extend(self.extra_headers.iter().cloned());
        }
        headers.extend(extra.iter().cloned());
        let bytes = self.request("INVITE", &branch, self.cseq, &headers, body);
        self.last_invite_branch = branch;
        self.last_invite_cseq = self.cseq;
        self.send_raw(&bytes);
        bytes
    }

    /// ACK for a 2xx (new branch, same CSeq number).
    pub fn ack(&mut self) {
        let branch = self.new_branch();
        let bytes = self.request("ACK", &branch, self.last_invite_cseq, &[], None);
        self.send_raw(&bytes);
    }

    /// ACK for a non-2xx final response (same branch as the INVITE).
    fn ack_non_2xx(&mut self) {
        let branch = self.last_invite_branch.clone();
        let bytes = self.request("ACK", &branch, self.last_invite_cseq, &[], None);
        self.send_raw(&bytes);
    }

    /// CANCEL of the pending INVITE (same branch and CSeq number).
    pub fn cancel(&mut self) -> Reply {
        let branch = self.last_invite_branch.clone();
        let bytes = self.request("CANCEL", &branch, self.last_invite_cseq, &[], None);
        self.send_raw(&bytes);
        self.final_reply(Duration::from_secs(5))
    }

    /// A non-INVITE request in the dialog (BYE, UPDATE, INFO, OPTIONS ...).
    pub fn non_invite(
        &mut self,
        method: &str,
        body: Option<(&str, &[u8])>,
        extra: &[String],
    ) -> Reply {
        self.cseq += 1;
        let branch = self.new_branch();
        let bytes = self.request(method, &branch, self.cseq, extra, body);
        self.send_raw(&bytes);
        self.final_reply(Duration::from_secs(5))
    }

    pub fn bye(&mut self, extra: &[String]) -> Reply {
        self.non_invite("BYE", None, extra)
    }
}

/// Length of the first complete SIP message in `buf` (Content-Length framing), if complete.
fn complete_message_len(buf: &[u8]) -> Option<usize> {
    // Leading CRLF keep-alives belong to nobody.
    let start = buf.iter().position(|b| !b.is_ascii_whitespace())?;
    let head_end = buf[start..].windows(4).position(|w| w == b"\r\n\r\n")? + start + 4;
    let head = String::from_utf8_lossy(&buf[start..head_end]);
    let body_len = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            let n = n.trim();
            (n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("l"))
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + body_len).then_some(head_end + body_len)
}

/// One offered stream.
#[derive(Clone, Debug)]
pub struct OfferedStream {
    pub label: String,
    /// Where this stream's RTP comes from.
    pub port: u16,
    /// Payload type: 0 PCMU, 8 PCMA.
    pub pt: u8,
    /// `sendonly` normally, `inactive` to pause.
    pub direction: &'static str,
    /// Media-level `c=` address (the stream comes from elsewhere than the session's `c=`).
    pub connection: Option<std::net::IpAddr>,
}

impl OfferedStream {
    /// A `sendonly` audio stream from the session's address, as SRCs offer it.
    pub fn sendonly(label: &str, port: u16, pt: u8) -> Self {
        Self {
            label: label.into(),
            port,
            pt,
            direction: "sendonly",
            connection: None,
        }
    }
}

/// An SDP offer as a SIPREC client sends it (one m-line per stream, `a=label`, sendonly).
pub fn offer_sdp(ip: std::net::IpAddr, version: u32, streams: &[OfferedStream]) -> String {
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let mut sdp = format!(
        "v=0\r\no=SRC 700100 {version} IN {family} {ip}\r\ns=-\r\nc=IN {family} {ip}\r\nt=0 0\r\n"
    );
    for s in streams {
        let (name, pt) = if s.pt == 8 { ("PCMA", 8) } else { ("PCMU", 0) };
        sdp.push_str(&format!("m=audio {} RTP/AVP {pt} 101\r\n", s.port));
        if let Some(c) = s.connection {
            let family = if c.is_ipv4() { "IP4" } else { "IP6" };
            sdp.push_str(&format!("c=IN {family} {c}\r\n"));
        }
        sdp.push_str(&format!(
            "a=rtpmap:{pt} {name}/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n\
             a=label:{label}\r\na={dir}\r\n",
            label = s.label,
            dir = s.direction,
        ));
    }
    sdp
}

/// A participant in generated metadata.
#[derive(Clone, Debug)]
pub struct MetaParticipant {
    pub id: String,
    pub aor: String,
    pub name: String,
    /// Stream labels this participant sends.
    pub sends: Vec<String>,
}

/// RFC 7865 metadata (complete snapshot) for a session with `participants` and one stream per
/// label; `call_uuid` goes into a Genesys-style extension.
pub fn metadata_xml(
    call_uuid: Option<&str>,
    labels: &[&str],
    participants: &[MetaParticipant],
    time: &str,
) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">\n<datamode>complete</datamode>\n",
    );
    x.push_str(&format!(
        "<group group_id=\"grp-1\"><associate-time>{time}</associate-time>"
    ));
    if let Some(u) = call_uuid {
        x.push_str(&format!(
            "<extensiondata xmlns:ac=\"urn:ietf:params:xml:ns:Genesys\"><ac:GenesysUUID>{u}</ac:GenesysUUID></extensiondata>"
        ));
    }
    x.push_str("</group>\n<session session_id=\"sess-1\"><group-ref>grp-1</group-ref>");
    x.push_str(&format!("<start-time>{time}</start-time></session>\n"));
    for p in participants {
        x.push_str(&format!(
            "<participant participant_id=\"{}\"><nameID aor=\"{}\"><name xml:lang=\"en\">{}</name></nameID></participant>\n",
            p.id, p.aor, p.name
        ));
    }
    for l in labels {
        x.push_str(&format!(
            "<stream stream_id=\"st-{l}\" session_id=\"sess-1\"><label>{l}</label></stream>\n"
        ));
    }
    for p in participants {
        x.push_str(&format!(
            "<participantsessionassoc participant_id=\"{}\" session_id=\"sess-1\"><associate-time>{time}</associate-time></participantsessionassoc>\n",
            p.id
        ));
        x.push_str(&format!(
            "<participantstreamassoc participant_id=\"{}\">",
            p.id
        ));
        for s in &p.sends {
            x.push_str(&format!("<send>st-{s}</send>"));
        }
        x.push_str("</participantstreamassoc>\n");
    }
    x.push_str("</recording>\n");
    x
}

/// A multipart/mixed SIPREC body: `(content type, bytes)`.
pub fn siprec_body(sdp: &str, metadata: Option<&str>) -> (String, Vec<u8>) {
    match metadata {
        None => ("application/sdp".into(), sdp.as_bytes().to_vec()),
        Some(xml) => {
            let boundary = "rec-boundary-42";
            let body = format!(
                "--{boundary}\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n\
                 --{boundary}\r\nContent-Type: application/rs-metadata+xml\r\n\
                 Content-Disposition: recording-session\r\n\r\n{xml}\r\n--{boundary}--\r\n"
            );
            (
                format!("multipart/mixed;boundary={boundary}"),
                body.into_bytes(),
            )
        }
    }
}

/// A partial metadata update: `leaving` disassociates, `joining` associates and sends `label`.
pub fn metadata_transfer_xml(leaving: &str, joining: &MetaParticipant, time: &str) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">\n<datamode>partial</datamode>\n",
    );
    x.push_str(&format!(
        "<participant participant_id=\"{}\"><nameID aor=\"{}\"><name xml:lang=\"en\">{}</name></nameID></participant>\n",
        joining.id, joining.aor, joining.name
    ));
    x.push_str(&format!(
        "<participantsessionassoc participant_id=\"{leaving}\" session_id=\"sess-1\"><disassociate-time>{time}</disassociate-time></participantsessionassoc>\n"
    ));
    x.push_str(&format!(
        "<participantsessionassoc participant_id=\"{}\" session_id=\"sess-1\"><associate-time>{time}</associate-time></participantsessionassoc>\n",
        joining.id
    ));
    x.push_str(&format!(
        "<participantstreamassoc participant_id=\"{leaving}\"><disassociate-time>{time}</disassociate-time></participantstreamassoc>\n"
    ));
    x.push_str(&format!(
        "<participantstreamassoc participant_id=\"{}\">",
        joining.id
    ));
    for s in &joining.sends {
        x.push_str(&format!("<send>st-{s}</send>"));
    }
    x.push_str(&format!(
        "<associate-time>{time}</associate-time></participantstreamassoc>\n</recording>\n"
    ));
    x
}
