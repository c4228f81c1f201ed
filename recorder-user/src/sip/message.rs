//! Parsing with rsip, the narrow pre-normalisation rsip needs, and header helpers.
//!
//! rsip 0.4 quirks handled here (each has a test below):
//! * compact header names (`v:`, `f:`, `t:`, `i:`, `m:`, `l:`, `c:`, `k:`, ...) are not
//!   recognised: they would land in `Header::Other` and the typed accessors would miss them, so
//!   they are expanded to the long names first;
//! * folded header lines (RFC 3261 §7.3.1 continuation lines) make the whole parse fail, so they
//!   are unfolded;
//! * an unknown method fails the whole parse, so it is re-parsed with a stand-in method to be
//!   able to answer 501;
//! * the body is "everything after the blank line", so a UDP body is cut to `Content-Length`;
//! * several Via values in one header line are not split, so the top Via is cut at the comma;
//! * a bracketed IPv6 reference (`sip:srs@[2001:db8::1]:5060`, `Via: SIP/2.0/UDP [::1]:5060`)
//!   is split at its first colon and fails the whole parse, so IPv6 references in the header
//!   section are rewritten to marker domains (`v6lit-2001-db8--1.v6lit`) before parsing and
//!   written back by [`restore_ipv6`] on everything the endpoint sends. The app sees the marker
//!   in hosts of parsed URIs; [`marker_ip`] turns it back into an address.

use std::borrow::Cow;

use rsip::{
    headers::{ToTypedHeader, UntypedHeader},
    prelude::HeadersExt,
    Header,
};

use super::framing;

/// What an incoming datagram or TCP frame turned out to be.
#[derive(Debug)]
pub(crate) enum Parsed {
    Request(rsip::Request),
    Response(rsip::Response),
    /// A request that cannot be processed, but enough of it parsed to answer it with `status`.
    /// `request` holds the salvaged headers (its method and URI may be stand-ins).
    Unprocessable {
        request: rsip::Request,
        status: u16,
        reason: String,
    },
    /// Nothing can be answered: drop it and count it.
    Garbage(String),
}

/// Headers that are enough to build a response when the rest of a request is broken.
const ESSENTIAL: [&str; 5] = ["via", "from", "to", "call-id", "cseq"];

/// Parses one message. `datagram` is true for UDP, where the body is bounded by
/// `Content-Length` rather than by the framing.
pub(crate) fn parse(bytes: &[u8], datagram: bool) -> Parsed {
    let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return salvage_or_garbage(bytes, "Missing blank line after headers".into());
    };
    let (head, body) = (&bytes[..split + 2], &bytes[split + 4..]);
    let head = normalise_head(head);
    let mut body = body;
    if datagram {
        match framing::content_length(&head) {
            Ok(Some(len)) if len > body.len() => {
                return salvage_or_garbage(&head, "Content-Length exceeds the body".into())
            }
            Ok(Some(len)) => body = &body[..len],
            Ok(None) => {}
            Err(e) => return salvage_or_garbage(&head, format!("Bad Content-Length ({e})")),
        }
    }
    let mut message = Vec::with_capacity(head.len() + 2 + body.len());
    message.extend_from_slice(&head);
    message.extend_from_slice(b"\r\n");
    message.extend_from_slice(body);
    match rsip::SipMessage::try_from(message.as_slice()) {
        Ok(rsip::SipMessage::Request(r)) => Parsed::Request(r),
        Ok(rsip::SipMessage::Response(r)) => Parsed::Response(r),
        Err(e) => {
            let reason = diagnose(&head).unwrap_or_else(|| format!("Malformed message ({e})"));
            salvage_or_garbage(&head, reason)
        }
    }
}

/// Unfolds continuation lines and expands compact header names. `head` ends with one CRLF.
fn normalise_head(head: &[u8]) -> Cow<'_, [u8]> {
    let head = mask_ipv6(head);
    match unfold_and_expand(&head) {
        Cow::Borrowed(_) => head,
        Cow::Owned(v) => Cow::Owned(v),
    }
}

