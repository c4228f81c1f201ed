//! The routes: `/metrics` and `/api/v1/...` (JSON; errors are `{"error": ...}`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    extract::{rejection::QueryRejection, ConnectInfo, FromRequestParts, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

use super::{
    audit::AuditEntry,
    auth::{Admin, Reader},
    files, peer, stitch, HttpState,
};
use crate::{
    control::{self, row_json},
    index::{Index, IndexError, IndexedRecording, Search, SearchCursor},
    metrics::{self, Snapshot},
    writer::metadata::{parse_rfc3339, RecordingMetadata, PCAP_FILE, WAV_FILE},
};

/// Errors of a request, each with its status.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("range not satisfiable: the file has {len} bytes")]
    RangeNotSatisfiable { len: u64 },
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status(), Json(json!({ "error": self.to_string() }))).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RangeNotSatisfiable { len } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::BadRequest(e.body_text())
    }
}

type Shared = State<Arc<HttpState>>;

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/recordings", get(list_recordings))
        .route("/api/v1/recordings/{id}", get(show_recording))
        .route("/api/v1/recordings/{id}/audio", get(audio))
        .route("/api/v1/recordings/{id}/pcap", get(pcap))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/sessions/{id}/stop", post(stop))
        .route("/api/v1/interactions/{call_uuid}", get(interaction))
        .route(
            "/api/v1/interactions/{call_uuid}/audio",
            get(interaction_audio),
        )
        .merge(super::console::routes())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
}

async fn metrics(
    State(state): Shared,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    if state.config.metrics_auth {
        let (mut parts, _) = request.into_parts();
        Reader::from_request_parts(&mut parts, &state).await?;
    }
    let text = Snapshot::gather(&state.sources).await.render();
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// Runs `f` on the index in a blocking task (both backends block); the index being
/// unreachable is a 503. One connection serves every request: opening the SQLite index checks
/// the whole file, far too slow to do per request. It is dropped after an error and opened
/// again by the next request.
pub(super) async fn with_index<T: Send + 'static>(
    state: &Arc<HttpState>,
    f: impl FnOnce(&mut Index) -> Result<T, IndexError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut index = state.index.lock().unwrap_or_else(|e| e.into_inner());
        let open = match index.take() {
            Some(open) => open,
            None => Index::open_location(
                &state.config.index_location(),
                &state.config.spool,
                &state.config.site_name(),
            )?,
        };
        let open = index.insert(open);
        let result = f(open);
        if result.is_err() {
            *index = None;
        }
        result
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("index query failed: {e}")))?
    .map_err(|e| ApiError::Unavailable(format!("index: {e}")))
}

/// Recording ids are directory names in the spool: nothing that could leave it.
fn checked_id(id: &str) -> Result<&str, ApiError> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(id)
    } else {
        Err(ApiError::BadRequest(format!("bad recording id {id:?}")))
    }
}

fn parse_time(key: &str, value: Option<&str>) -> Result<Option<SystemTime>, ApiError> {
    value
        .map(control::parse_time)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("{key}: {e}")))
}

/// Query of `GET /api/v1/recordings`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    call_uuid: Option<String>,
    aor: Option<String>,
    participant: Option<String>,
    since: Option<String>,
    until: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// A cursor is opaque to clients: the hex of `<started_ms>:<id>` of the last row sent.
fn encode_cursor(c: &SearchCursor) -> String {
    format!("{}:{}", c.started_ms, c.id)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(s: &str) -> Result<SearchCursor, ApiError> {
    let bad = || ApiError::BadRequest(format!("bad cursor {s:?}"));
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(SearchCursor {
        started_ms: ms.parse().map_err(|_| bad())?,
        id: id.to_string(),
    })
}

async fn list_recordings(
    _: Reader,
    State(state): Shared,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1..={MAX_LIMIT}"
        )));
    }
    if let Some(s) = &q.state {
        if !["active", "complete", "interrupted"].contains(&s.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "state {s:?} is not active, complete or interrupted"
            )));
        }
    }
    let search = Search {
        call_uuid: q.call_uuid,
        aor: q.aor,
        participant: q.participant,
        since: parse_time("since", q.since.as_deref())?,
        until: parse_time("until", q.until.as_deref())?,
        state: q.state,
        // One more than asked: whether there is a next page.
        limit: limit + 1,
        after: q.cursor.as_deref().map(decode_cursor).transpose()?,
    };
    let mut rows = with_index(&state, move |index| index.search(&search)).await?;
    let next = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last().map(|r| encode_cursor(&SearchCursor::after(r)))
    });
    Ok(Json(json!({
        "recordings": rows.iter().map(row_json).collect::<Vec<_>>(),
        "next_cursor": next.flatten(),
    })))
}

