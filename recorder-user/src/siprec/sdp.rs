//! SDP offers from the recording client and our answers (RFC 3264, RFC 7866 §7.1).
//!
//! Parsing goes through `sdp-rs`, which is strict about line order and rejects a whole
//! description for one odd attribute. Real SRCs send odd attributes, so the text is normalised
//! first: lines are put in RFC 8866 order, line types we never read (`i`, `u`, `e`, `p`, `b`,
//! `k`, `r`, `z`) are dropped, and an `a=` line that `sdp-rs` cannot type on its own (say
//! `a=ptime:abc`) is dropped rather than failing the offer. The `o=`, `c=` and `m=` lines must
//! parse; without them there is nothing to record.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use sdp_rs::lines::{self, Attribute};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{events::Codec, media::sdes};

/// Most m-lines accepted in one offer; SIPREC uses 1-4.
pub const MAX_STREAMS: usize = 64;

/// A parsed SDP offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// `o=` sess-id (compare to detect a new session).
    pub origin_session_id: String,
    /// `o=` sess-version: unchanged means the media did not change (session-timer refresh).
    pub origin_version: u64,
    /// Session-level `c=` address.
    pub session_connection: Option<IpAddr>,
    pub streams: Vec<OfferStream>,
}

/// One offered m-line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferStream {
    /// Position in the offer, 0-based.
    pub index: usize,
    /// `audio`, `video`, ...
    pub media: String,
    /// Port 0 means the client removed the stream.
    pub port: u16,
    pub proto: String,
    /// Format list of the m-line as sent.
    pub formats: Vec<String>,
    /// Media-level `c=`, else the session-level one.
    pub connection: Option<IpAddr>,
    /// `a=label` (RFC 4574), the join key with the metadata streams.
    pub label: Option<String>,
    /// Codecs in m-line order, from rtpmap/fmtp, or the static table for PTs without rtpmap.
    /// `telephone-event` is kept apart in [`telephone_event`](Self::telephone_event).
    pub codecs: Vec<Codec>,
    pub telephone_event: Option<Codec>,
    pub direction: Direction,
    /// `a=rtcp` port and optional address.
    pub rtcp: Option<(u16, Option<IpAddr>)>,
    pub rtcp_mux: bool,
    /// `a=crypto` values (everything after `a=crypto:`).
    pub crypto: Vec<String>,
    pub ptime: Option<u32>,
}

/// Media direction attribute (RFC 3264 §6.1); `sendrecv` when absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    /// The attribute name (`sendrecv`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// Our answer direction for an offered one: `recvonly` when the client sends and we are not
    /// paused, `inactive` otherwise (RFC 3264 §6.1 forbids answering `recvonly` to a stream the
    /// client does not send).
    pub fn answer(self, paused: bool) -> Direction {
        match self {
            Direction::SendOnly | Direction::SendRecv if !paused => Direction::RecvOnly,
            _ => Direction::Inactive,
        }
    }
}

/// Why an offer could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SdpError {
    /// A mandatory line is absent.
    #[error("SDP has no {0}= line")]
    Missing(&'static str),
    /// A line we cannot do without is broken.
    #[error("invalid SDP {kind}= line {text:?}: {reason}")]
    InvalidLine {
        kind: char,
        text: String,
        reason: String,
    },
    /// `sdp-rs` refused the normalised description.
    #[error("SDP rejected: {0}")]
    Parse(String),
    #[error("SDP has {0} m-lines (limit {MAX_STREAMS})")]
    TooManyStreams(usize),
}

impl SdpError {
    /// The SIP response code for an offer that fails this way: 400 for broken syntax, 488 for
    /// an offer that parses but that we will not take.
    pub fn status_code(&self) -> u16 {
        match self {
            SdpError::TooManyStreams(_) => 488,
            _ => 400,
        }
    }
}

/// What we accept for one stream, in offer order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StreamAnswer {
    Accept {
        port: u16,
        /// Our RTCP port; `a=rtcp` is written only when it is not `port + 1`.
        rtcp_port: Option<u16>,
        codec: Codec,
        telephone_event: Option<Codec>,
        /// `RecvOnly`, or `Inactive` when paused (see [`Direction::answer`]).
        direction: Direction,
        label: Option<String>,
        /// Our `a=crypto` value for SRTP streams (see [`answer_crypto`]).
        crypto: Option<String>,
    },
    /// Answered with port 0.
    Reject,
}

impl Offer {
    /// True when at least one stream can be recorded; otherwise the caller answers 488.
    pub fn usable(&self) -> bool {
        self.streams.iter().any(OfferStream::is_usable)
    }
}