const V6_PREFIX: &str = "v6lit-";
const V6_SUFFIX: &str = ".v6lit";

/// Rewrites `[IPv6]` references to marker domains rsip can parse (see the module doc).
fn mask_ipv6(head: &[u8]) -> Cow<'_, [u8]> {
    if !head.contains(&b'[') {
        return Cow::Borrowed(head);
    }
    let mut out = Vec::with_capacity(head.len() + 16);
    let mut rest = head;
    while let Some(open) = rest.iter().position(|b| *b == b'[') {
        out.extend_from_slice(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.iter().position(|b| *b == b']');
        match close {
            Some(close)
                if std::str::from_utf8(&after[..close])
                    .is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok()) =>
            {
                out.extend_from_slice(V6_PREFIX.as_bytes());
                out.extend(
                    after[..close]
                        .iter()
                        .map(|b| if *b == b':' { b'-' } else { *b }),
                );
                out.extend_from_slice(V6_SUFFIX.as_bytes());
                rest = &after[close + 1..];
            }
            _ => {
                out.push(b'[');
                rest = after;
            }
        }
    }
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// Writes `[IPv6]` references back in place of the markers of [`mask_ipv6`].
pub fn restore_ipv6(text: &str) -> Cow<'_, str> {
    if !text.contains(V6_PREFIX) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(V6_PREFIX) {
        out.push_str(&rest[..start]);
        let after = &rest[start + V6_PREFIX.len()..];
        match after.find(V6_SUFFIX) {
            Some(end)
                if after[..end]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'.') =>
            {
                out.push('[');
                out.push_str(&after[..end].replace('-', ":"));
                out.push(']');
                rest = &after[end + V6_SUFFIX.len()..];
            }
            _ => {
                out.push_str(V6_PREFIX);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The address behind a host, including the IPv6 markers of the module doc.
pub fn marker_ip(host: &rsip::Host) -> Option<std::net::IpAddr> {
    match host {
        rsip::Host::IpAddr(ip) => Some(*ip),
        rsip::Host::Domain(d) => {
            let d = d.to_string();
            let inner = d.strip_prefix(V6_PREFIX)?.strip_suffix(V6_SUFFIX)?;
            inner
                .replace('-', ":")
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(Into::into)
        }
    }
}

fn unfold_and_expand(head: &[u8]) -> Cow<'_, [u8]> {
    let needs_work = head.split(|b| *b == b'\n').skip(1).any(|line| {
        line.first().is_some_and(|b| *b == b' ' || *b == b'\t') || compact(line).is_some()
    });
    if !needs_work {
        return Cow::Borrowed(head);
    }
    let mut out: Vec<u8> = Vec::with_capacity(head.len() + 64);
    for (i, line) in head.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if i > 0 && (line[0] == b' ' || line[0] == b'\t') {
            // Continuation: replaces the preceding CRLF and the leading whitespace by one SP.
            if out.ends_with(b"\r\n") {
                out.truncate(out.len() - 2);
            }
            out.push(b' ');
            out.extend_from_slice(line.trim_ascii_start());
        } else if let (true, Some((long, rest))) = (i > 0, compact(line)) {
            out.extend_from_slice(long.as_bytes());
            out.extend_from_slice(rest);
        } else {
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b"\r\n");
    }
    Cow::Owned(out)
}

/// If `line` starts with a compact header name, its long name and the rest from the colon on.
fn compact(line: &[u8]) -> Option<(&'static str, &[u8])> {
    let colon = line.iter().position(|b| *b == b':')?;
    let name = line[..colon].trim_ascii_end();
    if name.len() != 1 {
        return None;
    }
    let long = match name[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'f' => "From",
        b't' => "To",
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'e' => "Content-Encoding",
        b'k' => "Supported",
        b's' => "Subject",
        b'x' => "Session-Expires",
        b'o' => "Event",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'u' => "Allow-Events",
        _ => return None,
    };
    Some((long, &line[colon..]))
}