/// The recording's directory in this host's spool.
fn recording_dir(state: &HttpState, id: &str) -> PathBuf {
    state.config.spool.join(id)
}

async fn show_recording(
    _: Reader,
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = checked_id(&id)?.to_string();
    let meta_path = recording_dir(&state, &id).join("metadata.json");
    let metadata: Option<Value> = tokio::task::spawn_blocking(move || {
        let text = std::fs::read_to_string(&meta_path).ok()?;
        serde_json::from_str(&text).ok()
    })
    .await
    .ok()
    .flatten();
    let lookup = id.clone();
    // The index is not needed for a recording of this host: show it even while the index is
    // down.
    let row = match with_index(&state, move |index| index.get(&lookup)).await {
        Ok(row) => row,
        Err(e) if metadata.is_none() => return Err(e),
        Err(_) => None,
    };
    let mut data = match (&row, &metadata) {
        (Some(row), _) => row_json(row),
        (None, Some(_)) => json!({ "id": id }),
        (None, None) => return Err(ApiError::NotFound(format!("no recording {id}"))),
    };
    data["indexed"] = json!(row.is_some());
    data["metadata"] = metadata.unwrap_or(Value::Null);
    Ok(Json(data))
}

/// The two downloadable files of a recording.
#[derive(Clone, Copy)]
enum Download {
    Audio,
    Pcap,
}

impl Download {
    fn file(self) -> &'static str {
        match self {
            Self::Audio => WAV_FILE,
            Self::Pcap => PCAP_FILE,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Audio => "audio/wav",
            Self::Pcap => "application/vnd.tcpdump.pcap",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Pcap => "pcap",
        }
    }
}

async fn audio(
    Reader(caller): Reader,
    State(state): Shared,
    Path(id): Path<String>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    download(&state, &caller.name, &id, client, &headers, Download::Audio).await
}

async fn pcap(
    Reader(caller): Reader,
    State(state): Shared,
    Path(id): Path<String>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    download(&state, &caller.name, &id, client, &headers, Download::Pcap).await
}

