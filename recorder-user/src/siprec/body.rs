//! Splitting a recording request body into its SDP and metadata parts.
//!
//! SIPREC bodies are small `multipart/mixed` documents (RFC 2046) with at most a handful of parts.
//! The available multipart crates target HTTP form uploads (async, streaming, `form-data`) or
//! e-mail (charset and transfer decoding), and none tolerates the SIP quirks we must accept
//! (per-part `Content-Length`, BroadWorks' `application/ +xml`), so this is a small splitter over
//! delimiter lines. Part headers are unfolded and parsed here; the parts themselves are handed
//! to the SDP and XML parsers.

use quick_xml::events::Event;
use thiserror::Error;

use super::MAX_BODY_LEN;

/// The parts of a recording request body that matter to us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordingBody {
    /// The `application/sdp` part (the first one, if several).
    pub sdp: Option<String>,
    /// The metadata part (`application/rs-metadata+xml`, `application/rs-metadata`, or an XML
    /// part whose root looks like recording metadata).
    pub metadata: Option<String>,
    /// Content types of the parts that were skipped, in body order (`(none)` when a part had none).
    pub ignored_parts: Vec<String>,
    /// Cisco `application/gtd` global call id (`GCI,<hex>`), if present.
    pub gci: Option<String>,
}

/// Why a body was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    /// A single-part body of a type we cannot use (answer 415).
    #[error("unsupported body type {0:?}")]
    UnsupportedType(String),
    /// The body or its multipart structure is broken (answer 400 with the reason).
    #[error("malformed body: {0}")]
    Malformed(String),
    /// Larger than [`MAX_BODY_LEN`].
    #[error("body of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
}

impl BodyError {
    /// The SIP response code for a request whose body fails this way.
    pub fn status_code(&self) -> u16 {
        match self {
            BodyError::UnsupportedType(_) => 415,
            BodyError::Malformed(_) => 400,
            BodyError::TooLarge { .. } => 413,
        }
    }
}

/// What a body part is, judged from its media type (and for XML, its root element).
#[derive(Debug, PartialEq, Eq)]
enum PartKind {
    Sdp,
    Metadata,
    Multipart,
    Gtd,
    Other,
}

/// Splits a request body according to its `Content-Type` header value.
pub fn split_body(content_type: Option<&str>, body: &[u8]) -> Result<RecordingBody, BodyError> {
    if body.len() > MAX_BODY_LEN {
        return Err(BodyError::TooLarge {
            size: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let mut out = RecordingBody::default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(out);
    }
    let Some(content_type) = content_type.filter(|ct| !ct.trim().is_empty()) else {
        return Err(BodyError::Malformed("body without Content-Type".into()));
    };
    let (mime, params) = parse_media_type(content_type);
    match classify(&mime, body) {
        PartKind::Sdp => out.sdp = Some(utf8(body, "SDP body")?),
        PartKind::Metadata => out.metadata = Some(utf8(body, "metadata body")?),
        PartKind::Multipart => {
            let boundary = params
                .iter()
                .find(|(name, _)| name == "boundary")
                .map(|(_, value)| value.as_str())
                .filter(|b| !b.is_empty() && b.len() <= 200)
                .ok_or_else(|| BodyError::Malformed("multipart body without boundary".into()))?;
            for (index, part) in split_multipart(body, boundary)?.into_iter().enumerate() {
                take_part(&mut out, index, part)?;
            }
        }
        PartKind::Gtd | PartKind::Other => return Err(BodyError::UnsupportedType(mime)),
    }
    Ok(out)
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, BodyError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| BodyError::Malformed(format!("{what} is not UTF-8: {e}")))
}

/// Files one multipart part into `out`.
fn take_part(out: &mut RecordingBody, index: usize, part: &[u8]) -> Result<(), BodyError> {
    let (headers, content) = split_part_headers(part)
        .ok_or_else(|| BodyError::Malformed(format!("part {} has broken headers", index + 1)))?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    // Per-part Content-Length (BroadWorks): the delimiters are authoritative (RFC 2046), so the
    // length only trims trailing blank lines; a wrong length never cuts content.
    let content = match header("Content-Length").and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(len) if len <= content.len() && content[len..].trim_ascii().is_empty() => {
            &content[..len]
        }
        _ => content,
    };
    let (mime, kind) = match header("Content-Type") {
        Some(ct) => {
            let (mime, _) = parse_media_type(ct);
            let kind = classify(&mime, content);
            (mime, kind)
        }
        None => ("(none)".to_string(), sniff(content)),
    };
    let label = format!("part {}", index + 1);
    match kind {
        PartKind::Sdp if out.sdp.is_none() => out.sdp = Some(utf8(content, &label)?),
        PartKind::Metadata if out.metadata.is_none() => out.metadata = Some(utf8(content, &label)?),
        PartKind::Gtd => {
            if out.gci.is_none() {
                out.gci = gtd_gci(content);
            }
            out.ignored_parts.push(mime);
        }
        _ => out.ignored_parts.push(mime),
    }
    Ok(())
}