/// Says which part of a header section rsip rejected, for the 400 reason phrase.
fn diagnose(head: &[u8]) -> Option<String> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = lines.next()?;
    let Ok(start) = std::str::from_utf8(start) else {
        return Some("Request line is not UTF-8".into());
    };
    let parts: Vec<&str> = start.split(' ').collect();
    if parts.len() != 3 {
        return Some("Malformed request line".into());
    }
    if !parts[2].eq_ignore_ascii_case("SIP/2.0") && !parts[0].starts_with("SIP/") {
        return Some(UNSUPPORTED_VERSION.into());
    }
    if !parts[0].starts_with("SIP/") {
        let probe = format!("OPTIONS {} SIP/2.0\r\n\r\n", parts[1]);
        if rsip::Request::try_from(probe.as_str()).is_err() {
            return Some("Malformed Request-URI".into());
        }
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let name_end = line.iter().position(|b| *b == b':');
        let name = name_end.map(|n| line[..n].trim_ascii_end());
        match name {
            Some(name) if !name.is_empty() && name.iter().all(|b| is_token(*b)) => {
                if std::str::from_utf8(line).is_err() {
                    return Some(format!(
                        "Header {} is not UTF-8",
                        String::from_utf8_lossy(name)
                    ));
                }
                let name = String::from_utf8_lossy(name);
                let value = String::from_utf8_lossy(&line[name_end.unwrap_or(0) + 1..]);
                if let Some(problem) = essential_header_problem(&name, value.trim()) {
                    return Some(problem);
                }
            }
            _ => {
                let shown: String = String::from_utf8_lossy(line).chars().take(20).collect();
                return Some(format!("Malformed header line {shown:?}"));
            }
        }
    }
    None
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Checks the typed form of the headers a transaction depends on.
fn essential_header_problem(name: &str, value: &str) -> Option<String> {
    let bad = |n: &str| Some(format!("Malformed {n} header"));
    if name.eq_ignore_ascii_case("via") {
        return top_via_value(value)
            .and_then(|v| parse_via(v).ok())
            .map_or(bad("Via"), |_| None);
    }
    if name.eq_ignore_ascii_case("cseq") {
        return rsip::headers::CSeq::new(value)
            .typed()
            .map_or(bad("CSeq"), |_| None);
    }
    if name.eq_ignore_ascii_case("from") {
        return rsip::headers::From::new(value)
            .typed()
            .map_or(bad("From"), |_| None);
    }
    if name.eq_ignore_ascii_case("to") {
        return rsip::headers::To::new(value)
            .typed()
            .map_or(bad("To"), |_| None);
    }
    None
}

/// Rebuilds a request from only its essential header lines, to be able to answer it.
fn salvage_or_garbage(head: &[u8], reason: String) -> Parsed {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = lines.next().unwrap_or_default();
    if start.starts_with(b"SIP/") {
        return Parsed::Garbage(format!("unparseable response: {reason}"));
    }
    let method = start.split(|b| *b == b' ').next().unwrap_or_default();
    if method.eq_ignore_ascii_case(b"ACK") {
        // Never answered, whatever is wrong with it.
        return Parsed::Garbage(format!("unparseable ACK: {reason}"));
    }
    let mut text = String::from("OPTIONS sip:invalid SIP/2.0\r\n");
    for line in lines {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let Some((name, _)) = line.split_once(':') else {
            continue;
        };
        if ESSENTIAL
            .iter()
            .any(|e| name.trim().eq_ignore_ascii_case(e))
        {
            text.push_str(line);
            text.push_str("\r\n");
        }
    }
    text.push_str("\r\n");
    let Ok(request) = rsip::Request::try_from(text.as_str()) else {
        return Parsed::Garbage(reason);
    };
    if lenient_facts(&request).is_none() {
        return Parsed::Garbage(reason);
    }
    // §8.2.2.1 wants 505 for a version we do not speak; everything else is a 400.
    let status = if reason == UNSUPPORTED_VERSION {
        505
    } else {
        400
    };
    Parsed::Unprocessable {
        request,
        status,
        reason,
    }
}

