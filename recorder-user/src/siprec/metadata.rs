//! RFC 7865 recording metadata: parsing one XML document and merging successive documents.
//!
//! Real clients disagree on the schema (see the interop notes): namespaces and prefixes vary
//! (`:1`, the draft namespace, `tns:`), draft documents use `id`/`session`/`participant`
//! attributes and put `<send>`/`<recv>` under `<participant>`, `dataMode` and `Partial` change
//! case, times come with or without zone, and vendors add extension elements anywhere. So the
//! document is read with quick-xml into a small element tree keyed by *local* names, and that tree
//! is interpreted leniently: an element without the id it needs is skipped, a bad time is `None`.
//! The document itself is untrusted: DTDs (and with them external entities) are refused, and size,
//! depth and element count are capped.

use std::{collections::HashMap, time::SystemTime};

use quick_xml::events::{BytesStart, Event};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::events::Participant;

/// Largest metadata document accepted.
pub const MAX_METADATA_LEN: usize = 128 * 1024;
/// Deepest element nesting accepted (real documents use 4).
pub const MAX_DEPTH: usize = 32;
/// Most elements accepted in one document.
pub const MAX_ELEMENTS: usize = 10_000;

/// Why a metadata document was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("metadata of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    /// `<!DOCTYPE>` is refused outright: it is the door to entity expansion and XXE.
    #[error("metadata contains a DTD, which is not allowed")]
    Dtd,
    #[error("metadata nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    #[error("metadata has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("malformed metadata XML: {0}")]
    Xml(String),
    #[error("metadata root element is <{0}>, expected <recording>")]
    UnexpectedRoot(String),
    #[error("metadata has no root element")]
    Empty,
}

impl MetadataError {
    /// The SIP response code for a request whose metadata fails this way.
    pub fn status_code(&self) -> u16 {
        match self {
            MetadataError::TooLarge { .. } => 413,
            _ => 400,
        }
    }
}

/// `<group>`: groups communication sessions (constant across transfers for many SRCs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub associate_time: Option<SystemTime>,
    pub disassociate_time: Option<SystemTime>,
}

/// `<session>`: one communication session (the recorded call).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// `sipSessionID` values (RFC 7989 Session-ID, or a plain Call-ID from some SRCs).
    pub sip_session_ids: Vec<String>,
    pub group_ref: Option<String>,
    /// `start-time` (draft documents: `associate-time`).
    pub start_time: Option<SystemTime>,
    /// `stop-time` (Cisco: `end-time`).
    pub stop_time: Option<SystemTime>,
    pub reason: Option<String>,
}

/// `<participant>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantMeta {
    pub id: String,
    /// `nameID@aor`, with stray spaces removed.
    pub aor: Option<String>,
    pub name: Option<String>,
    /// Draft form: stream ids under `<participant>`.
    pub send: Vec<String>,
    pub recv: Vec<String>,
    /// Draft/Sonus form: times under `<participant>`.
    pub associate_time: Option<SystemTime>,
    pub disassociate_time: Option<SystemTime>,
    /// Extension elements inside this participant (Acme `callingParty`, Intrado `role`): kept
    /// here because the same names repeat per participant.
    pub extensions: Vec<(String, String)>,
}

/// `<stream>`: joins metadata to SDP through its label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub id: String,
    pub session_id: Option<String>,
    pub label: Option<String>,
}

/// `<sessionrecordingassoc>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecordingAssoc {
    pub session_id: String,
    pub associate_time: Option<SystemTime>,
    pub disassociate_time: Option<SystemTime>,
}

/// `<participantsessionassoc>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantSessionAssoc {
    pub participant_id: String,
    pub session_id: Option<String>,
    pub associate_time: Option<SystemTime>,
    pub disassociate_time: Option<SystemTime>,
}

/// `<participantstreamassoc>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantStreamAssoc {
    pub participant_id: String,
    /// Stream ids the participant sends (its voice).
    pub send: Vec<String>,
    pub recv: Vec<String>,
    pub associate_time: Option<SystemTime>,
    pub disassociate_time: Option<SystemTime>,
}

/// One parsed metadata document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataDoc {
    /// `datamode` is `partial` (merge) rather than `complete` (replace, also the default).
    pub partial: bool,
    pub groups: Vec<Group>,
    pub sessions: Vec<Session>,
    pub participants: Vec<ParticipantMeta>,
    pub streams: Vec<StreamMeta>,
    pub session_recording_assocs: Vec<SessionRecordingAssoc>,
    pub participant_session_assocs: Vec<ParticipantSessionAssoc>,
    pub participant_stream_assocs: Vec<ParticipantStreamAssoc>,
    /// Text of extension elements (`extensiondata` content and unknown elements anywhere) as
    /// (local name, text); an element with a `label` attribute is keyed `name:label`.
    pub extensions: Vec<(String, String)>,
}

/// An element with namespace prefixes stripped from its name and attribute names.
#[derive(Debug, Default)]
struct Node {
    name: String,
    attrs: Vec<(String, String)>,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The first attribute among `names` (RFC name first, then draft names).
    fn attr(&self, names: &[&str]) -> Option<String> {
        names.iter().find_map(|name| {
            self.attrs
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        })
    }

    fn trimmed(&self) -> Option<String> {
        let text = self.text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }
}

fn local(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn node_from(start: &BytesStart<'_>) -> Result<Node, MetadataError> {
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| MetadataError::Xml(e.to_string()))?;
        let value = attr
            .unescape_value()
            .map_err(|e| MetadataError::Xml(e.to_string()))?;
        attrs.push((local(attr.key.local_name().as_ref()), value.into_owned()));
    }
    Ok(Node {
        name: local(start.local_name().as_ref()),
        attrs,
        ..Node::default()
    })
}

/// Reads the document into a tree; only the root element and its descendants are kept.
fn parse_tree(xml: &str) -> Result<Node, MetadataError> {
    if xml.len() > MAX_METADATA_LEN {
        return Err(MetadataError::TooLarge {
            size: xml.len(),
            max: MAX_METADATA_LEN,
        });
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut elements = 0usize;
    let xml_err = |e: quick_xml::Error| MetadataError::Xml(e.to_string());
    loop {
        let finished = match reader.read_event().map_err(xml_err)? {
            Event::DocType(_) => return Err(MetadataError::Dtd),
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(MetadataError::TooDeep);
                }
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(MetadataError::TooManyElements);
                }
                stack.push(node_from(&start)?);
                None
            }
            Event::Empty(start) => {
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(MetadataError::TooManyElements);
                }
                Some(node_from(&start)?)
            }
            Event::End(_) => stack.pop(),
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text.unescape().map_err(xml_err)?);
                }
                None
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&data));
                }
                None
            }
            Event::Eof => break,
            _ => None,
        };
        if let Some(node) = finished {
            match stack.last_mut() {
                Some(parent) => parent.children.push(node),
                None if root.is_none() => root = Some(node),
                None => return Err(MetadataError::Xml("more than one root element".into())),
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(MetadataError::Xml(format!("<{}> is not closed", open.name)));
    }
    root.ok_or(MetadataError::Empty)
}