impl OfferStream {
    /// Why this stream cannot be accepted, or `None` when it can.
    pub fn rejection(&self) -> Option<&'static str> {
        let proto = self.proto.to_ascii_uppercase();
        if self.port == 0 {
            Some("stream removed (port 0)")
        } else if !matches!(
            proto.as_str(),
            "RTP/AVP" | "RTP/AVPF" | "RTP/SAVP" | "RTP/SAVPF"
        ) {
            Some("unsupported transport")
        } else if proto.starts_with("RTP/SAVP") && sdes::choose(&self.crypto).is_none() {
            Some("SRTP without usable SDES keys")
        } else if choose_codec(self).is_none() {
            Some("no codec offered")
        } else {
            None
        }
    }

    pub fn is_usable(&self) -> bool {
        self.rejection().is_none()
    }

    /// The `a=label`, or the m-line index when there is none (single mixed stream SRCs), which
    /// is how recordings name their tracks.
    pub fn label_or_index(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.index.to_string())
    }

    /// Where the client says it sends from, when it gave an address and a non-zero port.
    pub fn remote(&self) -> Option<SocketAddr> {
        let ip = self.connection?;
        (self.port != 0).then_some(SocketAddr::new(ip, self.port))
    }

    /// True for `RTP/SAVP` and `RTP/SAVPF`.
    pub fn is_srtp(&self) -> bool {
        self.proto.to_ascii_uppercase().starts_with("RTP/SAVP")
    }
}

/// The codec we record: the first offered one that is not comfort noise or a helper format.
pub fn choose_codec(stream: &OfferStream) -> Option<Codec> {
    stream
        .codecs
        .iter()
        .find(|c| {
            !["CN", "telephone-event", "red", "rtx", "ulpfec", "flexfec"]
                .iter()
                .any(|helper| c.name.eq_ignore_ascii_case(helper))
        })
        .cloned()
}

/// Our `a=crypto` value for an SRTP stream: the offered line we decrypt with (the strongest
/// usable suite, see [`sdes::choose`]) answered with its tag and suite and a key of ours.
/// `None` if no offered line is usable.
pub fn answer_crypto(offered: &[String]) -> Option<String> {
    sdes::choose(offered).map(|c| sdes::answer(&c))
}

/// Parses an offer; see the module docs for what is tolerated.
pub fn parse_offer(sdp: &str) -> Result<Offer, SdpError> {
    let (normalised, m_lines) = normalise(sdp)?;
    let parsed = sdp_rs::SessionDescription::try_from(normalised.as_str())
        .map_err(|e| SdpError::Parse(truncate(&e.to_string())))?;
    if parsed.media_descriptions.len() != m_lines {
        return Err(SdpError::Parse(format!(
            "read {} of {m_lines} m-lines",
            parsed.media_descriptions.len()
        )));
    }
    let origin_version = parsed
        .origin
        .sess_version
        .parse()
        .map_err(|e| SdpError::InvalidLine {
            kind: 'o',
            text: truncate(&parsed.origin.sess_version),
            reason: format!("session version: {e}"),
        })?;
    let session_connection = parsed.connection.as_ref().map(connection_ip);
    let session_direction = direction_of(&parsed.attributes);
    let session_ptime = ptime_of(&parsed.attributes);
    let streams = parsed
        .media_descriptions
        .iter()
        .enumerate()
        .map(|(index, md)| {
            stream_from(
                index,
                md,
                session_connection,
                session_direction,
                session_ptime,
            )
        })
        .collect();
    Ok(Offer {
        origin_session_id: parsed.origin.sess_id.clone(),
        origin_version,
        session_connection,
        streams,
    })
}

fn connection_ip(c: &lines::Connection) -> IpAddr {
    c.connection_address.base
}

