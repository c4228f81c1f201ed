//! Admission under load: which incoming messages may wait behind new sessions and which may
//! not, decided from the raw bytes before anything is parsed.
//!
//! The transport keeps two queues to the driver: messages of live dialogs and transactions
//! (responses, ACK, CANCEL, BYE, anything with a To tag) go on the priority queue, since
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
const PRIORITY_METHODS: &[&[u8]] = &[b"ACK", b"CANCEL", b"BYE", b"PRACK"];

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
        assert_eq!(classify(b"ACK sip:a SIP/2.0\r\n\r\n"), Class::Priority);
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
}