/// Parses one metadata document.
/// Content type of a metadata snapshot request (RFC 7866 §9, IANA registration).
pub const SNAPSHOT_REQUEST_TYPE: &str = "application/rs-metadata-request";

/// The body of a metadata snapshot request: asks the SRC for a complete metadata snapshot,
/// saying why in `reason` (escaped here).
pub fn snapshot_request_xml(reason: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <requestsnapshot xmlns=\"urn:ietf:params:xml:ns:recording:1\">\
         <requestreason xml:lang=\"en\">{}</requestreason></requestsnapshot>\n",
        quick_xml::escape::escape(reason)
    )
}

pub fn parse_metadata(xml: &str) -> Result<MetadataDoc, MetadataError> {
    let root = parse_tree(xml)?;
    // `recording` per RFC 7865; BroadWorks uses `recording_metadata`.
    if !root.name.to_ascii_lowercase().starts_with("recording") {
        return Err(MetadataError::UnexpectedRoot(root.name));
    }
    let mut doc = MetadataDoc::default();
    for node in &root.children {
        match node.name.to_ascii_lowercase().as_str() {
            "datamode" => {
                doc.partial = node.text.trim().eq_ignore_ascii_case("partial");
            }
            "group" => read_group(node, &mut doc),
            "session" => read_session(node, &mut doc),
            "participant" => read_participant(node, &mut doc),
            "stream" => read_stream(node, &mut doc),
            "sessionrecordingassoc" => {
                if let Some(session_id) = node.attr(&["session_id", "session"]) {
                    let (associate_time, disassociate_time) = assoc_times(node);
                    doc.session_recording_assocs.push(SessionRecordingAssoc {
                        session_id,
                        associate_time,
                        disassociate_time,
                    });
                }
            }
            "participantsessionassoc" => {
                if let Some(participant_id) = node.attr(&["participant_id", "participant"]) {
                    let (associate_time, disassociate_time) = assoc_times(node);
                    doc.participant_session_assocs
                        .push(ParticipantSessionAssoc {
                            participant_id,
                            session_id: node.attr(&["session_id", "session"]),
                            associate_time,
                            disassociate_time,
                        });
                }
            }
            "participantstreamassoc" => {
                if let Some(participant_id) = node.attr(&["participant_id", "participant"]) {
                    let (associate_time, disassociate_time) = assoc_times(node);
                    doc.participant_stream_assocs.push(ParticipantStreamAssoc {
                        participant_id,
                        send: texts(node, "send"),
                        recv: texts(node, "recv"),
                        associate_time,
                        disassociate_time,
                    });
                }
            }
            _ => collect_extensions(node, &mut doc.extensions),
        }
    }
    Ok(doc)
}

fn child<'a>(node: &'a Node, name: &str) -> Option<&'a Node> {
    node.children.iter().find(|c| c.is(name))
}

fn child_time(node: &Node, name: &str) -> Option<SystemTime> {
    child(node, name).and_then(|c| parse_time(&c.text))
}

fn assoc_times(node: &Node) -> (Option<SystemTime>, Option<SystemTime>) {
    (
        child_time(node, "associate-time"),
        child_time(node, "disassociate-time"),
    )
}

/// Non-empty texts of all children called `name`.
fn texts(node: &Node, name: &str) -> Vec<String> {
    node.children
        .iter()
        .filter(|c| c.is(name))
        .filter_map(Node::trimmed)
        .collect()
}

/// Children not in `known` go to the extension list.
fn extensions_except(node: &Node, known: &[&str], out: &mut Vec<(String, String)>) {
    for c in &node.children {
        if !known.iter().any(|k| c.is(k)) {
            collect_extensions(c, out);
        }
    }
}

/// Leaf texts under `node` (itself included when it is a leaf).
fn collect_extensions(node: &Node, out: &mut Vec<(String, String)>) {
    if node.children.is_empty() {
        if let Some(text) = node.trimmed() {
            let key = match node.attr(&["label"]) {
                Some(label) => format!("{}:{label}", node.name),
                None => node.name.clone(),
            };
            out.push((key, text));
        }
        return;
    }
    for c in &node.children {
        collect_extensions(c, out);
    }
}

fn read_group(node: &Node, doc: &mut MetadataDoc) {
    let (associate_time, disassociate_time) = assoc_times(node);
    extensions_except(
        node,
        &["associate-time", "disassociate-time"],
        &mut doc.extensions,
    );
    if let Some(id) = node.attr(&["group_id", "id"]) {
        doc.groups.push(Group {
            id,
            associate_time,
            disassociate_time,
        });
    }
}

fn read_session(node: &Node, doc: &mut MetadataDoc) {
    extensions_except(
        node,
        &[
            "sipSessionID",
            "group-ref",
            "start-time",
            "associate-time",
            "stop-time",
            "end-time",
            "disassociate-time",
            "reason",
        ],
        &mut doc.extensions,
    );
    let Some(id) = node.attr(&["session_id", "id"]) else {
        return;
    };
    doc.sessions.push(Session {
        id,
        sip_session_ids: texts(node, "sipSessionID"),
        group_ref: child(node, "group-ref").and_then(Node::trimmed),
        start_time: child_time(node, "start-time").or_else(|| child_time(node, "associate-time")),
        stop_time: child_time(node, "stop-time")
            .or_else(|| child_time(node, "end-time"))
            .or_else(|| child_time(node, "disassociate-time")),
        reason: child(node, "reason").and_then(Node::trimmed),
    });
}