const UNSUPPORTED_VERSION: &str = "Unsupported SIP version";

/// Parses a request whose method rsip does not know, to answer it with 501.
pub(crate) fn parse_unknown_method(bytes: &[u8]) -> Option<(String, rsip::Request)> {
    let space = bytes.iter().position(|b| *b == b' ')?;
    let method = std::str::from_utf8(&bytes[..space]).ok()?;
    if method.is_empty() || !method.bytes().all(is_token) || method.parse::<rsip::Method>().is_ok()
    {
        return None;
    }
    let mut patched = b"OPTIONS".to_vec();
    patched.extend_from_slice(&bytes[space..]);
    match parse(&patched, true) {
        Parsed::Request(r) => Some((method.to_string(), r)),
        _ => None,
    }
}

/// The facts of the top Via header a transaction needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopVia {
    pub branch: String,
    /// `host[:port]` as sent, the third part of the transaction key.
    pub sent_by: String,
    pub host: rsip::Host,
    pub port: Option<u16>,
    pub rport: bool,
}

/// The first value of a Via header line (`Via: a, b` carries two).
fn top_via_value(value: &str) -> Option<&str> {
    let first = value.split(',').next()?.trim();
    (!first.is_empty()).then_some(first)
}

fn parse_via(value: &str) -> Result<rsip::typed::Via, rsip::Error> {
    rsip::headers::Via::new(value).typed()
}

pub(crate) fn top_via(headers: &rsip::Headers) -> Result<TopVia, String> {
    let raw = headers
        .iter()
        .find_map(|h| match h {
            Header::Via(v) => Some(v.value()),
            _ => None,
        })
        .ok_or("Missing Via header")?;
    let via = top_via_value(raw)
        .and_then(|v| parse_via(v).ok())
        .ok_or("Malformed Via header")?;
    let branch = via.branch().map(|b| b.to_string()).unwrap_or_default();
    let rport = via.params.iter().any(
        |p| matches!(p, rsip::Param::Other(name, _) if name.value().eq_ignore_ascii_case("rport")),
    );
    let host = match marker_ip(&via.uri.host_with_port.host) {
        Some(ip) => rsip::Host::IpAddr(ip),
        None => via.uri.host_with_port.host.clone(),
    };
    Ok(TopVia {
        branch,
        sent_by: via.uri.host_with_port.to_string().to_ascii_lowercase(),
        host,
        port: via.uri.host_with_port.port.map(|p| *p.value()),
        rport,
    })
}

/// The tag parameter of a From or To value.
pub(crate) fn tag_param(params: &[rsip::Param]) -> Option<String> {
    params.iter().find_map(|p| match p {
        rsip::Param::Tag(t) => Some(t.value().to_string()),
        _ => None,
    })
}

/// The dialog-relevant facts of a request, checked once on arrival.
#[derive(Debug, Clone)]
pub(crate) struct RequestFacts {
    pub via: TopVia,
    pub call_id: String,
    pub from_tag: Option<String>,
    pub to_tag: Option<String>,
    pub cseq: u32,
    pub cseq_method: rsip::Method,
}

/// Checks the headers every request must carry (RFC 3261 §8.1.1) and extracts what the
/// transaction and dialog layers key on. The error is the 400 reason phrase.
pub(crate) fn required_headers(request: &rsip::Request) -> Result<RequestFacts, String> {
    let via = top_via(&request.headers)?;
    let from = request.from_header().map_err(|_| "Missing From header")?;
    let from = from.typed().map_err(|_| "Malformed From header")?;
    let to = request.to_header().map_err(|_| "Missing To header")?;
    let to = to.typed().map_err(|_| "Malformed To header")?;
    let call_id = request
        .call_id_header()
        .map_err(|_| "Missing Call-ID header")?;
    let call_id = call_id.value().trim().to_string();
    if call_id.is_empty() {
        return Err("Empty Call-ID header".into());
    }
    let cseq = request.cseq_header().map_err(|_| "Missing CSeq header")?;
    let cseq = cseq.typed().map_err(|_| "Malformed CSeq header")?;
    Ok(RequestFacts {
        via,
        call_id,
        from_tag: tag_param(&from.params),
        to_tag: tag_param(&to.params),
        cseq: cseq.seq,
        cseq_method: cseq.method,
    })
}

