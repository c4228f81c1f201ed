//! The daemon side of the control API.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::BytesMut;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Request, Response};
use crate::{
    capture::{
        loader::{AttachedMode, Counters},
        ring::StallStats,
    },
    config::Config,
    daemon::{query, DaemonRecorder, DriverCommand},
    flow::FlowAction,
    guard::{
        ApiCounters, CONTROL_MAX_CONNECTIONS, CONTROL_MAX_LINE, CONTROL_READ_TIMEOUT,
        CONTROL_WRITE_TIMEOUT,
    },
    index::{Index, IndexedRecording},
    writer::WriterHandle,
};

/// What the control server needs from the daemon.
#[derive(Clone)]
pub struct ControlState {
    config: Config,
    commands: mpsc::Sender<DriverCommand>,
    counters: Arc<Counters>,
    writer: Arc<WriterHandle>,
    attachments: Vec<(String, AttachedMode)>,
    started: Instant,
    restart: RestartInfo,
    /// The ring consumer's waits for the writer (sizing `ring_bytes`).
    stalls: Arc<StallStats>,
    /// SIP admission counters, for `status`.
    transport: Option<crate::transport::TransportMonitor>,
    /// What this socket's and the HTTP API's limits refused.
    api: Arc<ApiCounters>,
}

/// How this daemon's capture survives a restart, for `status`.
#[derive(Clone, Debug, Default)]
pub struct RestartInfo {
    /// Where the capture is pinned (None: not pinned, a restart loses what arrives meanwhile).
    pub pinned_in: Option<std::path::PathBuf>,
    /// The pinned capture of a previous daemon was adopted.
    pub adopted: bool,
    /// Sessions carried on from the previous daemon.
    pub carried_on: usize,
    /// What SIGTERM does now (reloadable): hand over (true) or finish (false).
    pub detach_on_exit: Arc<std::sync::atomic::AtomicBool>,
}

impl ControlState {
    pub fn new(
        config: Config,
        commands: mpsc::Sender<DriverCommand>,
        counters: Arc<Counters>,
        writer: Arc<WriterHandle>,
        attachments: Vec<(String, AttachedMode)>,
        restart: RestartInfo,
    ) -> Self {
        Self {
            config,
            commands,
            counters,
            writer,
            attachments,
            started: Instant::now(),
            restart,
            stalls: Arc::default(),
            transport: None,
            api: Arc::default(),
        }
    }

    /// Reports SIP admission and the API limits' refusals in `status` (`api` is shared with
    /// the HTTP server).
    pub fn with_guards(
        mut self,
        transport: crate::transport::TransportMonitor,
        api: Arc<ApiCounters>,
    ) -> Self {
        self.transport = Some(transport);
        self.api = api;
        self
    }

    /// Reports the ring consumer's back-pressure stalls in `status`.
    pub fn with_consumer_stalls(mut self, stalls: Arc<StallStats>) -> Self {
        self.stalls = stalls;
        self
    }
}

/// Binds the control socket (mode 0660, group `recorder` when that group exists) and serves it
/// until `shutdown`.
pub async fn serve(
    state: ControlState,
    shutdown: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let path = state.config.control_socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed daemon would make bind fail.
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    set_service_group(&path);
    info!(socket = %path.display(), "control socket listening");
    let state = Arc::new(state);
    let slots = Arc::new(Semaphore::new(CONTROL_MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let mut backoff = crate::accept::AcceptBackoff::new("control");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        backoff.succeeded();
                        let state = state.clone();
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            state.api.control_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::spawn(refuse(stream));
                            continue;
                        };
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = handle_connection(&state, stream).await {
                                debug!(error = %e, "control connection ended");
                            }
                        });
                    }
                    Err(e) => backoff.failed(&e).await,
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// Gives the socket to the `recorder` group, if the host has one (the systemd unit creates it).
fn set_service_group(path: &Path) {
    let name = std::ffi::CString::new("recorder").expect("no NUL");
    // SAFETY: getgrnam returns a pointer to static storage or null; read once, immediately.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    if group.is_null() {
        return;
    }
    // SAFETY: non-null pointer from getgrnam.
    let gid = unsafe { (*group).gr_gid };
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: valid C string path; -1 keeps the owner.
    if unsafe { libc::chown(cpath.as_ptr(), u32::MAX, gid) } != 0 {
        warn!(socket = %path.display(), "cannot give the control socket to group recorder");
    }
}

/// Tells a client over the connection limit so, briefly, and closes.
async fn refuse(mut stream: UnixStream) {
    let line = error_line(&format!(
        "too many control connections (at most {CONTROL_MAX_CONNECTIONS}); try again"
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line.as_bytes())).await;
}