fn read_participant(node: &Node, doc: &mut MetadataDoc) {
    let mut extensions = Vec::new();
    extensions_except(
        node,
        &[
            "nameID",
            "aor",
            "name",
            "send",
            "recv",
            "associate-time",
            "disassociate-time",
        ],
        &mut extensions,
    );
    let Some(id) = node.attr(&["participant_id", "id"]) else {
        return;
    };
    let name_id = child(node, "nameID");
    // `sip: 7774442214 @10.104.54.52` (Cisco docs): an AOR never contains spaces.
    let aor = name_id
        .and_then(|n| n.attr(&["aor"]))
        .or_else(|| child(node, "aor").and_then(Node::trimmed))
        .map(|a| a.split_whitespace().collect::<String>())
        .filter(|a| !a.is_empty());
    let name = name_id
        .and_then(|n| child(n, "name"))
        .or_else(|| child(node, "name"))
        .and_then(Node::trimmed);
    let (associate_time, disassociate_time) = assoc_times(node);
    doc.participants.push(ParticipantMeta {
        id,
        aor,
        name,
        send: texts(node, "send"),
        recv: texts(node, "recv"),
        associate_time,
        disassociate_time,
        extensions,
    });
}

fn read_stream(node: &Node, doc: &mut MetadataDoc) {
    extensions_except(
        node,
        &[
            "label",
            "mode",
            "associate-time",
            "disassociate-time",
            "content-type",
        ],
        &mut doc.extensions,
    );
    if let Some(id) = node.attr(&["stream_id", "id"]) {
        doc.streams.push(StreamMeta {
            id,
            session_id: node.attr(&["session_id", "session"]),
            label: child(node, "label").and_then(Node::trimmed),
        });
    }
}

/// An xs:dateTime as SRCs write it: `Z`, fractional seconds, no zone (taken as UTC),
/// `-06:00`, or `+0200` without a colon (OpenSIPS `%z`). `None` for anything else.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    use time::{macros::format_description, PrimitiveDateTime, UtcOffset};

    let text = text.trim();
    // Date and time are at least `YYYY-MM-DDTHH:MM:SS`; the zone, if any, follows the time.
    let date = text.get(..10)?;
    let rest = text[10..].strip_prefix(['T', 't', ' '])?;
    let (clock, offset) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, UtcOffset::UTC)
    } else if let Some(pos) = rest.find(['+', '-']) {
        let (clock, zone) = rest.split_at(pos);
        let negative = zone.starts_with('-');
        let digits: String = zone[1..].chars().filter(|c| *c != ':').collect();
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let hours: i8 = digits[..2].parse().ok()?;
        let minutes: i8 = digits[2..].parse().ok()?;
        let sign = if negative { -1 } else { 1 };
        (
            clock,
            UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?,
        )
    } else {
        (rest, UtcOffset::UTC)
    };
    let format = format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    let local = PrimitiveDateTime::parse(&format!("{date}T{clock}"), &format).ok()?;
    Some(local.assume_offset(offset).into())
}

/// Metadata merged over the life of a recording session.
/// Serializable so that a restarted daemon carries it on (see `session::RecorderHandover`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetadataState {
    groups: Vec<Group>,
    sessions: Vec<Session>,
    participants: Vec<ParticipantMeta>,
    streams: Vec<StreamMeta>,
    session_recording_assocs: Vec<SessionRecordingAssoc>,
    participant_session_assocs: Vec<ParticipantSessionAssoc>,
    participant_stream_assocs: Vec<ParticipantStreamAssoc>,
    extensions: Vec<(String, String)>,
    /// When each participant id was first seen; the join time of last resort.
    first_seen: HashMap<String, SystemTime>,
    /// Participants that a `complete` snapshot no longer lists, frozen as they were, so a
    /// recording keeps who was on the call.
    departed: Vec<Participant>,
    documents: u32,
}

/// Finds the entry `matches` selects, or appends a default one that `init` gives its key.
fn upsert<T: Default>(
    items: &mut Vec<T>,
    matches: impl Fn(&T) -> bool,
    init: impl FnOnce(&mut T),
) -> &mut T {
    match items.iter().position(matches) {
        Some(i) => &mut items[i],
        None => {
            let mut item = T::default();
            init(&mut item);
            items.push(item);
            items.last_mut().expect("just pushed")
        }
    }
}

/// Sets `key` to `value`, keeping the position of an existing key.
fn upsert_pair(pairs: &mut Vec<(String, String)>, key: String, value: String) {
    match pairs.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => pairs.push((key, value)),
    }
}

fn merge_opt<T>(into: &mut Option<T>, from: Option<T>) {
    if from.is_some() {
        *into = from;
    }
}

fn merge_list(into: &mut Vec<String>, from: Vec<String>) {
    for item in from {
        if !into.contains(&item) {
            into.push(item);
        }
    }
}

/// Association times: a new associate-time after a recorded disassociation re-opens it.
fn merge_times(
    associate: &mut Option<SystemTime>,
    disassociate: &mut Option<SystemTime>,
    new_associate: Option<SystemTime>,
    new_disassociate: Option<SystemTime>,
) {
    if let Some(at) = new_associate {
        if new_disassociate.is_none() && disassociate.is_some_and(|left| left <= at) {
            *disassociate = None;
        }
        // The first join stays the join time.
        *associate = Some(associate.map_or(at, |old| old.min(at)));
    }
    merge_opt(disassociate, new_disassociate);
}