/// What can be read from a request whose mandatory headers are incomplete: enough to answer
/// it with a 400 as long as the top Via is usable.
pub(crate) fn lenient_facts(request: &rsip::Request) -> Option<RequestFacts> {
    let via = top_via(&request.headers).ok()?;
    let to_tag = request
        .to_header()
        .ok()
        .and_then(|t| t.typed().ok())
        .and_then(|t| tag_param(&t.params));
    Some(RequestFacts {
        via,
        call_id: String::new(),
        from_tag: None,
        to_tag,
        cseq: 0,
        cseq_method: request.method,
    })
}

/// Values of every header with this name (case-insensitive), comma-separated lists split.
pub(crate) fn header_tokens(headers: &rsip::Headers, name: &str) -> Vec<String> {
    headers
        .iter()
        .filter_map(|h| {
            let text = h.to_string();
            let (n, v) = text.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.to_string())
        })
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Max-Forwards as a number, when present and numeric.
pub(crate) fn max_forwards(request: &rsip::Request) -> Option<u32> {
    request.headers.iter().find_map(|h| match h {
        Header::MaxForwards(m) => m.value().trim().parse().ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> rsip::Request {
        match parse(text.as_bytes(), true) {
            Parsed::Request(r) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    const BASE: &str = "INVITE sip:srs@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKabc;rport\r\nFrom: \"Rec Client\" <sip:src@10.0.0.2>;tag=f1\r\nTo: <sip:srs@10.0.0.1>\r\nCall-ID: c1@10.0.0.2\r\nCSeq: 7 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn required_headers_of_a_plain_invite() {
        let facts = required_headers(&req(BASE)).unwrap();
        assert_eq!(facts.via.branch, "z9hG4bKabc");
        assert_eq!(facts.via.sent_by, "10.0.0.2:5062");
        assert!(facts.via.rport);
        assert_eq!(facts.call_id, "c1@10.0.0.2");
        assert_eq!(facts.from_tag.as_deref(), Some("f1"));
        assert_eq!(facts.to_tag, None);
        assert_eq!((facts.cseq, facts.cseq_method), (7, rsip::Method::Invite));
    }

    #[test]
    fn compact_and_folded_headers_are_normalised() {
        let text = "OPTIONS sip:srs@10.0.0.1 SIP/2.0\r\nv: SIP/2.0/TCP 10.0.0.2;branch=z9hG4bKx\r\nf: <sip:a@b>;tag=9\r\nt: <sip:srs@10.0.0.1>\r\ni: abc\r\nCSeq: 1\r\n  OPTIONS\r\nl: 0\r\n\r\n";
        let r = req(text);
        let facts = required_headers(&r).unwrap();
        assert_eq!(facts.call_id, "abc");
        assert_eq!(facts.cseq_method, rsip::Method::Options);
        assert_eq!(facts.via.sent_by, "10.0.0.2");
    }

    #[test]
    fn udp_body_is_cut_to_content_length() {
        let text = BASE.replace("Content-Length: 0", "Content-Length: 3") + "abcdef";
        assert_eq!(req(&text).body, b"abc");
        let short = BASE.replace("Content-Length: 0", "Content-Length: 30") + "abc";
        assert!(matches!(
            parse(short.as_bytes(), true),
            Parsed::Unprocessable { status: 400, .. }
        ));
    }

    #[test]
    fn top_via_of_a_multi_value_line() {
        let text = BASE.replace(
            "Via: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKabc;rport",
            "Via: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKabc, SIP/2.0/UDP proxy.example;branch=z9hG4bKp",
        );
        let facts = required_headers(&req(&text)).unwrap();
        assert_eq!(facts.via.branch, "z9hG4bKabc");
        assert!(!facts.via.rport);
    }

    #[test]
    fn ipv6_sent_by() {
        let text = BASE.replace("10.0.0.2:5062;branch", "[2001:db8::2]:5062;branch");
        let facts = required_headers(&req(&text)).unwrap();
        assert_eq!(facts.via.port, Some(5062));
        assert!(matches!(facts.via.host, rsip::Host::IpAddr(ip) if ip.is_ipv6()));
    }

    #[test]
    fn ipv6_request_uri_and_contact_round_trip() {
        let text = BASE
            .replace("sip:srs@10.0.0.1 SIP", "sip:srs@[2001:db8::1]:5060 SIP")
            .replace(
                "Max-Forwards: 70",
                "Contact: <sip:src@[2001:db8::2]:5062>;+sip.src",
            );
        let r = req(&text);
        assert_eq!(
            marker_ip(r.uri.host()),
            Some("2001:db8::1".parse().unwrap())
        );
        let restored = restore_ipv6(&r.to_string()).into_owned();
        assert!(
            restored.starts_with("INVITE sip:srs@[2001:db8::1]:5060 SIP/2.0"),
            "{restored}"
        );
        assert!(
            restored.contains("<sip:src@[2001:db8::2]:5062>"),
            "{restored}"
        );
        // Something that only looks like brackets is left alone.
        assert_eq!(restore_ipv6("a [b] v6lit-zz"), "a [b] v6lit-zz");
        assert_eq!(mask_ipv6(b"x [not:v6] y").as_ref(), b"x [not:v6] y");
    }

    #[test]
    fn broken_header_is_named_in_the_reason() {
        let text = BASE.replace("Max-Forwards: 70\r\n", "this is not a header\r\n");
        match parse(text.as_bytes(), true) {
            Parsed::Unprocessable {
                status,
                reason,
                request,
            } => {
                assert_eq!(status, 400);
                assert!(reason.contains("Malformed header line"), "{reason}");
                assert!(required_headers(&request).is_ok());
            }
            other => panic!("{other:?}"),
        }
        let text = BASE.replace("CSeq: 7 INVITE", "CSeq: seven INVITE");
        match parse(text.as_bytes(), true) {
            Parsed::Request(r) => {
                assert_eq!(required_headers(&r).unwrap_err(), "Malformed CSeq header")
            }
            Parsed::Unprocessable { reason, .. } => assert!(reason.contains("CSeq"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_request_uri_is_diagnosed() {
        let text = BASE.replace("INVITE sip:srs@10.0.0.1 SIP/2.0", "INVITE ::: SIP/2.0");
        match parse(text.as_bytes(), true) {
            Parsed::Unprocessable { reason, .. } => assert_eq!(reason, "Malformed Request-URI"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_method_is_reparsed() {
        let text = BASE
            .replace("INVITE sip", "FROBNICATE sip")
            .replace("7 INVITE", "7 FROBNICATE");
        let (method, r) = parse_unknown_method(text.as_bytes()).unwrap();
        assert_eq!(method, "FROBNICATE");
        assert_eq!(r.call_id_header().unwrap().value(), "c1@10.0.0.2");
    }

    #[test]
    fn other_sip_versions_get_505() {
        let text = BASE.replace("sip:srs@10.0.0.1 SIP/2.0", "sip:srs@10.0.0.1 SIP/3.0");
        match parse(text.as_bytes(), true) {
            Parsed::Unprocessable { status, reason, .. } => {
                assert_eq!((status, reason.as_str()), (505, UNSUPPORTED_VERSION))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_garbage() {
        assert!(matches!(parse(b"\x00\x01\x02", true), Parsed::Garbage(_)));
        assert!(matches!(
            parse(b"SIP/2.0 200\r\n\r\n", true),
            Parsed::Garbage(_)
        ));
    }
}