fn stream_from(
    index: usize,
    md: &sdp_rs::MediaDescription,
    session_connection: Option<IpAddr>,
    session_direction: Option<Direction>,
    session_ptime: Option<u32>,
) -> OfferStream {
    let formats: Vec<String> = md.media.fmt.split_whitespace().map(String::from).collect();
    let attrs = &md.attributes;
    let other = |name: &'static str| other_attrs(attrs, name);
    let fmtp = |pt: u32| {
        other("fmtp").find_map(|v| {
            let (p, params) = v.split_once(char::is_whitespace)?;
            (p.parse() == Ok(pt)).then(|| params.trim().to_string())
        })
    };
    let mut codecs = Vec::new();
    let mut telephone_event = None;
    for fmt in &formats {
        let Ok(pt) = fmt.parse::<u8>() else { continue };
        if pt > 127 {
            continue;
        }
        let rtpmap = attrs.iter().find_map(|a| match a {
            Attribute::Rtpmap(r) if r.payload_type == u32::from(pt) => Some(r),
            _ => None,
        });
        let codec = match rtpmap {
            Some(r) => {
                let (Ok(clock_rate), Ok(channels)) = (
                    u32::try_from(r.clock_rate),
                    u8::try_from(r.encoding_params.unwrap_or(1)),
                ) else {
                    continue;
                };
                Codec {
                    payload_type: pt,
                    name: r.encoding_name.clone(),
                    clock_rate,
                    channels,
                    fmtp: fmtp(u32::from(pt)),
                }
            }
            None => match static_codec(pt) {
                Some((name, clock_rate)) => Codec {
                    payload_type: pt,
                    name: name.to_string(),
                    clock_rate,
                    channels: 1,
                    fmtp: fmtp(u32::from(pt)),
                },
                None => continue,
            },
        };
        if codec.name.eq_ignore_ascii_case("telephone-event") {
            telephone_event.get_or_insert(codec);
        } else {
            codecs.push(codec);
        }
    }
    let rtcp = other("rtcp").next().and_then(|v| {
        let mut fields = v.split_whitespace();
        let port = fields.next()?.parse().ok()?;
        let addr = fields.nth(2).and_then(|a| a.parse().ok());
        Some((port, addr))
    });
    let media_connection = md.connections.first().map(connection_ip);
    OfferStream {
        index,
        media: md.media.media.to_string(),
        port: md.media.port,
        proto: md.media.proto.to_string(),
        formats,
        connection: media_connection.or(session_connection),
        label: other("label").next().map(String::from),
        codecs,
        telephone_event,
        direction: direction_of(attrs)
            .or(session_direction)
            .unwrap_or_default(),
        rtcp,
        rtcp_mux: other("rtcp-mux").next().is_some(),
        crypto: other("crypto").map(String::from).collect(),
        ptime: ptime_of(attrs).or(session_ptime),
    }
}

/// Values of the untyped attribute `name` (`label`, `fmtp`, `crypto`, ...), trimmed.
fn other_attrs<'a>(attrs: &'a [Attribute], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    attrs.iter().filter_map(move |a| match a {
        Attribute::Other(key, value) if key.eq_ignore_ascii_case(name) => {
            Some(value.as_deref().unwrap_or("").trim())
        }
        _ => None,
    })
}

/// Static payload types (RFC 3551) that SRCs send without rtpmap.
fn static_codec(pt: u8) -> Option<(&'static str, u32)> {
    Some(match pt {
        0 => ("PCMU", 8000),
        3 => ("GSM", 8000),
        4 => ("G723", 8000),
        8 => ("PCMA", 8000),
        9 => ("G722", 8000),
        13 => ("CN", 8000),
        18 => ("G729", 8000),
        _ => return None,
    })
}

fn direction_of(attrs: &[Attribute]) -> Option<Direction> {
    attrs.iter().rev().find_map(|a| match a {
        Attribute::Sendrecv => Some(Direction::SendRecv),
        Attribute::Sendonly => Some(Direction::SendOnly),
        Attribute::Recvonly => Some(Direction::RecvOnly),
        Attribute::Inactive => Some(Direction::Inactive),
        // sdp-rs 0.2.1 misspells the `inactive` key, so it arrives as an unknown attribute.
        Attribute::Other(key, None) if key.eq_ignore_ascii_case("inactive") => {
            Some(Direction::Inactive)
        }
        _ => None,
    })
}

fn ptime_of(attrs: &[Attribute]) -> Option<u32> {
    attrs.iter().find_map(|a| match a {
        Attribute::Ptime(p) if p.is_finite() && *p > 0.0 && *p < 10_000.0 => Some(p.round() as u32),
        _ => None,
    })
}