impl MetadataState {
    /// Applies a document: `complete` replaces what was known, `partial` merges into it.
    pub fn apply(&mut self, doc: MetadataDoc, received_at: SystemTime) {
        self.documents += 1;
        if !doc.partial {
            let before = self.participants();
            let kept: Vec<&str> = doc.participants.iter().map(|p| p.id.as_str()).collect();
            self.departed.retain(|p| !kept.contains(&p.id.as_str()));
            for mut p in before {
                if !kept.contains(&p.id.as_str()) && !self.departed.iter().any(|d| d.id == p.id) {
                    p.left_at.get_or_insert(received_at);
                    self.departed.push(p);
                }
            }
            let departed = std::mem::take(&mut self.departed);
            let first_seen = std::mem::take(&mut self.first_seen);
            let documents = self.documents;
            *self = MetadataState {
                departed,
                first_seen,
                documents,
                ..MetadataState::default()
            };
        }
        for g in doc.groups {
            let entry = upsert(&mut self.groups, |x| x.id == g.id, |x| x.id = g.id.clone());
            merge_times(
                &mut entry.associate_time,
                &mut entry.disassociate_time,
                g.associate_time,
                g.disassociate_time,
            );
        }
        for s in doc.sessions {
            let entry = upsert(
                &mut self.sessions,
                |x| x.id == s.id,
                |x| x.id = s.id.clone(),
            );
            merge_list(&mut entry.sip_session_ids, s.sip_session_ids);
            merge_opt(&mut entry.group_ref, s.group_ref);
            merge_opt(&mut entry.start_time, s.start_time);
            merge_opt(&mut entry.stop_time, s.stop_time);
            merge_opt(&mut entry.reason, s.reason);
        }
        for p in doc.participants {
            self.first_seen.entry(p.id.clone()).or_insert(received_at);
            let entry = upsert(
                &mut self.participants,
                |x| x.id == p.id,
                |x| x.id = p.id.clone(),
            );
            merge_opt(&mut entry.aor, p.aor);
            merge_opt(&mut entry.name, p.name);
            merge_list(&mut entry.send, p.send);
            merge_list(&mut entry.recv, p.recv);
            for (key, value) in p.extensions {
                upsert_pair(&mut entry.extensions, key, value);
            }
            merge_times(
                &mut entry.associate_time,
                &mut entry.disassociate_time,
                p.associate_time,
                p.disassociate_time,
            );
        }
        for s in doc.streams {
            let entry = upsert(&mut self.streams, |x| x.id == s.id, |x| x.id = s.id.clone());
            merge_opt(&mut entry.session_id, s.session_id);
            merge_opt(&mut entry.label, s.label);
        }
        for a in doc.session_recording_assocs {
            let entry = upsert(
                &mut self.session_recording_assocs,
                |x| x.session_id == a.session_id,
                |x| x.session_id = a.session_id.clone(),
            );
            merge_times(
                &mut entry.associate_time,
                &mut entry.disassociate_time,
                a.associate_time,
                a.disassociate_time,
            );
        }
        for a in doc.participant_session_assocs {
            let entry = upsert(
                &mut self.participant_session_assocs,
                // An association that omits its session matches the participant's (first) one.
                |x| {
                    x.participant_id == a.participant_id
                        && (a.session_id.is_none()
                            || x.session_id.is_none()
                            || x.session_id == a.session_id)
                },
                |x| x.participant_id = a.participant_id.clone(),
            );
            merge_opt(&mut entry.session_id, a.session_id);
            merge_times(
                &mut entry.associate_time,
                &mut entry.disassociate_time,
                a.associate_time,
                a.disassociate_time,
            );
        }
        for a in doc.participant_stream_assocs {
            let entry = upsert(
                &mut self.participant_stream_assocs,
                |x| x.participant_id == a.participant_id,
                |x| x.participant_id = a.participant_id.clone(),
            );
            // The send/recv lists of an association are the current sets: replace them.
            if !a.send.is_empty() || !a.recv.is_empty() {
                entry.send = a.send;
                entry.recv = a.recv;
            }
            merge_times(
                &mut entry.associate_time,
                &mut entry.disassociate_time,
                a.associate_time,
                a.disassociate_time,
            );
        }
        for (key, value) in doc.extensions {
            upsert_pair(&mut self.extensions, key, value);
        }
    }

    /// Number of documents applied so far.
    pub fn documents(&self) -> u32 {
        self.documents
    }

    /// Participants with their join/leave times and the labels of the streams they send and
    /// receive; participants dropped by a later complete snapshot come last.
    pub fn participants(&self) -> Vec<Participant> {
        let mut out: Vec<Participant> = self
            .participants
            .iter()
            .map(|p| self.participant(p))
            .collect();
        out.extend(
            self.departed
                .iter()
                .filter(|d| !out.iter().any(|p| p.id == d.id))
                .cloned()
                .collect::<Vec<_>>(),
        );
        out
    }

    fn participant(&self, p: &ParticipantMeta) -> Participant {
        let sessions: Vec<&ParticipantSessionAssoc> = self
            .participant_session_assocs
            .iter()
            .filter(|a| a.participant_id == p.id)
            .collect();
        let streams = self
            .participant_stream_assocs
            .iter()
            .find(|a| a.participant_id == p.id);
        let session_joined = sessions.iter().filter_map(|a| a.associate_time).min();
        // Gone only when every session association is closed.
        let session_left =
            if !sessions.is_empty() && sessions.iter().all(|a| a.disassociate_time.is_some()) {
                sessions.iter().filter_map(|a| a.disassociate_time).max()
            } else {
                None
            };
        let (send, recv) = match streams {
            Some(a) if !a.send.is_empty() || !a.recv.is_empty() => (&a.send, &a.recv),
            _ => (&p.send, &p.recv),
        };
        let labels = |ids: &Vec<String>| -> Vec<String> {
            ids.iter()
                .filter_map(|id| self.label_of_stream(id).map(String::from))
                .collect()
        };
        Participant {
            id: p.id.clone(),
            name: p.name.clone(),
            aor: p.aor.clone(),
            joined_at: session_joined
                .or(streams.and_then(|a| a.associate_time))
                .or(p.associate_time)
                .or_else(|| self.first_seen.get(&p.id).copied()),
            left_at: session_left
                .or(streams.and_then(|a| a.disassociate_time))
                .or(p.disassociate_time)
                .or_else(|| self.left_with_sessions(&sessions, send, recv)),
            sends: labels(send),
            receives: labels(recv),
        }
    }

    /// Persistent recording sessions (RFC 7866, RFC 7865 `sessionrecordingassoc`): when
    /// the communication sessions a participant belongs to have left the recording session
    /// (`disassociate-time`), the participant has left too, at the latest of those times; the
    /// recording itself goes on. A participant's sessions are its `participantsessionassoc`
    /// ones (each closed by its own time or its session's), else those of the streams it
    /// sends or receives. `None` while any of them is still recorded.
    fn left_with_sessions(
        &self,
        assocs: &[&ParticipantSessionAssoc],
        send: &[String],
        recv: &[String],
    ) -> Option<SystemTime> {
        let session_end = |session_id: Option<&String>| {
            let id = session_id?;
            self.session_recording_assocs
                .iter()
                .find(|a| &a.session_id == id)?
                .disassociate_time
        };
        let ends: Vec<Option<SystemTime>> = if assocs.is_empty() {
            send.iter()
                .chain(recv)
                .map(|stream_id| {
                    let stream = self.streams.iter().find(|s| &s.id == stream_id)?;
                    session_end(stream.session_id.as_ref())
                })
                .collect()
        } else {
            assocs
                .iter()
                .map(|a| {
                    a.disassociate_time
                        .or_else(|| session_end(a.session_id.as_ref()))
                })
                .collect()
        };
        if ends.is_empty() || ends.iter().any(Option::is_none) {
            return None;
        }
        ends.into_iter().flatten().max()
    }

    /// Extension (name, text) pairs found inside one participant's element.
    pub fn participant_extensions(&self, participant_id: &str) -> &[(String, String)] {
        self.participants
            .iter()
            .find(|p| p.id == participant_id)
            .map_or(&[], |p| p.extensions.as_slice())
    }

