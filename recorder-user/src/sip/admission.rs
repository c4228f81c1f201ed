//! Admission under load: which incoming messages may wait behind new sessions and which may
//! not, decided from the raw bytes before anything is parsed.
//!
//! The transport keeps two queues to the driver: messages of live dialogs and transactions
//! (responses, CANCEL, BYE, anything with a To tag but ACK) go on the priority queue, since
//! losing them loses or corrupts a recording; new INVITEs and everything else go on a bounded
//! queue, and a new INVITE that finds it full is answered 503 at once
//! ([`super::Endpoint::overload_answer`]).

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Responses and requests of live dialogs or transactions.
    Priority,
    /// An INVITE without a To tag: a new session.
    NewInvite,
    /// Out-of-dialog requests other than INVITE, keep-alives and unparseable input.
    Other,
}

/// Methods that belong to an existing transaction or dialog even without a To tag (a CANCEL
/// copies the INVITE's To; a PRACK always has one, but be lenient).
const PRIORITY_METHODS: &[&[u8]] = &[b"CANCEL", b"BYE", b"PRACK"];

/// Classifies a message by its start line and To header only (cheap enough for every
/// datagram of a flood; the full parse happens in the endpoint).
pub fn classify(bytes: &[u8]) -> Class {
    if bytes.starts_with(b"SIP/2.0 ") {
        return Class::Priority;
    }
    let Some(space) = bytes.iter().take(32).position(|b| *b == b' ') else {
        return Class::Other;
    };
    let method = &bytes[..space];
    if PRIORITY_METHODS.contains(&method) {
        return Class::Priority;
    }
    // A flood's ACKs (one per final response it got) would crowd out the live calls' BYEs.
    // Losing one costs little: a 2xx is retransmitted until ACKed, and an ACK of a non-2xx
    // only ends a retransmission that Timer H ends anyway.
    if method == b"ACK" {
        return Class::Other;
    }
    let headers_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len());
    if to_has_tag(&bytes[..headers_end]) {
        return Class::Priority;
    }
    if method == b"INVITE" {
        Class::NewInvite
    } else {
        Class::Other
    }
}

/// Whether the To header (or its compact form `t`) carries a `tag` parameter.
fn to_has_tag(headers: &[u8]) -> bool {
    for line in headers.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if !(name.eq_ignore_ascii_case(b"to") || name.eq_ignore_ascii_case(b"t")) {
            continue;
        }
        // Parameters follow the URI's closing '>' when there is one (a URI may hold ';').
        let value = &line[colon + 1..];
        let params = match value.iter().rposition(|b| *b == b'>') {
            Some(gt) => &value[gt + 1..],
            None => value,
        };
        return params
            .split(|b| *b == b';')
            .skip(1)
            .any(|p| p.trim_ascii().to_ascii_lowercase().starts_with(b"tag="));
    }
    false
}