fn error_line(message: &str) -> String {
    let mut line = serde_json::to_string(&Response::error(message)).expect("serializes");
    line.push('\n');
    line
}

/// Writes one line, giving up on a client that does not read it in time.
async fn send_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    api: &ApiCounters,
    text: String,
) -> std::io::Result<()> {
    match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, write.write_all(text.as_bytes())).await {
        Ok(result) => result,
        Err(_) => {
            api.control_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client does not read its answer",
            ))
        }
    }
}

/// Serves request lines until EOF. A line longer than [`CONTROL_MAX_LINE`], one not finished
/// within [`CONTROL_READ_TIMEOUT`] or an answer not taken within [`CONTROL_WRITE_TIMEOUT`]
/// ends the connection, the first two after an error line saying why.
async fn handle_connection(state: &ControlState, stream: UnixStream) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut read, mut write) = stream.into_split();
    let mut codec = LinesCodec::new_with_max_length(CONTROL_MAX_LINE);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // The whole line must arrive within the timeout, not each read: one byte a second
        // would otherwise hold the connection forever.
        let line = tokio::time::timeout(CONTROL_READ_TIMEOUT, async {
            loop {
                if let Some(line) = codec.decode(&mut buf)? {
                    return Ok(Some(line));
                }
                if read.read_buf(&mut buf).await? == 0 {
                    return codec.decode_eof(&mut buf);
                }
            }
        })
        .await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                state.api.control_line_too_long.fetch_add(1, Relaxed);
                let message = format!("request line longer than {CONTROL_MAX_LINE} bytes");
                send_line(&mut write, &state.api, error_line(&message)).await?;
                return Ok(());
            }
            Ok(Err(LinesCodecError::Io(e))) => return Err(e),
            Err(_) => {
                state.api.control_timeouts.fetch_add(1, Relaxed);
                let message = format!(
                    "no complete request line within {} s",
                    CONTROL_READ_TIMEOUT.as_secs()
                );
                send_line(&mut write, &state.api, error_line(&message)).await?;
                return Ok(());
            }
        };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(state, request).await,
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_string(&response).unwrap_or_else(|e| {
            format!("{{\"ok\":false,\"error\":\"cannot encode response: {e}\"}}")
        });
        out.push('\n');
        send_line(&mut write, &state.api, out).await?;
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn spool_usage(spool: &Path) -> Value {
    let Ok(c) = std::ffi::CString::new(spool.as_os_str().as_encoded_bytes()) else {
        return Value::Null;
    };
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Value::Null;
    }
    let block = st.f_frsize as u64;
    json!({
        "path": spool.display().to_string(),
        "total_bytes": st.f_blocks as u64 * block,
        "free_bytes": st.f_bavail as u64 * block,
    })
}

async fn handle(state: &ControlState, request: Request) -> Response {
    match request {
        Request::Status => status(state).await,
        Request::Sessions => match live_sessions(&state.commands, &state.writer).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(e),
        },
        Request::Flows => flows(state).await,
        Request::Stop { id } => match stop_session(&state.commands, &id).await {
            Some(true) => Response::ok(json!({ "stopped": id })),
            Some(false) => Response::error(format!("no live recording {id}")),
            None => Response::error(DRIVER_GONE),
        },
        Request::Recordings {
            call_uuid,
            aor,
            since,
        } => recordings(state, call_uuid, aor, since).await,
        Request::Show { id } => show(state, id).await,
        Request::Drain { resume } => {
            let answer = query(&state.commands, move |app, _, now| {
                app.set_draining(!resume);
                json!({
                    "draining": app.draining(),
                    "sessions_active": app.session_count(),
                    "refusing": app.refusal(now),
                })
            })
            .await;
            match answer {
                Some(v) => Response::ok(v),
                None => Response::error(DRIVER_GONE),
            }
        }
    }
}

/// Why a query of the SIP driver got no answer.
pub(crate) const DRIVER_GONE: &str = "the SIP driver is not running";

/// Live sessions as `recorder sessions` shows them (the HTTP API serves the same list).
pub(crate) async fn live_sessions(
    commands: &mpsc::Sender<DriverCommand>,
    writer: &WriterHandle,
) -> Result<Value, String> {
    match query(commands, |app, _, _| sessions(app)).await {
        Some(Ok(mut v)) => {
            add_loss(writer, &mut v);
            Ok(v)
        }
        Some(Err(e)) => Err(e.to_string()),
        None => Err(DRIVER_GONE.into()),
    }
}

/// Ends a live recording as `recorder stop` does: Some(false) when there is none of that id,
/// None when the driver is gone.
pub(crate) async fn stop_session(commands: &mpsc::Sender<DriverCommand>, id: &str) -> Option<bool> {
    let target = id.to_string();
    query(commands, move |app, endpoint, now| {
        app.stop(now, &target, endpoint)
    })
    .await
}