/// Sends one file of a recording of this host, after its audit line is written.
async fn download(
    state: &Arc<HttpState>,
    token: &str,
    id: &str,
    client: SocketAddr,
    headers: &HeaderMap,
    what: Download,
) -> Result<Response, ApiError> {
    let id = checked_id(id)?;
    let dir = recording_dir(state, id);
    if !dir.join("metadata.json").exists() {
        // Another host's recording in a shared index: say where it is.
        let lookup = id.to_string();
        let row = with_index(state, move |index| index.get(&lookup))
            .await
            .ok()
            .flatten();
        return Err(ApiError::NotFound(match row {
            Some(row) => format!("recording {id} is on host {}", row.host),
            None => format!("no recording {id}"),
        }));
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = files::respond(
        &dir.join(what.file()),
        what.content_type(),
        &format!("{id}-{}", what.file()),
        range.as_deref(),
    )
    .await?;
    audited(state, token, id, what.name(), client, range, response).await
}

/// `response` once its audit line is written; a 503 instead when it cannot be.
async fn audited(
    state: &Arc<HttpState>,
    token: &str,
    recording: &str,
    file: &'static str,
    client: SocketAddr,
    range: Option<String>,
    response: Response,
) -> Result<Response, ApiError> {
    let status = response.status().as_u16();
    let (state2, token, id) = (state.clone(), token.to_string(), recording.to_string());
    let written = tokio::task::spawn_blocking(move || {
        state2.audit.record(&AuditEntry {
            time: AuditEntry::now(),
            token: &token,
            recording: &id,
            file,
            client,
            range: range.as_deref(),
            status,
        })
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(response),
        Ok(Err(e)) => {
            tracing::error!(error = %e, recording, "audit log write failed: download refused");
            Err(ApiError::Unavailable(
                "the audit log cannot be written".into(),
            ))
        }
        Err(e) => Err(ApiError::Unavailable(format!("audit: {e}"))),
    }
}

/// One WAV of the whole interaction: every segment at its wall-clock offset from the first,
/// silence in the gaps (see [`stitch`]). A segment of another host is fetched from that host's
/// public URL with the caller's token (that host authorises and audits it).
async fn interaction_audio(
    Reader(caller): Reader,
    State(state): Shared,
    Path(call_uuid): Path<String>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let uuid = call_uuid.clone();
    let (rows, urls) = with_index(&state, move |index| {
        Ok((index.by_call_uuid(&uuid)?, index.public_urls()?))
    })
    .await?;
    let Some(first) = rows.iter().map(|r| r.started_at).min() else {
        return Err(ApiError::NotFound(format!(
            "no recording of CallUUID {call_uuid}"
        )));
    };
    let site = state.config.site_name();
    let mut segments = Vec::with_capacity(rows.len());
    for r in &rows {
        // The index keeps milliseconds: 8 frames each.
        let ms = r
            .started_at
            .duration_since(first)
            .unwrap_or_default()
            .as_millis() as u64;
        let at = ms * stitch::RATE as u64 / 1000;
        let samples = if r.host == site {
            let path = state.config.spool.join(&r.id).join(WAV_FILE);
            tokio::task::spawn_blocking(move || stitch::mono(&path))
                .await
                .map_err(|e| ApiError::Unavailable(format!("reading a WAV failed: {e}")))??
        } else {
            let base = urls.get(&r.host).ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "segment {} was recorded on host {}, which has no public_url",
                    r.id, r.host
                ))
            })?;
            let wav = peer::get(
                &r.host,
                base,
                &format!("/api/v1/recordings/{}/audio", r.id),
                headers.get(header::AUTHORIZATION),
                state.peer_tls.as_ref(),
            )
            .await?;
            stitch::mono_of(&wav, &format!("{} from {}", r.id, r.host))?
        };
        segments.push((at, samples));
    }
    let wav = tokio::task::spawn_blocking(move || stitch::stitch(&segments))
        .await
        .map_err(|e| ApiError::Unavailable(format!("stitching failed: {e}")))??;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = files::respond_bytes(
        wav,
        "audio/wav",
        &format!("interaction-{call_uuid}.wav"),
        range.as_deref(),
    )?;
    audited(
        &state,
        &caller.name,
        &call_uuid,
        "interaction_audio",
        client,
        range,
        response,
    )
    .await
}

async fn sessions(_: Reader, State(state): Shared) -> Result<Json<Value>, ApiError> {
    control::live_sessions(&state.sources.commands, &state.sources.writer)
        .await
        .map(Json)
        .map_err(ApiError::Unavailable)
}

