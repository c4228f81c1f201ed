//! Identifiers of the recorded interaction, from the SIP request and the metadata.
//!
//! The CallUUID (the key that survives transfers and sites) is taken, in order, from: metadata
//! extension data that carries it, the configured headers, the Request-URI `calluuid` parameter
//! (Genesys Media Server), then the metadata group id. Other correlation ids are kept in `extra`.

use rsip::{headers::UntypedHeader, Header, Param};

use super::metadata::MetadataState;
use crate::events::CallIds;

/// The default `uuid_headers` for [`call_ids`].
pub const DEFAULT_UUID_HEADERS: [&str; 1] = ["X-Genesys-CallUUID"];

/// Headers copied to `extra` when present (name as written here).
const EXTRA_HEADERS: [&str; 4] = [
    "Session-ID",
    "Cisco-Guid",
    "X-GenesysConversationID",
    "X-GenesysAgentID",
];

/// Request-URI parameters copied to `extra` (Genesys Media Server recording INVITEs).
const EXTRA_URI_PARAMS: [&str; 3] = ["dn", "recordDN", "otherDN"];

/// Metadata extension names worth keeping as correlation ids (Avaya UCID, Ribbon gcid, ...).
const EXTRA_EXTENSIONS: [&str; 7] = [
    "ucid",
    "AvayaUCID",
    "xucid",
    "guid",
    "gucid",
    "gcid",
    "callid",
];