/// Live sessions with what the kernel counted on their flows (packets, ring drops) and their
/// duration so far. Sequence-number loss is only known to the writer (in `show` once finished).
fn sessions(app: &DaemonRecorder) -> serde_json::Result<Value> {
    let now = SystemTime::now();
    app.sessions()
        .into_iter()
        .map(|summary| {
            let (mut packets, mut bytes, mut ring_drops) = (0, 0, 0);
            for stream in &summary.streams {
                let stats = app.flows().stats(stream.flow_id);
                packets += stats.packets;
                bytes += stats.bytes;
                ring_drops += stats.ring_drops;
            }
            let duration = now
                .duration_since(summary.started_at)
                .unwrap_or_default()
                .as_secs();
            let mut v = serde_json::to_value(&summary)?;
            crate::media::redact_keys(&mut v);
            if let Value::Object(map) = &mut v {
                map.insert("packets".into(), json!(packets));
                map.insert("bytes".into(), json!(bytes));
                map.insert("ring_drops".into(), json!(ring_drops));
                map.insert("duration_secs".into(), json!(duration));
                map.insert("started_at".into(), json!(rfc3339(summary.started_at)));
                map.insert(
                    "last_activity".into(),
                    json!(rfc3339(summary.last_activity)),
                );
            }
            Ok(v)
        })
        .collect::<serde_json::Result<Vec<_>>>()
        .map(Value::Array)
}

/// Adds `lost` (RTP sequence gaps, all streams) to each live session, from the reception
/// statistics the writer republishes every quarter second (those the RTCP reports use).
fn add_loss(writer: &WriterHandle, sessions: &mut Value) {
    for session in sessions.as_array_mut().into_iter().flatten() {
        let lost: u64 = session["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|stream| stream["flow_id"].as_u64())
            .flat_map(|flow_id| writer.reception(flow_id))
            .map(|ssrc| ssrc.lost)
            .sum();
        let auth_failures: u64 = session["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|stream| stream["flow_id"].as_u64())
            .map(|flow_id| writer.auth_failures(flow_id))
            .sum();
        if let Value::Object(map) = session {
            map.insert("lost".into(), json!(lost));
            map.insert("auth_failures".into(), json!(auth_failures));
        }
    }
}

async fn status(state: &ControlState) -> Response {
    let counters = match state.counters.named() {
        Ok(named) => named
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
        Err(e) => return Response::error(e.to_string()),
    };
    let sip = query(&state.commands, |app, endpoint, now| {
        json!({
            "sessions_active": app.session_count(),
            "draining": app.draining(),
            "refusing": app.refusal(now),
            "siprec": app.counters(),
            "endpoint": endpoint.counters(),
        })
    })
    .await
    .unwrap_or(Value::Null);
    Response::ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "host": state.config.site_name(),
        "uptime_secs": state.started.elapsed().as_secs(),
        "interfaces": state.attachments.iter().map(|(name, mode)| json!({
            "name": name, "mode": mode.to_string(),
        })).collect::<Vec<_>>(),
        "xdp": counters,
        "writer": state.writer.stats(),
        "ring_consumer": {
            "stalls": state.stalls.stalls.load(std::sync::atomic::Ordering::Relaxed),
            "stalled_us": state.stalls.stalled_us.load(std::sync::atomic::Ordering::Relaxed),
            "longest_stall_us": state.stalls.longest_stall_us.load(std::sync::atomic::Ordering::Relaxed),
        },
        "sip": sip,
        "sip_admission": state.transport.as_ref().map(|t| t.stats()),
        "api_limits": state.api.stats(),
        "spool": spool_usage(&state.config.spool),
        "restart": {
            "pinned_in": state.restart.pinned_in,
            "adopted": state.restart.adopted,
            "carried_on_sessions": state.restart.carried_on,
            "on_exit": if state.restart.detach_on_exit.load(std::sync::atomic::Ordering::Relaxed) {
                "hand_over"
            } else {
                "finish"
            },
        },
    }))
}