fn truncate(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Rewrites `sdp` into a form `sdp-rs` accepts; returns it with the number of m-lines.
fn normalise(sdp: &str) -> Result<(String, usize), SdpError> {
    #[derive(Default)]
    struct Section {
        lead: Option<String>, // m= (media) or unused (session)
        connections: Vec<String>,
        attributes: Vec<String>,
    }
    let mut version = None;
    let mut origin = None;
    let mut name = None;
    let mut time = None;
    let mut session = Section::default();
    let mut media: Vec<Section> = Vec::new();

    // A lone CR also ends a line for sdp-rs; splitting on it here keeps both views the same.
    for raw in sdp.split(['\r', '\n']) {
        let line = raw.trim();
        let Some((kind, value)) = line.split_once('=') else {
            continue;
        };
        let kind = match kind.as_bytes() {
            [k] => *k as char,
            _ => continue,
        };
        match kind {
            'v' if version.is_none() => version = Some(format!("v={}", value.trim())),
            'o' if origin.is_none() => origin = Some(normalise_origin(value)?),
            's' if name.is_none() => {
                let value = value.trim();
                name = Some(format!("s={}", if value.is_empty() { "-" } else { value }));
            }
            't' if time.is_none() => time = Some(format!("t={}", collapse(value))),
            'c' => {
                let text = format!("c={}", collapse(value));
                let parsed = lines::connection::Tokenizer::tokenize(&format!("{text}\r\n"))
                    .map_err(|e| e.to_string())
                    .and_then(|(_, t)| lines::Connection::try_from(t).map_err(|e| e.to_string()));
                match parsed {
                    Ok(_) => media
                        .last_mut()
                        .unwrap_or(&mut session)
                        .connections
                        .push(text),
                    Err(reason) => {
                        return Err(SdpError::InvalidLine {
                            kind,
                            text: truncate(line),
                            reason: truncate(&reason),
                        })
                    }
                }
            }
            'a' => {
                let text = format!("a={}", value.trim());
                let ok = lines::attribute::Tokenizer::tokenize(&format!("{text}\r\n"))
                    .ok()
                    .is_some_and(|(_, t)| Attribute::try_from(t).is_ok());
                if ok {
                    media
                        .last_mut()
                        .unwrap_or(&mut session)
                        .attributes
                        .push(text);
                }
            }
            'm' => {
                if media.len() == MAX_STREAMS {
                    return Err(SdpError::TooManyStreams(
                        sdp.lines().filter(|l| l.trim().starts_with("m=")).count(),
                    ));
                }
                let text = format!("m={}", collapse(value));
                let parsed = lines::media::Tokenizer::tokenize(&format!("{text}\r\n"))
                    .map_err(|e| e.to_string())
                    .and_then(|(_, t)| lines::Media::try_from(t).map_err(|e| e.to_string()));
                if let Err(reason) = parsed {
                    return Err(SdpError::InvalidLine {
                        kind,
                        text: truncate(line),
                        reason: truncate(&reason),
                    });
                }
                media.push(Section {
                    lead: Some(text),
                    ..Section::default()
                });
            }
            _ => {} // lines we never read
        }
    }
    let mut out = String::with_capacity(sdp.len() + 64);
    for line in [
        version.ok_or(SdpError::Missing("v"))?,
        origin.ok_or(SdpError::Missing("o"))?,
        name.unwrap_or_else(|| "s=-".into()),
    ] {
        out.push_str(&line);
        out.push_str("\r\n");
    }
    // At most one session-level c= in the grammar; the first wins.
    for line in session.connections.iter().take(1) {
        let _ = write!(out, "{line}\r\n");
    }
    let _ = write!(out, "{}\r\n", time.unwrap_or_else(|| "t=0 0".into()));
    for line in &session.attributes {
        let _ = write!(out, "{line}\r\n");
    }
    for section in &media {
        for line in section.lead.iter().chain(&section.connections) {
            let _ = write!(out, "{line}\r\n");
        }
        for line in &section.attributes {
            let _ = write!(out, "{line}\r\n");
        }
    }
    Ok((out, media.len()))
}

fn collapse(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `o=` must parse; an origin address that is a host name (allowed by RFC 8866) is replaced by
/// `0.0.0.0` because `sdp-rs` wants an IP there and we never use it.
fn normalise_origin(value: &str) -> Result<String, SdpError> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    let invalid = |reason: String| SdpError::InvalidLine {
        kind: 'o',
        text: truncate(&format!("o={value}")),
        reason,
    };
    if fields.len() != 6 {
        return Err(invalid(format!("{} fields, expected 6", fields.len())));
    }
    let mut fields = fields;
    if fields[5].parse::<IpAddr>().is_err() {
        fields[4] = "IP4";
        fields[5] = "0.0.0.0";
    }
    let text = format!("o={}", fields.join(" "));
    lines::origin::Tokenizer::tokenize(&format!("{text}\r\n"))
        .map_err(|e| e.to_string())
        .and_then(|(_, t)| lines::Origin::try_from(t).map_err(|e| e.to_string()))
        .map_err(|e| invalid(truncate(&e)))?;
    Ok(text)
}

/// Builds our answer: one m-line per offered m-line, in order. Streams without an entry in
/// `answers` are rejected.
pub fn build_answer(
    offer: &Offer,
    answers: &[StreamAnswer],
    local: IpAddr,
    session_id: u64,
    version: u64,
) -> String {
    let addr_type = if local.is_ipv4() { "IP4" } else { "IP6" };
    let mut out = String::with_capacity(256 + 256 * offer.streams.len());
    let _ = write!(
        out,
        "v=0\r\no=SRS {session_id} {version} IN {addr_type} {local}\r\ns=-\r\nc=IN {addr_type} {local}\r\nt=0 0\r\n"
    );
    for stream in &offer.streams {
        match answers.get(stream.index).unwrap_or(&StreamAnswer::Reject) {
            StreamAnswer::Reject => {
                let first = stream.formats.first().map(String::as_str).unwrap_or("0");
                let _ = write!(out, "m={} 0 {} {first}\r\n", stream.media, stream.proto);
            }
            StreamAnswer::Accept {
                port,
                rtcp_port,
                codec,
                telephone_event,
                direction,
                label,
                crypto,
            } => {
                let _ = write!(
                    out,
                    "m={} {port} {} {}",
                    stream.media, stream.proto, codec.payload_type
                );
                if let Some(te) = telephone_event {
                    let _ = write!(out, " {}", te.payload_type);
                }
                out.push_str("\r\n");
                for c in std::iter::once(codec).chain(telephone_event) {
                    write_codec(&mut out, c);
                }
                if let Some(crypto) = crypto {
                    let _ = write!(out, "a=crypto:{crypto}\r\n");
                }
                if let Some(rtcp) = rtcp_port.filter(|r| Some(*r) != port.checked_add(1)) {
                    let _ = write!(out, "a=rtcp:{rtcp}\r\n");
                }
                if stream.rtcp_mux {
                    out.push_str("a=rtcp-mux\r\n");
                }
                if let Some(label) = label {
                    let _ = write!(out, "a=label:{label}\r\n");
                }
                let _ = write!(out, "a={}\r\n", direction.as_str());
            }
        }
    }
    out
}

fn write_codec(out: &mut String, c: &Codec) {
    let _ = write!(
        out,
        "a=rtpmap:{} {}/{}",
        c.payload_type, c.name, c.clock_rate
    );
    if c.channels > 1 {
        let _ = write!(out, "/{}", c.channels);
    }
    out.push_str("\r\n");
    if let Some(fmtp) = &c.fmtp {
        let _ = write!(out, "a=fmtp:{} {fmtp}\r\n", c.payload_type);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siprec::body::tests::{spec_invite, spec_reinvite};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn codec(pt: u8, name: &str, fmtp: Option<&str>) -> Codec {
        Codec {
            payload_type: pt,
            name: name.into(),
            clock_rate: 8000,
            channels: 1,
            fmtp: fmtp.map(String::from),
        }
    }

    fn accept(offer: &Offer, index: usize, port: u16) -> StreamAnswer {
        let stream = &offer.streams[index];
        StreamAnswer::Accept {
            port,
            rtcp_port: Some(port + 1),
            codec: choose_codec(stream).unwrap(),
            telephone_event: stream.telephone_event.clone(),
            direction: stream.direction.answer(false),
            label: stream.label.clone(),
            crypto: None,
        }
    }

    #[test]
    fn spec_invite_offer() {
        let offer = parse_offer(&spec_invite().sdp.unwrap()).unwrap();
        assert_eq!(offer.origin_session_id, "700100");
        assert_eq!(offer.origin_version, 1);
        let src = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 10));
        assert_eq!(offer.session_connection, Some(src));
        assert_eq!(offer.streams.len(), 2);
        let s = &offer.streams[1];
        assert_eq!(s.index, 1);
        assert_eq!(
            (s.media.as_str(), s.port, s.proto.as_str()),
            ("audio", 31002, "RTP/AVP")
        );
        assert_eq!(s.formats, vec!["8", "0", "101"]);
        assert_eq!(s.connection, Some(src));
        assert_eq!(s.label.as_deref(), Some("2"));
        assert_eq!(s.label_or_index(), "2");
        assert_eq!(
            s.codecs,
            vec![codec(8, "PCMA", None), codec(0, "PCMU", None)]
        );
        assert_eq!(
            s.telephone_event,
            Some(codec(101, "telephone-event", Some("0-15")))
        );
        assert_eq!(s.direction, Direction::SendOnly);
        assert_eq!(s.ptime, Some(20));
        assert_eq!((s.rtcp, s.rtcp_mux, s.crypto.len()), (None, false, 0));
        assert!(offer.usable());
        assert_eq!(choose_codec(s), Some(codec(8, "PCMA", None)));
    }

    #[test]
    fn spec_invite_answer_matches_spec_example() {
        let offer = parse_offer(&spec_invite().sdp.unwrap()).unwrap();
        let answers = [accept(&offer, 0, 40000), accept(&offer, 1, 40002)];
        let local = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 50));
        let answer = build_answer(&offer, &answers, local, 5512, 1);
        let expected = "v=0\r\no=SRS 5512 1 IN IP4 10.20.0.50\r\ns=-\r\nc=IN IP4 10.20.0.50\r\nt=0 0\r\n\
m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=label:1\r\na=recvonly\r\n\
m=audio 40002 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=label:2\r\na=recvonly\r\n";
        assert_eq!(answer, expected);
        // Our own answer must be readable SDP with the same shape.
        let reparsed = parse_offer(&answer).unwrap();
        assert_eq!(reparsed.streams.len(), 2);
        assert_eq!(reparsed.streams[0].direction, Direction::RecvOnly);
    }

    #[test]
    fn spec_reinvite_offer_moves_label_2_to_g729() {
        let offer = parse_offer(&spec_reinvite().sdp.unwrap()).unwrap();
        assert_eq!(offer.origin_version, 2);
        let s = &offer.streams[1];
        assert_eq!((s.port, s.label.as_deref()), (31010, Some("2")));
        assert_eq!(choose_codec(s), Some(codec(18, "G729", Some("annexb=no"))));
        let answer = build_answer(
            &offer,
            &[accept(&offer, 0, 40000), accept(&offer, 1, 40002)],
            IpAddr::V4(Ipv4Addr::new(10, 20, 0, 50)),
            5512,
            2,
        );
        assert!(answer.contains("o=SRS 5512 2 IN IP4"));
        assert!(answer.contains(
            "m=audio 40002 RTP/AVP 18 101\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n"
        ));
    }

    #[test]
    fn sonus_media_level_connection_and_odd_attributes() {
        // No session c=, LF line ends, unknown and maxptime attributes, direction:both (SEMS).
        let sdp = "v=0\no=Sonus_UAC 1 1 IN IP4 10.0.0.1\ns=SIP Media Capabilities\nt=0 0\n\
m=audio 1024 RTP/AVP 0 101\nc=IN IP4 10.0.0.7\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\n\
a=maxptime:150\na=direction:both\na=x-unknown\na=ptime:not-a-number\na=label:a_leg\na=sendonly\n";
        let offer = parse_offer(sdp).unwrap();
        assert_eq!(offer.session_connection, None);
        let s = &offer.streams[0];
        assert_eq!(s.connection, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))));
        assert_eq!(s.label.as_deref(), Some("a_leg"));
        assert_eq!(s.ptime, None, "unparsable ptime is dropped, not fatal");
        assert_eq!(s.direction, Direction::SendOnly);
        assert!(s.is_usable());
    }

    #[test]
    fn lone_cr_ends_a_line() {
        let sdp = "v=0\ro=- 1 1 IN IP4 192.0.2.1\rs=-\rc=IN IP4 192.0.2.1\rt=0 0\r\
m=audio 20000 RTP/AVP 0\ra=label:x\ra=sendonly\rm=audio 20002 RTP/AVP 8\ra=label:y\r";
        let offer = parse_offer(sdp).unwrap();
        let labels: Vec<_> = offer.streams.iter().map(|s| s.label.as_deref()).collect();
        assert_eq!(labels, vec![Some("x"), Some("y")]);
        assert_eq!(offer.streams[0].direction, Direction::SendOnly);
    }

    #[test]
    fn single_mixed_line_without_label_and_static_types() {
        let sdp =
            "v=0\r\no=FreeSWITCH 1 2 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 20000 RTP/AVP 0 8 9 18 13\r\n";
        let offer = parse_offer(sdp).unwrap();
        let s = &offer.streams[0];
        assert_eq!(s.label, None);
        assert_eq!(s.label_or_index(), "0");
        assert_eq!(s.remote(), Some("192.0.2.1:20000".parse().unwrap()));
        let names: Vec<&str> = s.codecs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["PCMU", "PCMA", "G722", "G729", "CN"]);
        assert_eq!(s.direction, Direction::SendRecv);
        let answer = build_answer(
            &offer,
            &[accept(&offer, 0, 41000)],
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
            1,
            1,
        );
        assert!(
            answer.contains("m=audio 41000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=recvonly\r\n")
        );
        assert!(!answer.contains("a=label"));
    }

    #[test]
    fn all_inactive_offer_is_answered_inactive() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 20000 RTP/AVP 8\r\na=label:1\r\na=inactive\r\nm=audio 20002 RTP/AVP 8\r\na=label:2\r\na=inactive\r\n";
        let offer = parse_offer(sdp).unwrap();
        assert!(offer
            .streams
            .iter()
            .all(|s| s.direction == Direction::Inactive));
        assert!(offer.usable(), "inactive streams are still answerable");
        assert_eq!(
            offer.streams[0].direction.answer(false),
            Direction::Inactive
        );
        let answer = build_answer(
            &offer,
            &[accept(&offer, 0, 40000), accept(&offer, 1, 40002)],
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
            1,
            1,
        );
        assert_eq!(answer.matches("a=inactive\r\n").count(), 2);
    }

    #[test]
    fn session_level_direction_applies_to_streams() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\na=sendonly\r\n\