/// Lower-cased `type/subtype` with all whitespace removed (so `application/ +xml` stays
/// recognisable) and lower-cased parameter names with unquoted values.
fn parse_media_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut pieces = split_params(value).into_iter();
    let mime: String = pieces
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let params = pieces
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Some((name.trim().to_ascii_lowercase(), value.to_string()))
        })
        .collect();
    (mime, params)
}

/// Splits on `;` outside double quotes (a quoted boundary may contain `;`).
fn split_params(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

fn classify(mime: &str, content: &[u8]) -> PartKind {
    match mime {
        "application/sdp" => PartKind::Sdp,
        "application/rs-metadata+xml" | "application/rs-metadata" => PartKind::Metadata,
        "multipart/mixed" | "multipart/related" => PartKind::Multipart,
        "application/gtd" => PartKind::Gtd,
        // BroadWorks sends `application/ +xml`; accept any XML type whose root looks like metadata.
        m if m.ends_with("+xml") || m == "application/xml" || m == "text/xml" => {
            if looks_like_metadata(content) {
                PartKind::Metadata
            } else {
                PartKind::Other
            }
        }
        _ => PartKind::Other,
    }
}

/// Type of a part that came without `Content-Type`.
fn sniff(content: &[u8]) -> PartKind {
    let start = content.trim_ascii_start();
    if start.starts_with(b"v=") {
        PartKind::Sdp
    } else if looks_like_metadata(content) {
        PartKind::Metadata
    } else {
        PartKind::Other
    }
}

/// True when the first element of `content` is named like a recording metadata root
/// (`recording`, BroadWorks `recording_metadata`), whatever its prefix.
fn looks_like_metadata(content: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(content) else {
        return false;
    };
    let mut reader = quick_xml::Reader::from_str(text);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) => {
                let name = e.local_name();
                return std::str::from_utf8(name.as_ref())
                    .is_ok_and(|n| n.to_ascii_lowercase().starts_with("recording"));
            }
            Ok(Event::Eof) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// The `GCI,<hex>` value of an ISUP GTD body.
fn gtd_gci(content: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("GCI,")?;
        let gci: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        (!gci.is_empty()).then_some(gci)
    })
}

/// Byte ranges of lines, each without its `\n` / `\r\n`: (start, end_of_content, next_start).
fn lines(body: &[u8]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= body.len() {
            return None;
        }
        let start = pos;
        let (end, next) = match body[start..].iter().position(|&b| b == b'\n') {
            Some(i) => (start + i, start + i + 1),
            None => (body.len(), body.len()),
        };
        pos = next;
        let end = if end > start && body[end - 1] == b'\r' {
            end - 1
        } else {
            end
        };
        Some((start, end, next))
    })
}