async fn stop(
    Admin(caller): Admin,
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match control::stop_session(&state.sources.commands, &id).await {
        Some(true) => {
            tracing::info!(recording = %id, token = %caller.name, "recording stopped over the HTTP API");
            Ok(Json(json!({ "stopped": id })))
        }
        Some(false) => Err(ApiError::NotFound(format!("no live recording {id}"))),
        None => Err(ApiError::Unavailable(control::DRIVER_GONE.into())),
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// What the signalling changed during one recording, from its metadata.json: media added or
/// removed by a re-INVITE (a media move), pauses, and metadata updates (participants changing).
fn signalling_events(m: &RecordingMetadata) -> Vec<Value> {
    let mut events = Vec::new();
    let event = |at: &str, kind: &str, extra: Value| {
        let mut e = json!({ "at": at, "kind": kind, "recording": m.id, "host": m.host });
        if let (Value::Object(e), Value::Object(extra)) = (&mut e, extra) {
            e.extend(extra);
        }
        e
    };
    for s in &m.streams {
        if parse_rfc3339(&s.added_at) > parse_rfc3339(&m.started_at) {
            events.push(event(
                &s.added_at,
                "media_added",
                json!({ "label": s.label }),
            ));
        }
        if let Some(at) = &s.removed_at {
            events.push(event(at, "media_removed", json!({ "label": s.label })));
        }
        for p in &s.paused {
            events.push(event(&p.from, "paused", json!({ "label": s.label })));
            if let Some(to) = &p.to {
                events.push(event(to, "resumed", json!({ "label": s.label })));
            }
        }
    }
    // The first version came with the INVITE that started the recording.
    for v in m.metadata_versions.iter().skip(1) {
        events.push(event(
            &v.received_at,
            "metadata_updated",
            json!({ "version": v.version, "method": v.method }),
        ));
    }
    events
}

/// One interaction (CallUUID): its segments in time order, the gaps between them, and as
/// events the participants' joins and leaves, each segment's end (with the BYE's reason, e.g.
/// a REFER handoff) and, for the segments of this host (`local`), what the signalling changed.
pub fn interaction_json(
    call_uuid: &str,
    rows: &[IndexedRecording],
    local: &HashMap<String, RecordingMetadata>,
    urls: &HashMap<String, String>,
) -> Value {
    let now = SystemTime::now();
    let mut segments = Vec::new();
    let mut gaps = Vec::new();
    let mut events = Vec::new();
    // The latest end so far (an overlapping segment is no gap).
    let mut covered: Option<(SystemTime, &str)> = None;
    for r in rows {
        if let Some((end, before)) = covered {
            if let Ok(gap) = r.started_at.duration_since(end) {
                if !gap.is_zero() {
                    gaps.push(json!({
                        "after": before,
                        "before": r.id,
                        "from": control::rfc3339(end),
                        "to": control::rfc3339(r.started_at),
                        "seconds": seconds(gap),
                    }));
                }
            }
        }
        let end = r.ended_at.unwrap_or(now);
        if covered.is_none_or(|(e, _)| end >= e) {
            covered = Some((end, &r.id));
        }
        let mut segment = row_json(r);
        segment["public_url"] = json!(urls.get(&r.host));
        segment["duration_secs"] = json!(seconds(
            end.duration_since(r.started_at).unwrap_or_default()
        ));
        segments.push(segment);
        for p in &r.participants {
            for (kind, at) in [("joined", &p.joined_at), ("left", &p.left_at)] {
                if let Some(at) = at {
                    events.push(json!({
                        "at": at,
                        "kind": kind,
                        "recording": r.id,
                        "host": r.host,
                        "name": p.name,
                        "aor": p.aor,
                    }));
                }
            }
        }
        if let Some(m) = local.get(&r.id) {
            events.extend(signalling_events(m));
        }
        if let (Some(ended), Some(reason)) = (r.ended_at, &r.end_reason) {
            events.push(json!({
                "at": control::rfc3339(ended),
                "kind": "ended",
                "recording": r.id,
                "host": r.host,
                "reason": reason,
                "detail": r.end_detail,
            }));
        }
    }
    // Not as text: the fraction of a second has as many digits as it needs, or none.
    events.sort_by_key(|e| e["at"].as_str().and_then(parse_rfc3339));
    json!({
        "call_uuid": call_uuid,
        "started_at": rows.first().map(|r| control::rfc3339(r.started_at)),
        "ended_at": rows.iter().all(|r| r.ended_at.is_some()).then(|| covered.map(|(e, _)| control::rfc3339(e))).flatten(),
        "segments": segments,
        "gaps": gaps,
        "events": events,
    })
}

async fn interaction(
    _: Reader,
    State(state): Shared,
    Path(call_uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let uuid = call_uuid.clone();
    let (rows, urls) = with_index(&state, move |index| {
        Ok((index.by_call_uuid(&uuid)?, index.public_urls()?))
    })
    .await?;
    if rows.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no recording of CallUUID {call_uuid}"
        )));
    }
    // Signalling details are in the metadata of this host's segments.
    let spool = state.config.spool.clone();
    let site = state.config.site_name();
    let ids: Vec<String> = rows
        .iter()
        .filter(|r| r.host == site)
        .map(|r| r.id.clone())
        .collect();
    let local = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter_map(|id| {
                let m = RecordingMetadata::read(&spool.join(&id)).ok()?;
                Some((id, m))
            })
            .collect::<HashMap<_, _>>()
    })
    .await
    .unwrap_or_default();
    Ok(Json(interaction_json(&call_uuid, &rows, &local, &urls)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexedParticipant;

    fn row(id: &str, start: u64, end: Option<u64>, host: &str) -> IndexedRecording {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
        IndexedRecording {
            id: id.into(),
            sip_call_id: format!("{id}@sbc"),
            call_uuid: Some("U".into()),
            connection_id: None,
            participants: vec![IndexedParticipant {
                name: Some("Agent".into()),
                aor: Some("sip:a@x".into()),
                joined_at: Some(control::rfc3339(at(start))),
                left_at: end.map(|e| control::rfc3339(at(e))),
            }],
            started_at: at(start),
            ended_at: end.map(at),
            state: "complete".into(),
            end_reason: end.map(|_| "bye".into()),
            end_detail: None,
            path: PathBuf::from("/spool").join(id),
            host: host.into(),
            interaction: None,
            previous: None,
        }
    }

    #[test]
    fn interaction_has_segments_in_order_and_the_gaps_between_them() {
        let rows = [
            row("a", 0, Some(10), "blue"),
            // Overlaps a: no gap.
            row("b", 5, Some(20), "blue"),
            row("c", 23, Some(30), "purple"),
        ];
        let mut local = HashMap::new();
        let mut m = RecordingMetadata {
            id: "b".into(),
            sip_call_id: "b@sbc".into(),
            call_uuid: Some("U".into()),
            call_uuid_source: None,
            connection_id: None,
            extra_ids: vec![],
            host: "blue".into(),
            interaction: None,
            previous: None,
            state: crate::writer::metadata::RecordingState::Complete,
            end_reason: Some("bye".into()),
            end_detail: None,
            started_at: control::rfc3339(rows[1].started_at),
            ended_at: None,
            updated_at: control::rfc3339(rows[1].started_at),
            media_received: true,
            participants: vec![],
            streams: vec![],
            metadata_versions: vec![],
            wav: Default::default(),
            dropped: Default::default(),
            notes: vec![],
        };
        let at = |s: u64| {
            control::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s))
        };
        m.streams.push(crate::writer::metadata::StreamMeta {
            label: "3".into(),
            added_at: at(8),
            removed_at: Some(at(12)),
            ..Default::default()
        });
        for (version, received_at) in [(1, at(5)), (2, at(9))] {
            m.metadata_versions
                .push(crate::writer::metadata::MetadataVersionMeta {
                    version,
                    received_at,
                    method: "INVITE".into(),
                    file: format!("metadata-{version}.xml"),
                });
        }
        local.insert("b".to_string(), m);
        let urls = HashMap::from([("purple".to_string(), "https://purple:8443".to_string())]);
        let v = interaction_json("U", &rows, &local, &urls);
        assert_eq!(v["segments"][2]["public_url"], "https://purple:8443");
        assert!(v["segments"][0]["public_url"].is_null());
        let ids: Vec<&str> = v["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(v["segments"][2]["host"], "purple");
        assert_eq!(v["segments"][1]["duration_secs"], 15.0);
        let gaps = v["gaps"].as_array().unwrap();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!(gaps[0]["after"], "b");
        assert_eq!(gaps[0]["before"], "c");
        assert_eq!(gaps[0]["seconds"], 3.0);
        let kinds: Vec<&str> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        // 3 joins, 3 leaves, 3 ends, and b's media move and metadata update in time order.
        assert_eq!(kinds.len(), 12, "{kinds:?}");
        assert_eq!(kinds[0], "joined");
        assert_eq!(
            &kinds[2..5],
            ["media_added", "metadata_updated", "left"],
            "{kinds:?}"
        );
        let moved = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "media_removed")
            .unwrap();
        assert_eq!(moved["label"], "3");
        assert_eq!(moved["recording"], "b");
        let at30 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_030);
        assert_eq!(v["ended_at"], control::rfc3339(at30));
        assert_eq!(v["started_at"], control::rfc3339(rows[0].started_at));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_a_400() {
        let c = SearchCursor {
            started_ms: 1_700_000_000_123,
            id: "20261202T101010Z-ab12".into(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        for bad in ["zz", "abc", "3132", ""] {
            assert!(
                matches!(decode_cursor(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_that_could_leave_the_spool_are_refused() {
        assert!(checked_id("20261202T101010Z-ab12").is_ok());
        for bad in ["", "..", "../etc", "a/b", ".hidden", "a b"] {
            assert!(checked_id(bad).is_err(), "{bad}");
        }
    }
}