/// A response built from the raw request without parsing it (RFC 3261 §8.2.6: Via, From,
/// Call-ID and CSeq copied, a To tag added): cheap enough to answer a flood with, and usable
/// for requests too large to parse. `None` when the request lacks one of those headers, or is
/// an ACK (never answered) or a response.
pub fn raw_response(bytes: &[u8], status: u16, reason: &str, extra: &[String]) -> Option<Vec<u8>> {
    let space = bytes.iter().take(32).position(|b| *b == b' ')?;
    let method = &bytes[..space];
    if method == b"SIP/2.0" || method == b"ACK" {
        return None;
    }
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len());
    let mut out = format!("SIP/2.0 {status} {reason}\r\n").into_bytes();
    let (mut via, mut from, mut to, mut call_id, mut cseq) = (false, false, false, false, false);
    for line in bytes[..end].split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii().to_ascii_lowercase();
        let seen = match name.as_slice() {
            b"via" | b"v" => &mut via,
            b"from" | b"f" => &mut from,
            b"call-id" | b"i" => &mut call_id,
            b"cseq" => &mut cseq,
            b"to" | b"t" => &mut to,
            _ => continue,
        };
        // Only Via may repeat; a second From, To, Call-ID or CSeq makes the request unusable.
        if *seen && name != b"via" && name != b"v" {
            return None;
        }
        *seen = true;
        out.extend_from_slice(line);
        if (name == b"to" || name == b"t") && !to_has_tag(&[b"\n", line].concat()) {
            out.extend_from_slice(format!(";tag={:08x}", rand::random::<u32>()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    if !(via && from && to && call_id && cseq) {
        return None;
    }
    for header in extra {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &[u8] = b"INVITE sip:srs@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:srs@10.0.0.1>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n";
    const RE: &[u8] = b"INVITE sip:srs@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK2\r\nFrom: <sip:a@b>;tag=1\r\nt: <sip:srs@10.0.0.1;transport=udp> ; Tag=abc\r\nCall-ID: x\r\nCSeq: 2 INVITE\r\n\r\n";

    #[test]
    fn new_invites_in_dialog_requests_and_the_rest() {
        assert_eq!(classify(NEW), Class::NewInvite);
        assert_eq!(classify(RE), Class::Priority);
        assert_eq!(classify(b"SIP/2.0 200 OK\r\n\r\n"), Class::Priority);
        assert_eq!(classify(b"BYE sip:a SIP/2.0\r\n\r\n"), Class::Priority);
        assert_eq!(
            classify(b"ACK sip:a SIP/2.0\r\nTo: <sip:a>;tag=1\r\n\r\n"),
            Class::Other
        );
        assert_eq!(classify(b"CANCEL sip:a SIP/2.0\r\n\r\n"), Class::Priority);
        assert_eq!(
            classify(b"OPTIONS sip:a SIP/2.0\r\nTo: <sip:a>\r\n\r\n"),
            Class::Other
        );
        assert_eq!(classify(b"\x00\x01garbage"), Class::Other);
        assert_eq!(classify(b""), Class::Other);
        // A `tag=` inside the URI is not a To tag.
        assert_eq!(
            classify(b"INVITE sip:a SIP/2.0\r\nTo: <sip:a;tag=x>\r\n\r\n"),
            Class::NewInvite
        );
        // A To tag in the body does not count.
        assert_eq!(
            classify(b"INVITE sip:a SIP/2.0\r\nTo: <sip:a>\r\n\r\nTo: <sip:b>;tag=1\r\n"),
            Class::NewInvite
        );
    }

    #[test]
    fn raw_responses_copy_the_headers_and_add_a_to_tag() {
        let r = raw_response(NEW, 503, "Overloaded", &["Retry-After: 5".into()]).unwrap();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("SIP/2.0 503 Overloaded\r\n"), "{text}");
        assert!(
            text.contains("Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1\r\n"),
            "{text}"
        );
        assert!(text.contains("To: <sip:srs@10.0.0.1>;tag="), "{text}");
        assert!(text.contains("Call-ID: x\r\nCSeq: 1 INVITE\r\n"), "{text}");
        assert!(
            text.ends_with("Retry-After: 5\r\nContent-Length: 0\r\n\r\n"),
            "{text}"
        );
        // An existing To tag is kept, not doubled.
        let text = String::from_utf8(raw_response(RE, 503, "x", &[]).unwrap()).unwrap();
        assert_eq!(text.matches("Tag=abc").count(), 1, "{text}");
        assert_eq!(text.matches("ag=").count(), 2, "{text}");
        // No answer without the headers a response needs, nor to ACKs and responses.
        assert!(raw_response(b"INVITE sip:a SIP/2.0\r\nVia: x\r\n\r\n", 503, "x", &[]).is_none());
        assert!(raw_response(b"ACK sip:a SIP/2.0\r\n\r\n", 503, "x", &[]).is_none());
        assert!(raw_response(b"SIP/2.0 200 OK\r\n\r\n", 503, "x", &[]).is_none());
    }
}
