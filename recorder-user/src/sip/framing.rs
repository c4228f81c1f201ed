//! Splitting a TCP byte stream into SIP messages (RFC 3261 §18.3: `Content-Length` gives the
//! body size on stream transports).
//!
//! [`Framer::frame`] follows the mini-redis shape: the connection task reads into a `BytesMut`,
//! calls it until it returns `Ok(None)` (need more bytes), and closes the connection on `Err`
//! (the stream can no longer be resynchronised). The [`Framer`] keeps how far it has looked
//! into a partial message, so small reads cost linear time; [`frame`] is the stateless form.

use bytes::{Buf, Bytes, BytesMut};

/// Largest header section accepted before the blank line (SIPREC INVITEs are header-heavy but
/// nowhere near this).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Largest body accepted (multipart SDP + metadata; metadata of a long conference can be large).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a stream cannot be framed any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("header section exceeds {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge,
    #[error("body of {0} bytes exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(usize),
    #[error("invalid Content-Length: {0:?}")]
    BadContentLength(String),
    #[error("conflicting Content-Length headers")]
    ConflictingContentLength,
}

/// Takes one complete message off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a message (or only keep-alive CRLFs, which
/// are consumed). Call again until `Ok(None)`: one read may carry several messages.
///
/// Stateless: each call scans `buf` from its start. A connection that reads a message in many
/// small pieces should keep a [`Framer`] instead (the scan goes on where it stopped).
pub fn frame(buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
    Framer::default().frame(buf)
}

/// [`frame`] for one stream, remembering how far it has looked into the message at the front
/// of the buffer, so that a message read one byte at a time costs time linear in its length
/// (a peer sending a 32 KiB header one byte per segment made the stateless scan quadratic).
///
/// Use one per connection with one buffer, which only grows at its end between calls (the
/// connection task's `read_buf`) or shrinks by what [`Framer::frame`] takes off it.
#[derive(Debug, Default)]
pub struct Framer {
    /// No blank line starts before this offset of the message at the front of the buffer.
    searched: usize,
    /// Length of that message (header + body) once its header has been read.
    total: Option<usize>,
    /// Bytes looked at since the start (keep-alive bytes, blank-line search positions, header
    /// bytes read for `Content-Length`): linear in the bytes framed.
    scanned: u64,
}