/// The parts between `--boundary` delimiter lines (RFC 2046 §5.1.1). The preamble and the
/// epilogue are dropped; whitespace after a delimiter is allowed. A missing close delimiter is
/// tolerated (the last part runs to the end of the body).
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<&'a [u8]>, BodyError> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    // Start of the current part's content, once the first delimiter was seen.
    let mut open: Option<usize> = None;
    let mut closed = false;
    for (start, end, next) in lines(body) {
        let line = body[start..end].trim_ascii_end();
        let Some(rest) = line.strip_prefix(delimiter) else {
            continue;
        };
        let is_close = match rest {
            b"" => false,
            b"--" => true,
            _ => continue, // a line that merely starts like the boundary
        };
        if let Some(from) = open {
            // The line break before a delimiter belongs to the delimiter.
            let to = line_break_start(body, start).max(from);
            parts.push(&body[from..to]);
        }
        if is_close {
            closed = true;
            break;
        }
        open = Some(next);
    }
    match open {
        None => {
            return Err(BodyError::Malformed(format!(
                "no multipart delimiter \"--{boundary}\" found"
            )))
        }
        Some(from) if !closed => {
            let rest = &body[from.min(body.len())..];
            parts.push(trim_trailing_line_breaks(rest));
        }
        Some(_) => {}
    }
    Ok(parts)
}

/// Index where the line break that ends the line before `line_start` begins.
fn line_break_start(body: &[u8], line_start: usize) -> usize {
    let mut i = line_start;
    if i > 0 && body[i - 1] == b'\n' {
        i -= 1;
        if i > 0 && body[i - 1] == b'\r' {
            i -= 1;
        }
    }
    i
}

fn trim_trailing_line_breaks(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n'] = bytes {
        bytes = rest;
    }
    bytes
}

/// A part header as (name, unfolded value).
type PartHeader = (String, String);