    /// The SDP label of a metadata stream id.
    pub fn label_of_stream(&self, stream_id: &str) -> Option<&str> {
        self.streams
            .iter()
            .find(|s| s.id == stream_id)
            .and_then(|s| s.label.as_deref())
    }

    /// Stream and participant ids referenced by associations but never described (or streams
    /// without a label): a sign that a partial update was missed, worth a snapshot request.
    pub fn unresolved_refs(&self) -> Vec<String> {
        let mut out = Vec::new();
        let stream_refs = self
            .participant_stream_assocs
            .iter()
            .flat_map(|a| a.send.iter().chain(&a.recv))
            .chain(
                self.participants
                    .iter()
                    .flat_map(|p| p.send.iter().chain(&p.recv)),
            );
        for id in stream_refs {
            if self.label_of_stream(id).is_none() && !out.contains(id) {
                out.push(id.clone());
            }
        }
        let participant_refs = self
            .participant_session_assocs
            .iter()
            .map(|a| &a.participant_id)
            .chain(
                self.participant_stream_assocs
                    .iter()
                    .map(|a| &a.participant_id),
            );
        for id in participant_refs {
            if !self.participants.iter().any(|p| &p.id == id) && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }

    /// The interaction id: an extension element known to carry it (Genesys CallUUID as sent by
    /// AudioCodes and others), else the first group id.
    pub fn call_uuid(&self) -> Option<(String, &'static str)> {
        const KEYS: [&str; 4] = [
            "GenesysUUID",
            "GenesysCallUUID",
            "CallUUID",
            "X-Genesys-CallUUID",
        ];
        KEYS.iter()
            .find_map(|key| {
                self.extensions
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| (v.clone(), "extensiondata"))
            })
            .or_else(|| self.groups.first().map(|g| (g.id.clone(), "group")))
    }

    /// Extension (name, text) pairs, latest value per name, in first-seen order.
    pub fn extensions(&self) -> Vec<(String, String)> {
        self.extensions.clone()
    }