/// Gathers the interaction identifiers of a recording request.
pub fn call_ids(
    request: &rsip::Request,
    metadata: Option<&MetadataState>,
    uuid_headers: &[String],
) -> CallIds {
    let mut ids = CallIds::default();
    let mut other_headers: Vec<(&str, &str)> = Vec::new();
    for header in request.headers.iter() {
        match header {
            Header::CallId(call_id) if ids.sip_call_id.is_empty() => {
                ids.sip_call_id = call_id.value().trim().to_string();
            }
            Header::Other(name, value) => other_headers.push((name.trim(), value.trim())),
            _ => {}
        }
    }
    let header = |wanted: &str| {
        other_headers
            .iter()
            .find(|(name, value)| name.eq_ignore_ascii_case(wanted) && !value.is_empty())
            .map(|(_, value)| value.to_string())
    };

    let uri_param = |wanted: &str| {
        request.uri.params.iter().find_map(|p| match p {
            Param::Other(name, value) if name.value().eq_ignore_ascii_case(wanted) => value
                .as_ref()
                .map(|v| v.value().trim().to_string())
                .filter(|v| !v.is_empty()),
            _ => None,
        })
    };

    let from_metadata = metadata.and_then(MetadataState::call_uuid);
    let (uuid, source) = match from_metadata {
        Some((uuid, "extensiondata")) => (Some(uuid), Some("extensiondata".to_string())),
        group => {
            let from_header = uuid_headers
                .iter()
                .find_map(|name| header(name).map(|v| (v, format!("header:{name}"))));
            match from_header {
                Some((uuid, source)) => (Some(uuid), Some(source)),
                None => match uri_param("calluuid") {
                    Some(uuid) => (Some(uuid), Some("request-uri".to_string())),
                    None => match group {
                        Some((uuid, source)) => (Some(uuid), Some(source.to_string())),
                        None => (None, None),
                    },
                },
            }
        }
    };
    ids.call_uuid = uuid;
    ids.call_uuid_source = source;

    // Genesys Media Server: `sip:record=<id>@recorder;calluuid=...;dn=...`.
    ids.connection_id = request.uri.user().and_then(|user| {
        let (key, value) = user.split_once('=')?;
        let value = value.trim();
        (key.trim().eq_ignore_ascii_case("record") && !value.is_empty()).then(|| value.to_string())
    });
    for name in EXTRA_URI_PARAMS {
        if let Some(value) = uri_param(name) {
            ids.extra.push((name.to_string(), value));
        }
    }
    for name in EXTRA_HEADERS {
        if let Some(value) = header(name) {
            ids.extra.push((name.to_string(), value));
        }
    }
    if let Some(state) = metadata {
        for (key, value) in state.extensions() {
            if EXTRA_EXTENSIONS
                .iter()
                .any(|k| k.eq_ignore_ascii_case(&key))
            {
                ids.extra.push((key, value));
            }
        }
        for session_id in state.session_ids() {
            ids.extra.push(("sipSessionID".to_string(), session_id));
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siprec::{
        body::tests::{spec_invite, SPEC_INVITE_BODY},
        metadata::parse_metadata,
    };
    use std::time::UNIX_EPOCH;

    fn request(uri: &str, headers: &str, body: &str) -> rsip::Request {
        let text = format!(
            "INVITE {uri} SIP/2.0\r\n\
Via: SIP/2.0/TCP 10.20.0.10:5060;branch=z9hG4bK-4f1c2a\r\n\
From: <sip:src@sbc1.cc.example>;tag=sbc-7731\r\n\
To: <sip:srs@10.20.0.50>\r\n\
Call-ID: rs-0c6e2b11@10.20.0.10\r\n\
CSeq: 1 INVITE\r\n\
{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        rsip::Request::try_from(text.as_bytes()).unwrap()
    }

    fn defaults() -> Vec<String> {
        DEFAULT_UUID_HEADERS.iter().map(|s| s.to_string()).collect()
    }

    fn state(xml: &str) -> MetadataState {
        let mut state = MetadataState::default();
        state.apply(parse_metadata(xml).unwrap(), UNIX_EPOCH);
        state
    }

    const SPEC_HEADERS: &str =
        "Session-ID: 3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f\r\n\
X-Genesys-CallUUID: 0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A\r\n\
Content-Type: multipart/mixed;boundary=rsb-42\r\n";

    #[test]
    fn spec_invite_header_beats_group() {
        let req = request(
            "sip:srs@10.20.0.50:5060;transport=tcp",
            SPEC_HEADERS,
            SPEC_INVITE_BODY,
        );
        let md = state(&spec_invite().metadata.unwrap());
        let ids = call_ids(&req, Some(&md), &defaults());
        assert_eq!(ids.sip_call_id, "rs-0c6e2b11@10.20.0.10");
        assert_eq!(
            ids.call_uuid.as_deref(),
            Some("0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A")
        );
        assert_eq!(
            ids.call_uuid_source.as_deref(),
            Some("header:X-Genesys-CallUUID")
        );
        assert_eq!(ids.connection_id, None);
        assert!(ids.extra.contains(&(
            "Session-ID".into(),
            "3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f".into()
        )));
        assert!(ids.extra.iter().any(|(k, _)| k == "sipSessionID"));
    }

    #[test]
    fn extension_data_beats_header() {
        let req = request("sip:srs@10.20.0.50", SPEC_HEADERS, "");
        let md = state("<recording><extensiondata><ac:GenesysUUID>EXT0000000000000000000000000000A</ac:GenesysUUID><apkt:ucid>00FA08</apkt:ucid></extensiondata></recording>");
        let ids = call_ids(&req, Some(&md), &defaults());
        assert_eq!(
            ids.call_uuid.as_deref(),
            Some("EXT0000000000000000000000000000A")
        );
        assert_eq!(ids.call_uuid_source.as_deref(), Some("extensiondata"));
        assert!(ids.extra.contains(&("ucid".into(), "00FA08".into())));
    }

    #[test]
    fn configured_header_names_are_case_insensitive_and_ordered() {
        let req = request(
            "sip:srs@10.20.0.50",
            "x-my-uuid: MINE\r\nx-genesys-calluuid: GEN\r\nCisco-Guid: 1234-5678\r\n",
            "",
        );
        let names = vec!["X-My-UUID".to_string(), "X-Genesys-CallUUID".to_string()];
        let ids = call_ids(&req, None, &names);
        assert_eq!(ids.call_uuid.as_deref(), Some("MINE"));
        assert_eq!(ids.call_uuid_source.as_deref(), Some("header:X-My-UUID"));
        assert!(ids
            .extra
            .contains(&("Cisco-Guid".into(), "1234-5678".into())));
        let ids = call_ids(&req, None, &defaults());
        assert_eq!(ids.call_uuid.as_deref(), Some("GEN"));
    }

    #[test]
    fn genesys_media_server_request_uri() {
        let req = request(
            "sip:record=0AB3CD@10.20.0.50:5060;CallUUID=4BOKLLA3VH66JF112M1CC9VHKS14F0KP;dn=7002;recordDN=7002;otherDN=5551234",
            "",
            "",
        );
        let md = state("<recording><group group_id='grp'/></recording>");
        let ids = call_ids(&req, Some(&md), &defaults());
        assert_eq!(
            ids.call_uuid.as_deref(),
            Some("4BOKLLA3VH66JF112M1CC9VHKS14F0KP")
        );
        assert_eq!(ids.call_uuid_source.as_deref(), Some("request-uri"));
        assert_eq!(ids.connection_id.as_deref(), Some("0AB3CD"));
        assert_eq!(
            ids.extra,
            vec![
                ("dn".to_string(), "7002".to_string()),
                ("recordDN".to_string(), "7002".to_string()),
                ("otherDN".to_string(), "5551234".to_string()),
            ]
        );
    }

    #[test]
    fn group_id_is_the_last_resort() {
        let req = request("sip:srs@10.20.0.50", "X-Genesys-CallUUID: \r\n", "");
        let md = state("<recording><group group_id='grp-1'/></recording>");
        let ids = call_ids(&req, Some(&md), &defaults());
        assert_eq!(ids.call_uuid.as_deref(), Some("grp-1"));
        assert_eq!(ids.call_uuid_source.as_deref(), Some("group"));
        let none = call_ids(&req, None, &defaults());
        assert_eq!((none.call_uuid, none.call_uuid_source), (None, None));
    }
}