async fn flows(state: &ControlState) -> Response {
    let listed = query(&state.commands, |app, _, _| {
        let flows = app.flows();
        let kernel = flows.kernel_entries();
        flows
            .list()
            .into_iter()
            .map(|e| {
                let in_kernel = kernel.iter().find(|(local, _)| *local == e.spec.local);
                json!({
                    "flow_id": e.spec.flow_id,
                    "local": e.spec.local.to_string(),
                    "remote": e.spec.remote.map(|r| r.to_string()),
                    "action": match e.spec.action { FlowAction::Pass => "pass", FlowAction::Drop => "drop" },
                    "generation": e.generation,
                    "in_kernel": in_kernel.is_some(),
                    "kernel_generation": in_kernel.map(|(_, v)| v.generation),
                    "packets": e.stats.packets,
                    "bytes": e.stats.bytes,
                    "ring_drops": e.stats.ring_drops,
                    "truncated": e.stats.truncated,
                    "wrong_source": e.stats.wrong_source,
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    match listed {
        Some(v) => Response::ok(Value::Array(v)),
        None => Response::error(DRIVER_GONE),
    }
}

async fn recordings(
    state: &ControlState,
    call_uuid: Option<String>,
    aor: Option<String>,
    since: Option<String>,
) -> Response {
    let since = match since.as_deref().map(parse_time).transpose() {
        Ok(t) => t,
        Err(e) => return Response::error(e),
    };
    let location = state.config.index_location();
    let spool = state.config.spool.clone();
    let host = state.config.site_name();
    let result = tokio::task::spawn_blocking(move || {
        let mut index =
            Index::open_location(&location, &spool, &host).map_err(|e| e.to_string())?;
        let mut rows = if let Some(uuid) = &call_uuid {
            index.by_call_uuid(uuid)
        } else if let Some(aor) = &aor {
            index.by_participant_aor(aor)
        } else {
            index.by_time_range(
                since.unwrap_or(UNIX_EPOCH),
                SystemTime::now() + Duration::from_secs(365 * 86400),
            )
        }
        .map_err(|e| e.to_string())?;
        if let Some(since) = since {
            rows.retain(|r| r.ended_at.is_none_or(|end| end >= since));
        }
        Ok::<_, String>(rows.iter().map(row_json).collect::<Vec<_>>())
    })
    .await;
    match result {
        Ok(Ok(rows)) => Response::ok(Value::Array(rows)),
        Ok(Err(e)) => Response::error(format!("index: {e}")),
        Err(e) => Response::error(format!("index query failed: {e}")),
    }
}

pub(crate) fn parse_time(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| format!("bad time {s:?} (want RFC 3339): {e}"))
}

/// One index row as the API shows it.
pub(crate) fn row_json(r: &IndexedRecording) -> Value {
    json!({
        "id": r.id,
        "sip_call_id": r.sip_call_id,
        "call_uuid": r.call_uuid,
        "connection_id": r.connection_id,
        "participants": r.participants.iter().map(|p| json!({
            "name": p.name,
            "aor": p.aor,
            "joined_at": p.joined_at,
            "left_at": p.left_at,
        })).collect::<Vec<_>>(),
        "started_at": rfc3339(r.started_at),
        "ended_at": r.ended_at.map(rfc3339),
        "state": r.state,
        "end_reason": r.end_reason,
        "end_detail": r.end_detail,
        "path": r.path.display().to_string(),
        "host": r.host,
        "interaction": r.interaction,
        "previous": r.previous,
    })
}

/// One recording: its `metadata.json` when it is in this host's spool, else its index row (a
/// recording of another site in a shared index); plus `timeline`, every recording of its
/// CallUUID in start order (the interaction across transfers and sites).
async fn show(state: &ControlState, id: String) -> Response {
    if id.is_empty() || id.contains('/') || id.contains("..") {
        return Response::error(format!("bad recording id {id:?}"));
    }
    let path: PathBuf = state.config.spool.join(&id).join("metadata.json");
    let location = state.config.index_location();
    let spool = state.config.spool.clone();
    let host = state.config.site_name();
    let result = tokio::task::spawn_blocking(move || {
        let local: Option<Value> = match std::fs::read_to_string(&path) {
            Ok(text) => {
                Some(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            Err(_) => None,
        };
        // The index is optional for a local recording: show it even if the index is down.
        let mut index = Index::open_location(&location, &spool, &host);
        let mut data = match (local, index.as_mut()) {
            (Some(v), _) => v,
            (None, Ok(index)) => match index.get(&id).map_err(|e| format!("index: {e}"))? {
                Some(row) => row_json(&row),
                None => return Err(format!("no recording {id}")),
            },
            (None, Err(e)) => return Err(format!("no recording {id} (index: {e})")),
        };
        if let (Some(uuid), Ok(index)) = (data["call_uuid"].as_str(), index.as_mut()) {
            let rows = index
                .by_call_uuid(uuid)
                .map_err(|e| format!("index: {e}"))?;
            data["timeline"] = Value::Array(rows.iter().map(row_json).collect());
        }
        Ok::<_, String>(data)
    })
    .await;
    match result {
        Ok(Ok(v)) => Response::ok(v),
        Ok(Err(e)) => Response::error(e),
        Err(e) => Response::error(format!("show failed: {e}")),
    }
}