m=audio 20000 RTP/AVP 8\r\nm=audio 20002 RTP/AVP 8\r\na=inactive\r\n";
        let offer = parse_offer(sdp).unwrap();
        assert_eq!(offer.streams[0].direction, Direction::SendOnly);
        assert_eq!(offer.streams[1].direction, Direction::Inactive);
    }

    #[test]
    fn video_lines_and_rejected_answer() {
        let sdp = "v=0\r\no=CiscoSystemsSIP-GW-UserAgent 4385 1 IN IP4 10.0.0.1\r\ns=SIP Call\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
m=audio 16384 RTP/AVP 0 101 19\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=rtpmap:19 CN/8000\r\na=label:1\r\na=sendonly\r\n\
m=video 16386 RTP/AVP 97\r\nb=TIAS:4000000\r\na=rtpmap:97 H264/90000\r\na=fmtp:97 profile-level-id=42801E;packetization-mode=1\r\na=label:3\r\na=sendonly\r\n";
        let offer = parse_offer(sdp).unwrap();
        let video = &offer.streams[1];
        assert_eq!(video.media, "video");
        assert_eq!(video.codecs[0].clock_rate, 90000);
        assert_eq!(
            video.codecs[0].fmtp.as_deref(),
            Some("profile-level-id=42801E;packetization-mode=1")
        );
        let answer = build_answer(
            &offer,
            &[accept(&offer, 0, 40000), StreamAnswer::Reject],
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            7,
            1,
        );
        assert!(answer.ends_with("m=video 0 RTP/AVP 97\r\n"));
        // CN is offered first-class but never chosen.
        assert_eq!(choose_codec(&offer.streams[0]).unwrap().name, "PCMU");
    }

    #[test]
    fn srtp_with_crypto_is_usable_and_answered_with_our_key() {
        let sdp = "v=0\r\no=AudiocodesGW 1 1 IN IP4 10.0.0.1\r\ns=Phone-Call\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
m=audio 6000 RTP/SAVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\na=label:1\r\na=sendonly\r\n\
m=audio 6002 RTP/SAVP 8\r\na=label:2\r\na=sendonly\r\n";
        let offer = parse_offer(sdp).unwrap();
        let s = &offer.streams[0];
        assert!(s.is_srtp() && s.is_usable());
        assert_eq!(
            s.crypto,
            vec!["1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4"]
        );
        assert_eq!(
            offer.streams[1].rejection(),
            Some("SRTP without usable SDES keys")
        );
        let ours = answer_crypto(&s.crypto).unwrap();
        assert!(
            ours.starts_with("1 AES_CM_128_HMAC_SHA1_80 inline:"),
            "{ours}"
        );
        // Our own key (we never send), not the client's.
        assert!(!ours.contains("WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"));
        assert_eq!(ours.len(), "1 AES_CM_128_HMAC_SHA1_80 inline:".len() + 40);
        let mut answer = accept(&offer, 0, 40000);
        if let StreamAnswer::Accept { crypto, .. } = &mut answer {
            *crypto = Some(ours.clone());
        }
        let text = build_answer(&offer, &[answer], IpAddr::V4(Ipv4Addr::LOCALHOST), 1, 1);
        assert!(text.contains("m=audio 40000 RTP/SAVP 8 101\r\n"));
        assert!(text.contains(&format!("a=crypto:{ours}\r\n")));
        assert!(text.ends_with("m=audio 0 RTP/SAVP 8\r\n"));
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(sdes::base64_encode(input.as_bytes()), expected);
        }
    }

    #[test]
    fn ipv6_connection_and_answer() {
        let sdp = "v=0\r\no=- 1 1 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 2001:db8::1\r\nt=0 0\r\n\
m=audio 20000 RTP/AVP 0\r\na=label:1\r\na=sendonly\r\n";
        let offer = parse_offer(sdp).unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(offer.streams[0].connection, Some(v6));
        let local = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50));
        let answer = build_answer(&offer, &[accept(&offer, 0, 40000)], local, 3, 4);
        assert!(answer.contains("o=SRS 3 4 IN IP6 2001:db8::50\r\n"));
        assert!(answer.contains("c=IN IP6 2001:db8::50\r\n"));
    }

    #[test]
    fn rtcp_attribute_and_mux() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 20000 RTP/AVP 8\r\na=rtcp:20011 IN IP4 192.0.2.7\r\na=label:1\r\n\