    /// All `sipSessionID` values.
    pub fn session_ids(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.sessions {
            merge_list(&mut out, s.sip_session_ids.clone());
        }
        out
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn sessions(&self) -> &[Session] {
        &self.sessions
    }

    pub fn streams(&self) -> &[StreamMeta] {
        &self.streams
    }

    /// Session ↔ recording associations (a disassociate-time ends a persistent RS's session).
    pub fn session_recording_assocs(&self) -> &[SessionRecordingAssoc] {
        &self.session_recording_assocs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_request_body_escapes_the_reason() {
        let xml = snapshot_request_xml("ids <a> & \"b\"");
        assert!(xml.contains("ids &lt;a&gt; &amp; &quot;b&quot;"), "{xml}");
        assert!(xml.contains(
            r#"<requestsnapshot xmlns="urn:ietf:params:xml:ns:recording:1"><requestreason xml:lang="en">"#
        ));
        assert!(xml
            .trim_end()
            .ends_with("</requestreason></requestsnapshot>"));
    }
    use crate::siprec::body::tests::{spec_invite, spec_reinvite};
    use std::time::{Duration, UNIX_EPOCH};

    fn at(text: &str) -> SystemTime {
        parse_time(text).unwrap()
    }

    fn spec_state() -> MetadataState {
        let mut state = MetadataState::default();
        let doc = parse_metadata(&spec_invite().metadata.unwrap()).unwrap();
        state.apply(doc, at("2025-03-04T10:15:03Z"));
        state
    }

    #[test]
    fn times_in_every_form() {
        let base = UNIX_EPOCH + Duration::from_secs(1_292_542_867); // 2010-12-16T23:41:07Z
        assert_eq!(parse_time("2010-12-16T23:41:07Z"), Some(base));
        assert_eq!(parse_time(" 2010-12-16T23:41:07z\n"), Some(base));
        assert_eq!(
            parse_time("2010-12-16T23:41:07"),
            Some(base),
            "no zone is UTC"
        );
        assert_eq!(
            parse_time("2010-12-16T23:41:07.293Z"),
            Some(base + Duration::from_millis(293))
        );
        assert_eq!(parse_time("2010-12-16T17:41:07-06:00"), Some(base));
        assert_eq!(parse_time("2010-12-17T01:41:07+0200"), Some(base));
        assert_eq!(
            parse_time("2010-12-17T01:41:07.5+02:00"),
            Some(base + Duration::from_millis(500))
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        for bad in [
            "",
            "yesterday",
            "2010-12-16",
            "2010-13-16T23:41:07Z",
            "2010-12-16T23:41:07+2",
            "2010-12-16T25:00:00Z",
            "2010-12-16T23:41:07+99:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn spec_invite_metadata() {
        let doc = parse_metadata(&spec_invite().metadata.unwrap()).unwrap();
        assert!(!doc.partial);
        assert_eq!(doc.groups.len(), 1);
        assert_eq!(doc.groups[0].id, "Q2dXbH1xTr6yb0f8kP3aJg==");
        assert_eq!(
            doc.groups[0].associate_time,
            Some(at("2025-03-04T10:15:02Z"))
        );
        let session = &doc.sessions[0];
        assert_eq!(session.id, "mT0b4zR8Sxq1dQm5n9VqKw==");
        assert_eq!(
            session.sip_session_ids,
            vec!["3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"]
        );
        assert_eq!(
            session.group_ref.as_deref(),
            Some("Q2dXbH1xTr6yb0f8kP3aJg==")
        );
        assert_eq!(session.start_time, Some(at("2025-03-04T10:15:02Z")));
        assert_eq!(doc.participants.len(), 2);
        assert_eq!(
            doc.participants[1].aor.as_deref(),
            Some("sip:7002@cc.example")
        );
        assert_eq!(doc.participants[1].name.as_deref(), Some("Agent 7002"));
        assert_eq!(doc.streams.len(), 2);
        assert_eq!(doc.streams[0].label.as_deref(), Some("1"));
        assert_eq!(doc.session_recording_assocs.len(), 1);
        assert_eq!(doc.participant_session_assocs.len(), 2);
        assert_eq!(
            doc.participant_stream_assocs[1].send,
            vec!["s2Kp7eT5W1oN6d3Ym8ZqJw=="]
        );
        assert!(doc.extensions.is_empty());

        let state = spec_state();
        let people = state.participants();
        assert_eq!(people.len(), 2);
        assert_eq!(people[0].name.as_deref(), Some("Customer"));
        assert_eq!(people[0].sends, vec!["1"]);
        assert_eq!(people[0].receives, vec!["2"]);
        assert_eq!(people[1].sends, vec!["2"]);
        assert_eq!(people[1].joined_at, Some(at("2025-03-04T10:15:02Z")));
        assert_eq!(people[1].left_at, None);
        assert_eq!(
            state.call_uuid(),
            Some(("Q2dXbH1xTr6yb0f8kP3aJg==".to_string(), "group"))
        );
        assert_eq!(state.session_ids().len(), 1);
        assert!(state.unresolved_refs().is_empty());
    }

    #[test]
    fn spec_transfer_partial_update_merges() {
        let mut state = spec_state();
        let doc = parse_metadata(&spec_reinvite().metadata.unwrap()).unwrap();
        assert!(doc.partial);
        state.apply(doc, at("2025-03-04T10:21:41Z"));
        assert_eq!(state.documents(), 2);
        let people = state.participants();
        assert_eq!(people.len(), 3);
        let transfer = at("2025-03-04T10:21:40Z");
        let customer = &people[0];
        assert_eq!(customer.left_at, None);
        assert_eq!(customer.sends, vec!["1"]);
        let old_agent = people
            .iter()
            .find(|p| p.name.as_deref() == Some("Agent 7002"))
            .unwrap();
        assert_eq!(old_agent.joined_at, Some(at("2025-03-04T10:15:02Z")));
        assert_eq!(old_agent.left_at, Some(transfer));
        let new_agent = people
            .iter()
            .find(|p| p.name.as_deref() == Some("Agent 7003"))
            .unwrap();
        assert_eq!(new_agent.aor.as_deref(), Some("sip:7003@cc.example"));
        assert_eq!(new_agent.joined_at, Some(transfer));
        assert_eq!(new_agent.left_at, None);
        assert_eq!(new_agent.sends, vec!["2"]);
        assert_eq!(new_agent.receives, vec!["1"]);
        // Data from the first document that the partial one did not touch is still there.
        assert_eq!(state.label_of_stream("s1Fw9uR3Q7iL2c8Vb4NxEw=="), Some("1"));
        assert_eq!(state.groups().len(), 1);
    }

    #[test]
    fn complete_snapshot_replaces_but_keeps_departed_participants() {
        let mut state = spec_state();
        let snapshot = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <participant participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw=="><nameID aor="sip:+493012345678@carrier.example"/></participant>
  <stream stream_id="n1" session_id="x"><label>1</label></stream>
  <participantstreamassoc participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw=="><send>n1</send></participantstreamassoc>
</recording>"#;
        let received = at("2025-03-04T10:30:00Z");
        state.apply(parse_metadata(snapshot).unwrap(), received);
        let people = state.participants();
        assert_eq!(people.len(), 2);
        assert_eq!(people[0].sends, vec!["1"]);
        assert_eq!(
            people[0].name, None,
            "complete snapshot replaced the old name"
        );
        assert_eq!(people[1].name.as_deref(), Some("Agent 7002"));
        assert_eq!(people[1].left_at, Some(received));
        assert_eq!(state.label_of_stream("s1Fw9uR3Q7iL2c8Vb4NxEw=="), None);
        assert!(state.groups().is_empty());
    }

    /// A persistent recording session carrying two calls: A (customer + agent, with session
    /// associations) and B (a participant tied to it only through its stream).
    const PERSISTENT: &str = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <session session_id="cs-A"><start-time>2025-03-04T10:00:00Z</start-time></session>
  <session session_id="cs-B"><start-time>2025-03-04T10:02:00Z</start-time></session>
  <participant participant_id="a-cust"><nameID aor="sip:cust@x"/></participant>
  <participant participant_id="a-agent"><nameID aor="sip:7002@cc"/></participant>
  <participant participant_id="b-cust"><nameID aor="sip:other@x"/></participant>
  <stream stream_id="st-a1" session_id="cs-A"><label>1</label></stream>
  <stream stream_id="st-a2" session_id="cs-A"><label>2</label></stream>
  <stream stream_id="st-b1" session_id="cs-B"><label>3</label></stream>
  <sessionrecordingassoc session_id="cs-A"><associate-time>2025-03-04T10:00:00Z</associate-time></sessionrecordingassoc>
  <sessionrecordingassoc session_id="cs-B"><associate-time>2025-03-04T10:02:00Z</associate-time></sessionrecordingassoc>
  <participantsessionassoc participant_id="a-cust" session_id="cs-A"><associate-time>2025-03-04T10:00:00Z</associate-time></participantsessionassoc>
  <participantsessionassoc participant_id="a-agent" session_id="cs-A"><associate-time>2025-03-04T10:00:05Z</associate-time></participantsessionassoc>
  <participantstreamassoc participant_id="a-cust"><send>st-a1</send></participantstreamassoc>
  <participantstreamassoc participant_id="a-agent"><send>st-a2</send></participantstreamassoc>
  <participantstreamassoc participant_id="b-cust"><send>st-b1</send></participantstreamassoc>
</recording>"#;

    #[test]
    fn session_leaving_a_persistent_recording_ends_its_participants_only() {
        let mut state = MetadataState::default();
        state.apply(
            parse_metadata(PERSISTENT).unwrap(),
            at("2025-03-04T10:02:00Z"),
        );
        assert!(state.participants().iter().all(|p| p.left_at.is_none()));
        let a_ends = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
  <sessionrecordingassoc session_id="cs-A"><disassociate-time>2025-03-04T10:05:00Z</disassociate-time></sessionrecordingassoc>
</recording>"#;
        state.apply(parse_metadata(a_ends).unwrap(), at("2025-03-04T10:05:01Z"));
        let left = |state: &MetadataState, id: &str| {
            state
                .participants()
                .into_iter()
                .find(|p| p.id == id)
                .unwrap()
                .left_at
        };
        let end_a = Some(at("2025-03-04T10:05:00Z"));
        assert_eq!(left(&state, "a-cust"), end_a);
        assert_eq!(left(&state, "a-agent"), end_a);
        assert_eq!(left(&state, "b-cust"), None, "call B is still recorded");
        assert_eq!(
            state.participants()[0].joined_at,
            Some(at("2025-03-04T10:00:00Z")),
            "join times are kept"
        );
        // Call B leaves too; its participant is tied to it by its stream only.
        let b_ends = a_ends
            .replace("cs-A", "cs-B")
            .replace("10:05:00", "10:07:30");
        state.apply(parse_metadata(&b_ends).unwrap(), at("2025-03-04T10:07:31Z"));
        assert_eq!(left(&state, "b-cust"), Some(at("2025-03-04T10:07:30Z")));
        assert_eq!(left(&state, "a-cust"), end_a);
        // Call A rejoins (a new associate-time): its participants are back.
        let a_back = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
  <sessionrecordingassoc session_id="cs-A"><associate-time>2025-03-04T10:09:00Z</associate-time></sessionrecordingassoc>
</recording>"#;
        state.apply(parse_metadata(a_back).unwrap(), at("2025-03-04T10:09:01Z"));
        assert_eq!(left(&state, "a-cust"), None);
    }

    #[test]
    fn own_disassociation_wins_over_the_session_end() {
        let mut state = MetadataState::default();
        state.apply(
            parse_metadata(PERSISTENT).unwrap(),
            at("2025-03-04T10:02:00Z"),
        );
        let agent_leaves = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
  <participantsessionassoc participant_id="a-agent" session_id="cs-A"><disassociate-time>2025-03-04T10:03:00Z</disassociate-time></participantsessionassoc>
  <sessionrecordingassoc session_id="cs-A"><disassociate-time>2025-03-04T10:05:00Z</disassociate-time></sessionrecordingassoc>
</recording>"#;
        state.apply(
            parse_metadata(agent_leaves).unwrap(),
            at("2025-03-04T10:05:01Z"),
        );
        let people = state.participants();
        let agent = people.iter().find(|p| p.id == "a-agent").unwrap();
        let cust = people.iter().find(|p| p.id == "a-cust").unwrap();
        assert_eq!(agent.left_at, Some(at("2025-03-04T10:03:00Z")));
        assert_eq!(cust.left_at, Some(at("2025-03-04T10:05:00Z")));
    }

    #[test]
    fn audiocodes_genesys_uuid_extension() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns='urn:ietf:params:xml:ns:recording:1' xmlns:ac="http://www.audiocodes.com/siprec">
  <datamode>complete</datamode>
  <group group_id="00000000-0000-0000-0000-00003a36c4e3">
    <associate-time>2010-01-24T01:11:57Z</associate-time>
  </group>
  <session session_id="0000-0000-0000-0000-00000000d0d71a52">
    <group-ref>00000000-0000-0000-0000-00003a36c4e3</group-ref>
    <start-time>2010-01-24T01:11:57Z</start-time>
    <extensiondata>
      <ac:GenesysUUID xmlns="urn:ietf:params:xml:ns:Genesys">4BOKLLA3VH66JF112M1CC9VHKS14F0KP</ac:GenesysUUID>
      <ac:AvayaUCID xmlns="urn:ietf:params:xml:ns:Avaya">FA080030C4E34B5B9E59</ac:AvayaUCID>
    </extensiondata>
  </session>
  <participant participant_id="1"><nameID aor="sip: 7774442214 @10.104.54.52"><name xml:lang="en"> </name></nameID></participant>
</recording>"#;
        let doc = parse_metadata(xml).unwrap();
        assert_eq!(
            doc.extensions,
            vec![
                (
                    "GenesysUUID".to_string(),
                    "4BOKLLA3VH66JF112M1CC9VHKS14F0KP".to_string()
                ),
                ("AvayaUCID".to_string(), "FA080030C4E34B5B9E59".to_string()),
            ]
        );
        assert_eq!(
            doc.participants[0].aor.as_deref(),
            Some("sip:7774442214@10.104.54.52")
        );
        assert_eq!(doc.participants[0].name, None, "blank name is no name");
        let mut state = MetadataState::default();
        state.apply(doc, UNIX_EPOCH);
        assert_eq!(
            state.call_uuid(),
            Some((
                "4BOKLLA3VH66JF112M1CC9VHKS14F0KP".to_string(),
                "extensiondata"
            ))
        );
    }

    #[test]
    fn oracle_draft_namespace_with_id_attributes() {
        let xml = r#"<?xml version='1.0' encoding='UTF-8'?>
<recording xmlns='urn:ietf:params:xml:ns:recording'>
  <datamode>complete</datamode>
  <session id="ZsXcVhT8QxmIA9x1K0ag3w==">
    <associate-time>2020-03-27T13:56:05</associate-time>
  </session>
  <participant id="pA" session="ZsXcVhT8QxmIA9x1K0ag3w==">
    <nameID aor="sip:+15551234567@10.1.1.1"><name>+15551234567</name></nameID>
    <send>st1</send>
    <recv>st2</recv>
    <associate-time>2020-03-27T13:56:05</associate-time>
  </participant>
  <stream id="st1" session="ZsXcVhT8QxmIA9x1K0ag3w=="><label>16777227</label><mode>separate</mode><associate-time>2020-03-27T13:56:05</associate-time></stream>
  <stream id="st2" session="ZsXcVhT8QxmIA9x1K0ag3w=="><label>16777228</label></stream>
  <extensiondata xmlns:apkt="http://acmepacket.com/siprec/extensiondata">
    <apkt:ucid>00FA080018803B5E5C3C0A;encoding=hex</apkt:ucid>
    <apkt:callerOrig>true</apkt:callerOrig>
    <apkt:header label="Call-ID">abc@192.0.2.1</apkt:header>
  </extensiondata>
</recording>"#;
        let doc = parse_metadata(xml).unwrap();
        assert_eq!(doc.sessions[0].id, "ZsXcVhT8QxmIA9x1K0ag3w==");
        assert_eq!(doc.sessions[0].start_time, Some(at("2020-03-27T13:56:05Z")));
        assert_eq!(
            doc.streams[0].session_id.as_deref(),
            Some("ZsXcVhT8QxmIA9x1K0ag3w==")
        );
        let mut state = MetadataState::default();
        state.apply(doc, UNIX_EPOCH);
        let p = &state.participants()[0];
        assert_eq!(p.sends, vec!["16777227"]);
        assert_eq!(p.receives, vec!["16777228"]);
        assert_eq!(p.joined_at, Some(at("2020-03-27T13:56:05Z")));
        let ext = state.extensions();
        assert!(ext.contains(&("ucid".into(), "00FA080018803B5E5C3C0A;encoding=hex".into())));
        assert!(ext.contains(&("header:Call-ID".into(), "abc@192.0.2.1".into())));
        assert_eq!(state.call_uuid(), None, "no group, no CallUUID extension");
    }

    #[test]
    fn sonus_prefix_partial_and_call_data() {
        let initial = r#"<?xml version="1.0" encoding="UTF-8"?>
<tns:recording xmlns:tns="urn:ietf:params:xml:ns:recording">
  <tns:datamode>complete</tns:datamode>
  <tns:group group_id="g1">
    <tns:associate-time>1970-01-01T00:00:00Z</tns:associate-time>
    <callData xmlns="urn:ietf:params:xml:ns:callData">
      <fromhdr>&lt;sip:2249888500@172.16.198.55&gt;;tag=1</fromhdr>
      <callid>12345@172.16.198.55</callid>
      <gcid>9012</gcid>
    </callData>
  </tns:group>
  <tns:participant participant_id="p1" session_id="s"><tns:nameID aor="2249888500@172.16.198.55"/></tns:participant>
</tns:recording>"#;
        let bye = r#"<?xml version="1.0" encoding="UTF-8"?>
<tns:recording xmlns:tns="urn:ietf:params:xml:ns:recording">
  <tns:datamode>Partial</tns:datamode>
  <tns:participant participant_id="p1" session_id="s"><tns:disassociate-time>2022-07-21T12:36:06-06:00</tns:disassociate-time></tns:participant>
</tns:recording>"#;
        let mut state = MetadataState::default();
        let doc = parse_metadata(initial).unwrap();
        assert!(doc.extensions.contains(&("gcid".into(), "9012".into())));
        assert!(doc.extensions.contains(&(
            "fromhdr".into(),
            "<sip:2249888500@172.16.198.55>;tag=1".into()
        )));
        state.apply(doc, at("2022-07-21T18:30:00Z"));
        let doc = parse_metadata(bye).unwrap();
        assert!(doc.partial, "capitalised Partial");
        state.apply(doc, at("2022-07-21T18:36:07Z"));
        let p = &state.participants()[0];
        assert_eq!(p.aor.as_deref(), Some("2249888500@172.16.198.55"));
        assert_eq!(p.joined_at, Some(at("2022-07-21T18:30:00Z")), "first seen");
        assert_eq!(p.left_at, Some(at("2022-07-21T18:36:06Z")));
        assert_eq!(state.groups()[0].associate_time, Some(UNIX_EPOCH));
    }

    #[test]
    fn intrado_datamode_case_and_unknown_elements() {
        let xml = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <dataMode>partial</dataMode>
  <participant participant_id="p"><nameID aor="sip:a@b"/><role>caller</role></participant>
  <channel>3</channel>
  <session session_id="s"><sipSessionID>call-id-1@host</sipSessionID><end-time>2019-05-13T15:32:45.293Z</end-time><reason>Q.850;cause=16</reason></session>
</recording>"#;
        let doc = parse_metadata(xml).unwrap();
        assert!(doc.partial);
        assert_eq!(doc.extensions, vec![("channel".into(), "3".into())]);
        assert_eq!(
            doc.participants[0].extensions,
            vec![("role".into(), "caller".into())]
        );
        assert_eq!(
            doc.sessions[0].stop_time,
            Some(at("2019-05-13T15:32:45.293Z"))
        );
        assert_eq!(doc.sessions[0].reason.as_deref(), Some("Q.850;cause=16"));
    }

    #[test]
    fn broadworks_root_and_bad_times_are_not_fatal() {
        let xml = r#"<recording_metadata xmlns="urn:ietf:params:xml:ns:siprec"><group id="bw-1"><associate-time>not a time</associate-time></group></recording_metadata>"#;
        let doc = parse_metadata(xml).unwrap();
        assert_eq!(doc.groups[0].id, "bw-1");
        assert_eq!(doc.groups[0].associate_time, None);
    }

    #[test]
    fn elements_without_ids_are_skipped() {
        let xml = "<recording><participant><nameID aor='x'/></participant><stream><label>1</label></stream><participantsessionassoc/></recording>";
        let doc = parse_metadata(xml).unwrap();
        assert!(doc.participants.is_empty() && doc.streams.is_empty());
        assert!(doc.participant_session_assocs.is_empty());
    }

    #[test]
    fn association_without_session_closes_the_open_one() {
        let mut state = spec_state();
        let bye = "<recording><datamode>partial</datamode><participantsessionassoc participant_id='c1D1yJ2oQ0yC4n7Zp8LhSw=='><disassociate-time>2025-03-04T10:30:00Z</disassociate-time></participantsessionassoc></recording>";
        state.apply(parse_metadata(bye).unwrap(), UNIX_EPOCH);
        let customer = &state.participants()[0];
        assert_eq!(customer.name.as_deref(), Some("Customer"));
        assert_eq!(customer.left_at, Some(at("2025-03-04T10:30:00Z")));
    }

    #[test]
    fn unresolved_references_are_reported() {
        let xml = "<recording><datamode>partial</datamode><participantstreamassoc participant_id='ghost'><send>nostream</send></participantstreamassoc></recording>";
        let mut state = spec_state();
        state.apply(parse_metadata(xml).unwrap(), UNIX_EPOCH);
        assert_eq!(state.unresolved_refs(), vec!["nostream", "ghost"]);
    }

    #[test]
    fn hostile_and_broken_documents_are_refused() {
        let xxe = r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><recording>&xxe;</recording>"#;
        assert_eq!(parse_metadata(xxe), Err(MetadataError::Dtd));
        assert_eq!(MetadataError::Dtd.status_code(), 400);
        assert!(matches!(
            parse_metadata("<recording>&xxe;</recording>"),
            Err(MetadataError::Xml(_))
        ));
        let deep = format!(
            "<recording>{}{}</recording>",
            "<a>".repeat(MAX_DEPTH),
            "</a>".repeat(MAX_DEPTH)
        );
        assert_eq!(parse_metadata(&deep), Err(MetadataError::TooDeep));
        let many = format!("<recording>{}</recording>", "<a/>".repeat(MAX_ELEMENTS));
        assert_eq!(parse_metadata(&many), Err(MetadataError::TooManyElements));
        let big = format!("<recording>{}</recording>", " ".repeat(MAX_METADATA_LEN));
        assert!(matches!(
            parse_metadata(&big),
            Err(MetadataError::TooLarge { .. })
        ));
        assert_eq!(parse_metadata(""), Err(MetadataError::Empty));
        assert_eq!(
            parse_metadata("<requestsnapshot/>"),
            Err(MetadataError::UnexpectedRoot("requestsnapshot".into()))
        );
        assert!(matches!(
            parse_metadata("<recording><a></recording>"),
            Err(MetadataError::Xml(_))
        ));
        assert!(matches!(
            parse_metadata("<recording>"),
            Err(MetadataError::Xml(_))
        ));
        assert!(matches!(
            parse_metadata("<recording/><recording/>"),
            Err(MetadataError::Xml(_))
        ));
        // Escaped text is fine.
        let doc = parse_metadata("<recording><x>a &amp; b &#65;</x></recording>").unwrap();
        assert_eq!(doc.extensions, vec![("x".into(), "a & b A".into())]);
    }
}