impl Framer {
    /// Takes one complete message off the front of `buf`; see [`frame`].
    pub fn frame(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
        if self.searched > buf.len() {
            // Not the buffer this state was about (it was cut): start over.
            self.reset();
        }
        if self.searched == 0 && self.total.is_none() {
            // Between messages: RFC 5626 keep-alives ("\r\n\r\n" pings, "\r\n" pongs).
            let leading = buf
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            self.scanned += leading as u64 + u64::from(leading < buf.len());
            buf.advance(leading);
            if buf.is_empty() {
                return Ok(None);
            }
        }
        let total = match self.total {
            Some(total) => total,
            None => match self.header(buf) {
                Ok(Some(total)) => total,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            },
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        self.reset();
        Ok(Some(buf.split_to(total).freeze()))
    }

    /// Bytes looked at so far (tests and fuzzing: the work must stay linear in the input).
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    fn reset(&mut self) {
        self.searched = 0;
        self.total = None;
    }

    /// Looks for the blank line from where the last call stopped; the message length once the
    /// header is whole.
    fn header(&mut self, buf: &[u8]) -> Result<Option<usize>, FramingError> {
        let from = self.searched;
        let found = find_blank_line(&buf[from..]).map(|end| from + end);
        let Some(header_end) = found else {
            // Positions from `from` were looked at; a blank line may still start in the
            // last 3 bytes.
            let next = buf.len().saturating_sub(3).max(from);
            self.scanned += (next - from) as u64;
            self.searched = next;
            if buf.len() > MAX_HEADER_BYTES {
                return Err(FramingError::HeaderTooLarge);
            }
            return Ok(None);
        };
        self.scanned += (header_end - 4 + 1 - from) as u64;
        if header_end > MAX_HEADER_BYTES {
            return Err(FramingError::HeaderTooLarge);
        }
        self.scanned += header_end as u64;
        let body_len = content_length(&buf[..header_end])?.unwrap_or(0);
        if body_len > MAX_BODY_BYTES {
            return Err(FramingError::BodyTooLarge(body_len));
        }
        self.searched = header_end;
        self.total = Some(header_end + body_len);
        Ok(self.total)
    }
}

/// Offset just past the first `\r\n\r\n`, if any.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The value of `Content-Length` (or its compact form `l`) in a header section.
///
/// Only this one header is read here; the rest of the message is parsed by rsip later.
pub(crate) fn content_length(headers: &[u8]) -> Result<Option<usize>, FramingError> {
    let mut found: Option<usize> = None;
    // The first line is the start line; header names never start a line with whitespace.
    for line in headers.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let raw = line[colon + 1..].trim_ascii();
        let value = std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| {
                FramingError::BadContentLength(String::from_utf8_lossy(raw).into_owned())
            })?;
        match found {
            Some(previous) if previous != value => {
                return Err(FramingError::ConflictingContentLength)
            }
            _ => found = Some(value),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OPTIONS: &[u8] = b"OPTIONS sip:srs@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.2;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n";
    const WITH_BODY: &[u8] = b"INVITE sip:srs@10.0.0.1 SIP/2.0\r\nl: 5\r\nVia: SIP/2.0/TCP 10.0.0.2;branch=z9hG4bK2\r\n\r\nhello";

    #[test]
    fn two_messages_in_one_read() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(OPTIONS);
        buf.extend_from_slice(WITH_BODY);
        assert_eq!(frame(&mut buf).unwrap().as_deref(), Some(OPTIONS));
        assert_eq!(frame(&mut buf).unwrap().as_deref(), Some(WITH_BODY));
        assert_eq!(frame(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_reads_byte_by_byte() {
        let mut input = Vec::new();
        input.extend_from_slice(b"\r\n\r\n");
        input.extend_from_slice(WITH_BODY);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(OPTIONS);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in input {
            buf.extend_from_slice(&[b]);
            while let Some(msg) = frame(&mut buf).unwrap() {
                out.push(msg);
            }
        }
        assert_eq!(
            out,
            vec![Bytes::from_static(WITH_BODY), Bytes::from_static(OPTIONS)]
        );
    }

    #[test]
    fn body_split_across_reads_waits() {
        let mut buf = BytesMut::from(&WITH_BODY[..WITH_BODY.len() - 2]);
        assert_eq!(frame(&mut buf).unwrap(), None);
        assert_eq!(
            buf.len(),
            WITH_BODY.len() - 2,
            "nothing consumed while incomplete"
        );
        buf.extend_from_slice(&WITH_BODY[WITH_BODY.len() - 2..]);
        assert_eq!(frame(&mut buf).unwrap().as_deref(), Some(WITH_BODY));
    }

    #[test]
    fn missing_content_length_means_empty_body() {
        let msg = b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n";
        let mut buf = BytesMut::from(&msg[..]);
        assert_eq!(frame(&mut buf).unwrap().as_deref(), Some(&msg[..]));
    }

    #[test]
    fn oversized_and_bad_lengths_are_errors() {
        let mut buf =
            BytesMut::from(&b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 99999999\r\n\r\n"[..]);
        assert_eq!(frame(&mut buf), Err(FramingError::BodyTooLarge(99_999_999)));
        let mut buf =
            BytesMut::from(&b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: ten\r\n\r\n"[..]);
        assert!(matches!(
            frame(&mut buf),
            Err(FramingError::BadContentLength(_))
        ));
        let mut buf = BytesMut::from(
            &b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        );
        assert_eq!(frame(&mut buf), Err(FramingError::ConflictingContentLength));
        let mut buf = BytesMut::from(&vec![b'a'; MAX_HEADER_BYTES + 1][..]);
        assert_eq!(frame(&mut buf), Err(FramingError::HeaderTooLarge));
    }

    /// A message with a 32 KiB header, then its body, then another message, all one byte per
    /// read: the framer looks at each byte a bounded number of times (the stateless scan looked
    /// at the whole buffer on every read: ~1 G positions here).
    #[test]
    fn byte_by_byte_framing_is_linear() {
        let mut big = b"INVITE sip:srs@10.0.0.1 SIP/2.0\r\nContent-Length: 3\r\n".to_vec();
        while big.len() < MAX_HEADER_BYTES - 100 {
            big.extend_from_slice(b"X-Padding: 0123456789abcdef0123456789abcdef\r\n");
        }
        big.extend_from_slice(b"\r\nabc");
        let mut input = b"\r\n\r\n".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(OPTIONS);
        let mut framer = Framer::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in &input {
            buf.extend_from_slice(&[*b]);
            while let Some(msg) = framer.frame(&mut buf).unwrap() {
                out.push(msg);
            }
        }
        assert_eq!(out, vec![Bytes::from(big), Bytes::from_static(OPTIONS)]);
        assert!(buf.is_empty());
        let n = input.len() as u64;
        // Each byte: once in the blank-line search, once for Content-Length, once as a
        // possible keep-alive, plus one look per read at most.
        assert!(
            framer.scanned() <= 4 * n,
            "{} bytes looked at for {n} bytes framed",
            framer.scanned()
        );
        assert!(framer.scanned() >= n, "every byte is looked at");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.extend_from_slice(&chunk);
                while let Ok(Some(msg)) = frame(&mut buf) {
                    prop_assert!(!msg.is_empty());
                }
            }
        }

        #[test]
        fn the_framer_frames_like_the_stateless_scan(
            stream in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b':'), Just(b'l'), Just(b'1'), any::<u8>()], 0..400),
            cut in 1usize..40,
        ) {
            let mut whole = BytesMut::from(&stream[..]);
            let mut at_once = Vec::new();
            let whole_result = loop {
                match frame(&mut whole) {
                    Ok(Some(m)) => at_once.push(m),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            let mut framer = Framer::default();
            let mut chunked = BytesMut::new();
            let mut in_reads = Vec::new();
            let mut chunked_result = Ok(());
            'reads: for read in stream.chunks(cut) {
                chunked.extend_from_slice(read);
                loop {
                    match framer.frame(&mut chunked) {
                        Ok(Some(m)) => in_reads.push(m),
                        Ok(None) => break,
                        Err(e) => {
                            chunked_result = Err(e);
                            break 'reads;
                        }
                    }
                }
            }
            prop_assert_eq!(at_once, in_reads);
            prop_assert_eq!(&whole_result, &chunked_result);
            if whole_result.is_ok() {
                prop_assert_eq!(whole, chunked);
            }
        }

        #[test]
        fn any_split_point_yields_the_same_messages(split in 0usize..(OPTIONS.len() + WITH_BODY.len())) {
            let mut all = OPTIONS.to_vec();
            all.extend_from_slice(WITH_BODY);
            let mut buf = BytesMut::from(&all[..split]);
            let mut out = Vec::new();
            while let Some(m) = frame(&mut buf).unwrap() { out.push(m); }
            buf.extend_from_slice(&all[split..]);
            while let Some(m) = frame(&mut buf).unwrap() { out.push(m); }
            prop_assert_eq!(out, vec![Bytes::from_static(OPTIONS), Bytes::from_static(WITH_BODY)]);
        }
    }
}