m=audio 20002 RTP/AVP 8\r\na=rtcp:20003\r\na=rtcp-mux\r\na=label:2\r\n";
        let offer = parse_offer(sdp).unwrap();
        assert_eq!(
            offer.streams[0].rtcp,
            Some((20011, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))))
        );
        assert!(!offer.streams[0].rtcp_mux);
        assert_eq!(offer.streams[1].rtcp, Some((20003, None)));
        assert!(offer.streams[1].rtcp_mux);
        let mut first = accept(&offer, 0, 40000);
        if let StreamAnswer::Accept { rtcp_port, .. } = &mut first {
            *rtcp_port = Some(40100);
        }
        let answer = build_answer(
            &offer,
            &[first, accept(&offer, 1, 40002)],
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            1,
            1,
        );
        assert!(answer.contains("a=rtcp:40100\r\n"));
        assert_eq!(answer.matches("a=rtcp:").count(), 1, "port+1 is implied");
        assert_eq!(answer.matches("a=rtcp-mux\r\n").count(), 1);
    }

    #[test]
    fn origin_with_hostname_and_missing_time_are_tolerated() {
        let sdp = "v=0\r\no=- 5 6 IN IP4 srs.example.com\r\ns=\r\nm=audio 20000 RTP/AVP 0\r\n";
        let offer = parse_offer(sdp).unwrap();
        assert_eq!(
            (offer.origin_session_id.as_str(), offer.origin_version),
            ("5", 6)
        );
        assert_eq!(offer.streams[0].connection, None);
    }

    #[test]
    fn unusable_offers() {
        let base = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n";
        let none = parse_offer(base).unwrap();
        assert!(none.streams.is_empty() && !none.usable());
        let dtls = parse_offer(&format!(
            "{base}m=audio 9 UDP/TLS/RTP/SAVP 111\r\na=rtpmap:111 opus/48000/2\r\n"
        ))
        .unwrap();
        assert_eq!(dtls.streams[0].rejection(), Some("unsupported transport"));
        assert_eq!(dtls.streams[0].codecs[0].channels, 2);
        let removed = parse_offer(&format!("{base}m=audio 0 RTP/AVP 0\r\n")).unwrap();
        assert_eq!(
            removed.streams[0].rejection(),
            Some("stream removed (port 0)")
        );
        let dtmf_only = parse_offer(&format!(
            "{base}m=audio 2000 RTP/AVP 101\r\na=rtpmap:101 telephone-event/8000\r\n"
        ))
        .unwrap();
        assert_eq!(dtmf_only.streams[0].rejection(), Some("no codec offered"));
        assert!(!dtmf_only.usable());
    }

    #[test]
    fn broken_mandatory_lines_are_errors() {
        assert_eq!(parse_offer(""), Err(SdpError::Missing("v")));
        assert_eq!(parse_offer("v=0\r\n"), Err(SdpError::Missing("o")));
        assert!(matches!(
            parse_offer("v=0\r\no=- 1\r\n"),
            Err(SdpError::InvalidLine { kind: 'o', .. })
        ));
        assert!(matches!(
            parse_offer("v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n"),
            Err(SdpError::InvalidLine { kind: 'o', .. })
        ));
        assert!(matches!(
            parse_offer("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 99999 RTP/AVP 0\r\n"),
            Err(SdpError::InvalidLine { kind: 'm', .. })
        ));
        assert!(matches!(
            parse_offer("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 not-an-ip\r\n"),
            Err(SdpError::InvalidLine { kind: 'c', .. })
        ));
        let many = format!(
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n{}",
            "m=audio 1000 RTP/AVP 0\r\n".repeat(MAX_STREAMS + 1)
        );
        let too_many = parse_offer(&many).unwrap_err();
        assert_eq!(too_many, SdpError::TooManyStreams(MAX_STREAMS + 1));
        assert_eq!(too_many.status_code(), 488);
        assert_eq!(parse_offer("").unwrap_err().status_code(), 400);
    }

    #[test]
    fn missing_answers_reject_the_rest() {
        let offer = parse_offer(&spec_invite().sdp.unwrap()).unwrap();
        let answer = build_answer(
            &offer,
            &[accept(&offer, 0, 40000)],
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            1,
            1,
        );
        assert!(answer.ends_with("m=audio 0 RTP/AVP 8\r\n"));
        assert_eq!(answer.matches("m=").count(), 2);
    }
}
