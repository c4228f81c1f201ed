//! SIPREC (RFC 7866) parsing and building blocks, sans-IO: request bodies, SDP offer/answer,
//! RFC 7865 metadata, interaction identifiers and local RTP port allocation.
//!
//! Each submodule has its own error type; the recording-session state machine builds on these.

pub mod body;
pub mod ids;
pub mod metadata;
pub mod ports;
pub mod sdp;

#[cfg(test)]
mod fuzz_tests;

pub use body::{split_body, BodyError, RecordingBody};
pub use ids::{add_body_ids, call_ids, DEFAULT_UUID_HEADERS};
pub use metadata::{parse_metadata, MetadataDoc, MetadataError, MetadataState};
pub use ports::PortAllocator;
pub use sdp::{
    answer_crypto, build_answer, choose_codec, parse_offer, Direction, Offer, OfferStream,
    SdpError, StreamAnswer,
};

/// Largest request body (and body part) accepted; real multipart INVITEs are a few KiB.
pub const MAX_BODY_LEN: usize = 256 * 1024;

pub mod session;

/// Whole bodies shaped like those of real SRCs, through every parser.
#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    /// Splits, parses SDP and metadata, and returns the parts.
    fn run(content_type: &str, body: &str) -> (RecordingBody, Offer, MetadataState) {
        let parts = split_body(Some(content_type), body.as_bytes()).unwrap();
        let offer = parse_offer(parts.sdp.as_deref().unwrap()).unwrap();
        let mut state = MetadataState::default();
        state.apply(
            parse_metadata(parts.metadata.as_deref().unwrap()).unwrap(),
            UNIX_EPOCH,
        );
        (parts, offer, state)
    }

    /// Cisco CUBE: LF line ends, blank first line, `c=` at both levels, metadata elements
    /// interleaved, empty nameID, GTD part last and no close delimiter.
    #[test]
    fn cisco_cube_shape() {
        let body = "\n--uniqueBoundary\nContent-Disposition: session;handling=required\nContent-Type: application/sdp\n\n\
v=0\no=CiscoSystemsSIP-GW-UserAgent 1001 2002 IN IP4 192.0.2.36\ns=SIP Call\nc=IN IP4 192.0.2.36\nt=0 0\n\
m=audio 10300 RTP/AVP 0 101\nc=IN IP4 192.0.2.37\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\na=ptime:20\na=sendonly\na=label:1\n\
m=audio 10302 RTP/AVP 0 101\nc=IN IP4 192.0.2.37\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\na=ptime:20\na=sendonly\na=label:2\n\n\
--uniqueBoundary\nContent-Disposition: recording-session\nContent-Type: application/rs-metadata+xml\n\n\
<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">\n<datamode>complete</datamode>\n\
<session session_id=\"SESS\">\n<sipSessionID>aaaa;remote=bbbb</sipSessionID>\n<start-time>2024-01-02T03:04:05.060Z</start-time>\n</session>\n\
<participant participant_id=\"P1\">\n<nameID aor=\"sip:7301@192.0.2.10\">\n</nameID>\n</participant>\n\
<participantsessionassoc participant_id=\"P1\" session_id=\"SESS\">\n<associate-time>2024-01-02T03:04:05.060Z</associate-time>\n</participantsessionassoc>\n\
<stream stream_id=\"S1\" session_id=\"SESS\">\n<label>1</label>\n</stream>\n\
<participant participant_id=\"P2\">\n<nameID aor=\"sip:7300@192.0.2.10\">\n<name xml:lang=\"en\">7300</name>\n</nameID>\n</participant>\n\
<stream stream_id=\"S2\" session_id=\"SESS\">\n<label>2</label>\n</stream>\n\
<participantstreamassoc participant_id=\"P1\">\n<send>S1</send>\n<recv>S2</recv>\n</participantstreamassoc>\n\
<participantstreamassoc participant_id=\"P2\">\n<send>S2</send>\n<recv>S1</recv>\n</participantstreamassoc>\n\
</recording>\n\n--uniqueBoundary\nContent-Disposition: signal;handling=optional\nContent-Type: application/gtd\n\nIAM,\nGCI,0123456789abcdef0123456789abcdef\n";
        let (parts, offer, state) = run("multipart/mixed;boundary=uniqueBoundary", body);
        assert_eq!(
            parts.gci.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(parts.ignored_parts, vec!["application/gtd"]);
        assert_eq!(offer.origin_version, 2002);
        assert_eq!(offer.streams.len(), 2);
        assert_eq!(
            offer.streams[0].connection,
            Some("192.0.2.37".parse().unwrap()),
            "media-level c= wins"
        );
        assert_eq!(
            offer.streams[1]
                .telephone_event
                .as_ref()
                .unwrap()
                .fmtp
                .as_deref(),
            Some("0-16")
        );
        let people = state.participants();
        assert_eq!(people.len(), 2);
        assert_eq!(
            (people[0].name.as_deref(), people[0].aor.as_deref()),
            (None, Some("sip:7301@192.0.2.10"))
        );
        assert_eq!(people[0].sends, vec!["1"]);
        assert_eq!(people[1].sends, vec!["2"]);
        assert_eq!(state.session_ids(), vec!["aaaa;remote=bbbb"]);
    }

    /// Oracle/Acme: draft namespace and attributes, `<send>` under participant, per-participant
    /// `apkt:` extension data, `maxptime`, large labels, trailing space after the close delimiter.
    #[test]
    fn acme_draft_shape() {
        let body = "\n--unique-boundary-1\nContent-Type: application/sdp\n\n\
v=0\no=- 20000 500000 IN IP4 192.0.2.140\ns=-\nc=IN IP4 192.0.2.140\nt=0 0\n\
m=audio 20100 RTP/AVP 0\na=rtpmap:0 PCMU/8000\na=label:16777227\na=sendonly\n\
m=audio 20104 RTP/AVP 0\na=rtpmap:0 PCMU/8000\na=maxptime:150\na=label:16777228\na=sendonly\n\n\
--unique-boundary-1\nContent-Type: application/rs-metadata+xml\nContent-Disposition: recording-session\n\n\
<?xml version='1.0' encoding='UTF-8'?>\n<recording xmlns='urn:ietf:params:xml:ns:recording'>\n  <datamode>complete</datamode>\n\
  <session id=\"SID\">\n    <associate-time>2019-03-09T16:50:20</associate-time>\n  </session>\n\
  <participant id=\"PA\" session=\"SID\">\n    <nameID aor=\"sip:9000@192.0.2.102\">\n      <name>9000</name>\n    </nameID>\n\
    <send>STA</send>\n    <associate-time>2019-03-09T16:50:20</associate-time>\n\
    <extensiondata xmlns:apkt=\"http://acmepacket.com/siprec/extensiondata\">\n      <apkt:callingParty>true</apkt:callingParty>\n    </extensiondata>\n  </participant>\n\
  <participant id=\"PB\" session=\"SID\">\n    <nameID aor=\"sip:1002@192.0.2.10\">\n      <name>1002</name>\n    </nameID>\n\
    <send>STB</send>\n    <associate-time>2019-03-09T16:50:20</associate-time>\n\
    <extensiondata xmlns:apkt=\"http://acmepacket.com/siprec/extensiondata\">\n      <apkt:callingParty>false</apkt:callingParty>\n    </extensiondata>\n  </participant>\n\
  <stream id=\"STA\" session=\"SID\">\n    <label>16777227</label>\n    <mode>separate</mode>\n  </stream>\n\
  <stream id=\"STB\" session=\"SID\">\n    <label>16777228</label>\n    <mode>separate</mode>\n  </stream>\n\
</recording>\n--unique-boundary-1-- \n";
        let (_, offer, state) = run("multipart/mixed;boundary=unique-boundary-1", body);
        assert_eq!(offer.streams[1].label.as_deref(), Some("16777228"));
        let people = state.participants();
        assert_eq!(people[0].sends, vec!["16777227"]);
        assert_eq!(people[1].sends, vec!["16777228"]);
        assert_eq!(
            people[1].joined_at,
            metadata::parse_time("2019-03-09T16:50:20Z")
        );
        assert_eq!(
            state.participant_extensions("PA"),
            [("callingParty".to_string(), "true".to_string())]
        );
        assert_eq!(
            state.participant_extensions("PB"),
            [("callingParty".to_string(), "false".to_string())]
        );
        assert!(state.extensions().is_empty());
    }
}