/// Splits a part into unfolded headers and content. A part that starts with a blank line has no
/// headers; a part without a blank line is all headers (no content). `None` when a header line
/// has no colon.
fn split_part_headers(part: &[u8]) -> Option<(Vec<PartHeader>, &[u8])> {
    let mut headers: Vec<PartHeader> = Vec::new();
    for (start, end, next) in lines(part) {
        let line = &part[start..end];
        if line.trim_ascii().is_empty() {
            return Some((headers, &part[next.min(part.len())..]));
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            // Folded continuation of the previous header (RFC 3261 §7.3.1).
            let (_, value) = headers.last_mut()?;
            value.push(' ');
            value.push_str(text.trim());
            continue;
        }
        let (name, value) = text.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Some((headers, &part[part.len()..]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Body of the spec's §7 initial INVITE (recording-session example).
    pub(crate) const SPEC_INVITE_BODY: &str = "--rsb-42\r
Content-Type: application/sdp\r
Content-Disposition: session;handling=required\r
\r
v=0\r
o=SRC 700100 1 IN IP4 10.20.0.10\r
s=-\r
c=IN IP4 10.20.0.10\r
t=0 0\r
m=audio 31000 RTP/AVP 8 0 101\r
a=rtpmap:8 PCMA/8000\r
a=rtpmap:0 PCMU/8000\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-15\r
a=ptime:20\r
a=label:1\r
a=sendonly\r
m=audio 31002 RTP/AVP 8 0 101\r
a=rtpmap:8 PCMA/8000\r
a=rtpmap:0 PCMU/8000\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-15\r
a=ptime:20\r
a=label:2\r
a=sendonly\r
\r
--rsb-42\r
Content-Type: application/rs-metadata+xml\r
Content-Disposition: recording-session\r
\r
<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">
  <datamode>complete</datamode>
  <group group_id=\"Q2dXbH1xTr6yb0f8kP3aJg==\">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </group>
  <session session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <sipSessionID>3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f</sipSessionID>
    <group-ref>Q2dXbH1xTr6yb0f8kP3aJg==</group-ref>
    <start-time>2025-03-04T10:15:02Z</start-time>
  </session>
  <participant participant_id=\"c1D1yJ2oQ0yC4n7Zp8LhSw==\">
    <nameID aor=\"sip:+493012345678@carrier.example\"><name xml:lang=\"en\">Customer</name></nameID>
  </participant>
  <participant participant_id=\"a2D2wX6kT1mB9s3Yh5GfRg==\">
    <nameID aor=\"sip:7002@cc.example\"><name xml:lang=\"en\">Agent 7002</name></nameID>
  </participant>
  <stream stream_id=\"s1Fw9uR3Q7iL2c8Vb4NxEw==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\"><label>1</label></stream>
  <stream stream_id=\"s2Kp7eT5W1oN6d3Ym8ZqJw==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\"><label>2</label></stream>
  <sessionrecordingassoc session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </sessionrecordingassoc>
  <participantsessionassoc participant_id=\"c1D1yJ2oQ0yC4n7Zp8LhSw==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id=\"a2D2wX6kT1mB9s3Yh5GfRg==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id=\"c1D1yJ2oQ0yC4n7Zp8LhSw==\">
    <send>s1Fw9uR3Q7iL2c8Vb4NxEw==</send>
    <recv>s2Kp7eT5W1oN6d3Ym8ZqJw==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id=\"a2D2wX6kT1mB9s3Yh5GfRg==\">
    <send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
    <recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
  </participantstreamassoc>
</recording>\r
--rsb-42--\r
";

    /// Body of the spec's §8 re-INVITE after the transfer (partial metadata).
    pub(crate) const SPEC_REINVITE_BODY: &str = "--rsb-43\r
Content-Type: application/sdp\r
\r
v=0\r
o=SRC 700100 2 IN IP4 10.20.0.10\r
s=-\r
c=IN IP4 10.20.0.10\r
t=0 0\r
m=audio 31000 RTP/AVP 8 101\r
a=rtpmap:8 PCMA/8000\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-15\r
a=label:1\r
a=sendonly\r
m=audio 31010 RTP/AVP 18 101\r
a=rtpmap:18 G729/8000\r
a=fmtp:18 annexb=no\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-15\r
a=label:2\r
a=sendonly\r
\r
--rsb-43\r
Content-Type: application/rs-metadata+xml\r
Content-Disposition: recording-session\r
\r
<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">
  <datamode>partial</datamode>
  <participant participant_id=\"d3Hq2sK8V0nC5b1Xt7JmPw==\">
    <nameID aor=\"sip:7003@cc.example\"><name xml:lang=\"en\">Agent 7003</name></nameID>
  </participant>
  <participantsessionassoc participant_id=\"a2D2wX6kT1mB9s3Yh5GfRg==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id=\"d3Hq2sK8V0nC5b1Xt7JmPw==\" session_id=\"mT0b4zR8Sxq1dQm5n9VqKw==\">
    <associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id=\"a2D2wX6kT1mB9s3Yh5GfRg==\">
    <disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantstreamassoc>
  <participantstreamassoc participant_id=\"d3Hq2sK8V0nC5b1Xt7JmPw==\">
    <send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
    <recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
    <associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantstreamassoc>
</recording>\r
--rsb-43--\r
";

    pub(crate) fn spec_invite() -> RecordingBody {
        split_body(
            Some("multipart/mixed;boundary=rsb-42"),
            SPEC_INVITE_BODY.as_bytes(),
        )
        .unwrap()
    }

    pub(crate) fn spec_reinvite() -> RecordingBody {
        split_body(
            Some("multipart/mixed;boundary=rsb-43"),
            SPEC_REINVITE_BODY.as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn spec_invite_splits_into_sdp_and_metadata() {
        let body = spec_invite();
        let sdp = body.sdp.unwrap();
        assert!(sdp.starts_with("v=0\r\n"));
        // The blank line before the delimiter stays in the part; its final CRLF does not.
        assert!(sdp.ends_with("a=sendonly\r\n"));
        let xml = body.metadata.unwrap();
        assert!(xml.starts_with("<?xml"));
        assert!(xml.ends_with("</recording>"));
        assert!(body.ignored_parts.is_empty());
        assert_eq!(body.gci, None);
    }

    #[test]
    fn spec_reinvite_splits() {
        let body = spec_reinvite();
        assert!(body.sdp.unwrap().contains("G729/8000"));
        assert!(body
            .metadata
            .unwrap()
            .contains("<datamode>partial</datamode>"));
    }

    #[test]
    fn single_parts_and_parameters() {
        let sdp = split_body(Some("application/sdp"), b"v=0\r\n").unwrap();
        assert_eq!(sdp.sdp.as_deref(), Some("v=0\r\n"));
        assert_eq!(sdp.metadata, None);
        for ct in [
            "application/rs-metadata+xml",
            "Application/RS-Metadata",
            "application/rs-metadata+xml; charset=UTF-8",
        ] {
            let md = split_body(Some(ct), b"<recording/>").unwrap();
            assert_eq!(md.metadata.as_deref(), Some("<recording/>"), "{ct}");
            assert_eq!(md.sdp, None);
        }
    }

    #[test]
    fn empty_body_has_no_parts() {
        assert_eq!(split_body(None, b"").unwrap(), RecordingBody::default());
        assert_eq!(
            split_body(Some("application/sdp"), b"\r\n").unwrap(),
            RecordingBody::default()
        );
    }

    #[test]
    fn unknown_single_type_is_unsupported() {
        assert_eq!(
            split_body(Some("text/plain"), b"hello"),
            Err(BodyError::UnsupportedType("text/plain".into()))
        );
        assert!(matches!(
            split_body(None, b"v=0"),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn errors_map_to_sip_status_codes() {
        let unsupported = split_body(Some("text/html"), b"<p>").unwrap_err();
        let malformed = split_body(Some("multipart/mixed"), b"x").unwrap_err();
        let big = split_body(Some("application/sdp"), &vec![b'v'; MAX_BODY_LEN + 1]).unwrap_err();
        assert_eq!(
            [
                unsupported.status_code(),
                malformed.status_code(),
                big.status_code()
            ],
            [415, 400, 413]
        );
    }

    #[test]
    fn oversized_body_is_refused() {
        let big = vec![b'a'; MAX_BODY_LEN + 1];
        assert_eq!(
            split_body(Some("application/sdp"), &big),
            Err(BodyError::TooLarge {
                size: MAX_BODY_LEN + 1,
                max: MAX_BODY_LEN
            })
        );
    }

    #[test]
    fn cisco_three_parts_with_gtd() {
        let body = "--uniqueBoundary\r\n\
Content-Type: application/sdp\r\n\
Content-Disposition: session;handling=required\r\n\
\r\n\
v=0\r\n\
o=CiscoSystemsSIP-GW-UserAgent 1 1 IN IP4 10.0.0.1\r\n\
\r\n\
--uniqueBoundary\r\n\
Content-Type: application/gtd\r\n\
Content-Disposition: signal;handling=optional\r\n\
\r\n\
IAM,\r\n\
PRN,isdn*,,NET5*,\r\n\
GCI,3c1b2f6a8e1c11efb0a1d4c9ef2c1a6b\r\n\
\r\n\
--uniqueBoundary\r\n\
Content-Type: application/rs-metadata+xml\r\n\
Content-Disposition: recording-session\r\n\
\r\n\
<?xml version=\"1.0\"?><recording xmlns='urn:ietf:params:xml:ns:recording:1'/>\r\n\
--uniqueBoundary--\r\n";
        let out = split_body(
            Some("multipart/mixed;boundary=uniqueBoundary"),
            body.as_bytes(),
        )
        .unwrap();
        assert!(out.sdp.unwrap().contains("CiscoSystemsSIP-GW-UserAgent"));
        assert!(out.metadata.unwrap().ends_with("/>"));
        assert_eq!(out.ignored_parts, vec!["application/gtd".to_string()]);
        assert_eq!(out.gci.as_deref(), Some("3c1b2f6a8e1c11efb0a1d4c9ef2c1a6b"));
    }

    #[test]
    fn broadworks_metadata_first_with_part_lengths_and_broken_type() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<recording_metadata xmlns=\"urn:ietf:params:xml:ns:siprec\"><session id=\"x\"/></recording_metadata>";
        let sdp = "v=0\r\no=BroadWorks 1 1 IN IP4 10.1.1.1\r\ns=-\r\nc=IN IP4 10.1.1.1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0 8 18\r\n";
        let body = format!(
            "\r\n--boundary1\r\nContent-Type: application/ +xml\r\nContent-Disposition: recording-session\r\nContent-Length: {}\r\n\r\n{xml}\r\n\r\n--boundary1\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}\r\n--boundary1--\r\n",
            xml.len(),
            sdp.len()
        );
        let out = split_body(
            Some("multipart/mixed; boundary=\"boundary1\""),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(out.metadata.as_deref(), Some(xml));
        assert_eq!(out.sdp.as_deref(), Some(sdp));
        assert!(out.ignored_parts.is_empty());
    }

    #[test]
    fn wrong_part_content_length_never_cuts_content() {
        let body = "--b\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\no=x\r\n\r\n--b\r\nContent-Type: application/rs-metadata\r\nContent-Length: 9999\r\n\r\n<recording/>\r\n--b--";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0\r\no=x\r\n"));
        assert_eq!(out.metadata.as_deref(), Some("<recording/>"));
    }

    #[test]
    fn xml_part_without_recording_root_is_ignored() {
        let body = "--b\r\nContent-Type: application/pidf+xml\r\n\r\n<presence/>\r\n--b--";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.metadata, None);
        assert_eq!(out.ignored_parts, vec!["application/pidf+xml".to_string()]);
    }

    #[test]
    fn preamble_folding_lf_only_and_trailing_whitespace() {
        let body = "This is a preamble\n\n--unique-boundary-1\nContent-Type:\n  application/sdp\n\nv=0\n\n--unique-boundary-1\ncontent-type: APPLICATION/RS-METADATA\n\n<recording/>\n--unique-boundary-1-- \n\nepilogue";
        let out = split_body(
            Some("Multipart/Mixed ; Boundary=unique-boundary-1"),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0\n"));
        assert_eq!(out.metadata.as_deref(), Some("<recording/>"));
    }

    #[test]
    fn quoted_boundary_with_semicolon() {
        let body = "--a;b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--a;b--\r\n";
        let out = split_body(
            Some("multipart/mixed; boundary=\"a;b\"; foo=bar"),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0"));
    }

    #[test]
    fn part_without_content_type_is_sniffed() {
        let body = "--b\r\n\r\nv=0\r\n--b\r\n\r\nhello\r\n--b--";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0"));
        assert_eq!(out.ignored_parts, vec!["(none)".to_string()]);
    }

    #[test]
    fn missing_close_delimiter_is_tolerated() {
        let body = "--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n\r\n";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0"));
    }

    #[test]
    fn second_sdp_part_is_ignored() {
        let body = "--b\r\nContent-Type: application/sdp\r\n\r\nv=0 first\r\n--b\r\nContent-Type: application/sdp\r\n\r\nv=0 second\r\n--b--";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0 first"));
        assert_eq!(out.ignored_parts, vec!["application/sdp".to_string()]);
    }

    #[test]
    fn malformed_multipart_is_reported() {
        let no_boundary = split_body(Some("multipart/mixed"), b"--x\r\n\r\nv=0\r\n--x--");
        assert!(matches!(no_boundary, Err(BodyError::Malformed(r)) if r.contains("boundary")));
        let wrong_boundary = split_body(
            Some("multipart/mixed;boundary=y"),
            b"--x\r\n\r\nv=0\r\n--x--",
        );
        assert!(matches!(wrong_boundary, Err(BodyError::Malformed(r)) if r.contains("--y")));
        let bad_header = split_body(
            Some("multipart/mixed;boundary=x"),
            b"--x\r\nno colon here\r\n\r\nv=0\r\n--x--",
        );
        assert!(matches!(bad_header, Err(BodyError::Malformed(r)) if r.contains("part 1")));
        let not_utf8 = split_body(
            Some("multipart/mixed;boundary=x"),
            b"--x\r\nContent-Type: application/sdp\r\n\r\nv=\xff\r\n--x--",
        );
        assert!(matches!(not_utf8, Err(BodyError::Malformed(r)) if r.contains("UTF-8")));
    }

    #[test]
    fn boundary_prefix_lines_are_content() {
        // A content line that starts with the delimiter but continues is not a delimiter.
        let body = "--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--bogus\r\n--b--";
        let out = split_body(Some("multipart/mixed;boundary=b"), body.as_bytes()).unwrap();
        assert_eq!(out.sdp.as_deref(), Some("v=0\r\n--bogus"));
    }
}
