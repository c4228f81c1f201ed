//! The daemon: wires capture, signaling, writers and the control API, and runs them until a
//! signal says stop.
//!
//! Tasks: the SIP driver (owns the endpoint and the SIPREC sessions, hence the flow map), the
//! ring consumer (feeds the writers), the control server, and a housekeeping tick (disk space,
//! retention). Signaling never touches files; the writers learn about sessions from the events
//! the SIPREC layer emits.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    capture::{
        loader::{Capture, CaptureConfig, Counters},
        ring::RingConsumer,
    },
    config::{Config, LogFormat},
    control::{self, ControlState},
    events::SessionEvent,
    flow::maps::BpfFlowTable,
    metrics, reload,
    sip::{Endpoint, EndpointConfig},
    siprec::session::{Recorder, SiprecConfig},
    transport::{
        driver::{self, Command},
        tls,
    },
    writer::{self, WriterConfig},
};

/// The SIPREC layer as the daemon runs it.
pub type DaemonRecorder = Recorder<BpfFlowTable>;

/// A command for the driver task (operator stop, shutdown, queries).
pub type DriverCommand = Command<DaemonRecorder>;

/// Replaces the log filter of the subscriber [`init_logging`] installed (SIGHUP).
type FilterReload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static LOG_FILTER: std::sync::OnceLock<FilterReload> = std::sync::OnceLock::new();

/// Sets up logging as configured (human text on a terminal, JSON when asked).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The filter sits behind a reload handle so SIGHUP can change the level.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = LOG_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }};
    }
    match config.log_format {
        LogFormat::Json => install!(builder.json()),
        LogFormat::Text => install!(builder),
    }
}

/// Changes the log level or filter of the running daemon.
pub fn set_log_filter(level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let reload = LOG_FILTER
        .get()
        .ok_or("logging was not set up by the daemon")?;
    reload(filter)
}

/// Runs the daemon on a fresh runtime until SIGTERM/SIGINT.
pub fn run_blocking(config: Config) -> Result<()> {
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
            signals.cancel();
        });
        run(config, shutdown).await
    })
}

/// Logs one line per session event, with the recording id and CallUUID. `uuids` remembers each
/// live recording's CallUUID for the events that do not carry it.
fn log_event(event: &SessionEvent, uuids: &mut std::collections::HashMap<String, String>) {
    let uuid = |id: &String, uuids: &std::collections::HashMap<String, String>| {
        uuids.get(id).cloned().unwrap_or_else(|| "-".into())
    };
    match event {
        SessionEvent::Started {
            id, ids, streams, ..
        } => {
            let call_uuid = ids.call_uuid.clone().unwrap_or_else(|| "-".into());
            info!(
                recording = %id,
                call_uuid = %call_uuid,
                call_id = %ids.sip_call_id,
                streams = streams.len(),
                "recording started"
            );
            uuids.insert(id.clone(), call_uuid);
        }
        SessionEvent::MediaChanged { id, streams, .. } => {
            info!(recording = %id, call_uuid = %uuid(id, uuids), streams = streams.len(), "media changed")
        }
        SessionEvent::ParticipantsChanged {
            id,
            participants,
            ids,
            ..
        } => {
            let call_uuid = ids.call_uuid.clone().unwrap_or_else(|| "-".into());
            info!(
                recording = %id,
                call_uuid = %call_uuid,
                participants = participants.len(),
                "participants changed"
            );
            uuids.insert(id.clone(), call_uuid);
        }
        SessionEvent::Paused { id, label, .. } => {
            info!(recording = %id, call_uuid = %uuid(id, uuids), label, "stream paused")
        }
        SessionEvent::Resumed { id, label, .. } => {
            info!(recording = %id, call_uuid = %uuid(id, uuids), label, "stream resumed")
        }
        SessionEvent::Ended { id, reason, .. } => {
            let call_uuid = uuids.remove(id).unwrap_or_else(|| "-".into());
            info!(recording = %id, call_uuid = %call_uuid, reason = reason.name(), "recording ended")
        }
    }
}

/// Runs everything until `shutdown` is cancelled, then stops in order: no new sessions, every
/// recording finished (`shutdown`), rings drained, files closed, XDP detached.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // Before anything else: a SIGHUP during start-up must not kill the daemon (default action).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let media_address = config.media_address.context("media_address is required")?;
    std::fs::create_dir_all(&config.spool)
        .with_context(|| format!("creating spool {}", config.spool.display()))?;
    match writer::repair_spool(&config.spool) {
        Ok(repaired) if !repaired.is_empty() => {
            warn!(count = repaired.len(), ids = ?repaired, "repaired recordings interrupted by a crash")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "spool repair failed"),
    }

    let mut writer_config = WriterConfig::new(config.spool.clone());
    writer_config.index = Some(config.index_path());
    if let crate::index::IndexLocation::Postgres(url) = config.index_location() {
        writer_config.index_url = Some(url);
    }
    writer_config.host = config.site_name();
    writer_config.min_free_bytes = config.min_free_bytes;
    writer_config.media_floor_bytes = config.min_free_bytes / 4;
    writer_config.retention_max_age = config
        .retention_max_age_hours
        .map(|h| Duration::from_secs(h * 3600));
    writer_config.retention_max_bytes = config.retention_max_bytes;
    let (writer, sink) = writer::start(writer_config).context("starting the writers")?;
    let writer = Arc::new(writer);

    let mut capture = Capture::load(&CaptureConfig {
        snaplen: config.snaplen,
        ring_bytes: config.ring_bytes,
        max_flows: config.max_flows,
        attach_mode: config.attach_mode,
        ..CaptureConfig::default()
    })
    .context("loading the XDP program")?;
    for interface in &config.interfaces {
        capture
            .attach(interface, config.attach_mode)
            .with_context(|| format!("attaching XDP to {interface}"))?;
    }
    let flows = capture.take_flow_table()?;
    let consumer = RingConsumer::new(capture.take_rings()?)?;
    let counters: Arc<Counters> = Arc::new(capture.take_counters()?);

    // Capture runs until every session has ended, so no packet of a finishing call is lost.
    // Signaling events reach the writers through the capture task, after a ring drain, so a
    // call's last packets are written before the event that ends it.
    let (events_tx, events_rx) = mpsc::unbounded_channel::<SessionEvent>();
    let capture_stop = CancellationToken::new();
    let capture_task = {
        let stop = capture_stop.clone();
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut sink = sink;
            let consumer = consumer
                .run_with_events(
                    &mut sink,
                    Duration::from_millis(20),
                    stop,
                    events_rx,
                    |event| matches!(event, SessionEvent::Ended { .. }),
                    move |_, event| writer.event(event),
                )
                .await;
            (consumer.stats, sink)
        })
    };

    let mut sockets = driver::bind(&config.sip_listen).context("binding SIP listen addresses")?;
    if let (false, Some(cert), Some(key)) = (
        config.sip_tls_listen.is_empty(),
        &config.tls_certificate,
        &config.tls_private_key,
    ) {
        let tls_config = tls::server_config(cert, key).context("loading the TLS certificate")?;
        sockets
            .bind_tls(&config.sip_tls_listen, tls_config)
            .context("binding SIP TLS listen addresses")?;
    }
    let listen = sockets.local_addrs();
    let tls_listen = sockets.tls_local_addrs();
    let contact_host = match listen.first().map(|a| a.ip()) {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => media_address,
    };
    let endpoint = Endpoint::new(EndpointConfig {
        contact_host: contact_host.to_string(),
        contact_port: listen.first().map(|a| a.port()).unwrap_or(5060),
        contact_tls_port: tls_listen.first().map(|a| a.port()),
        contact_params: vec!["+sip.srs".into()],
        retry_after_secs: config.retry_after_secs,
        ..EndpointConfig::default()
    });
    // Receiver reports follow the same events as the writers.
    let (rtcp_tx, rtcp_rx) = mpsc::unbounded_channel::<SessionEvent>();
    let rtcp_task = tokio::spawn(crate::rtcp::run(
        media_address,
        writer.reception_reader(),
        rtcp_rx,
        shutdown.clone(),
    ));
    let mut call_uuids = std::collections::HashMap::new();
    let recorder = Recorder::new(
        SiprecConfig {
            media_address,
            rtp_ports: (config.rtp_ports.lo, config.rtp_ports.hi),
            port_cooldown: Duration::from_secs(config.port_cooldown_secs),
            max_sessions: config.max_sessions,
            idle_timeout: config.idle_timeout(),
            answer_delay: Duration::from_millis(config.answer_delay_ms),
            acl: config.acl.iter().map(|c| (c.addr, c.prefix)).collect(),
            uuid_headers: config.uuid_headers.clone(),
            min_session_expires: config.min_session_expires,
            flow_action: config.flow_action,
            pin_source: config.pin_source,
            require_siprec_tag: config.require_siprec_tag,
            require_metadata: config.require_metadata,
            require_label: config.require_label,
            answer_inactive: config.answer_inactive,
            retry_after: config.retry_after_secs,
        },
        flows,
        Box::new(move |event: SessionEvent| {
            log_event(&event, &mut call_uuids);
            let _ = rtcp_tx.send(event.clone());
            // Fails only once the capture task is gone, at the very end of shutdown.
            let _ = events_tx.send(event);
        }),
    );

    let (commands_tx, commands_rx) = mpsc::channel::<DriverCommand>(64);
    let driver_stop = CancellationToken::new();
    let driver_task = tokio::spawn(driver::run_on(
        sockets,
        endpoint,
        recorder,
        driver_stop.clone(),
        Some(commands_rx),
    ));
    info!(
        sip = ?listen,
        sip_tls = ?tls_listen,
        media = %media_address,
        interfaces = ?capture.attachments(),
        spool = %config.spool.display(),
        "recorder running"
    );

    let control_state = ControlState::new(
        config.clone(),
        commands_tx.clone(),
        counters.clone(),
        writer.clone(),
        capture.attachments(),
    );
    let control_task = control::serve(control_state, shutdown.clone())
        .await
        .context("starting the control socket")?;
    let metrics_task = match config.metrics_listen {
        Some(addr) => Some(
            metrics::serve(
                addr,
                metrics::Sources {
                    commands: commands_tx.clone(),
                    counters: counters.clone(),
                    writer: writer.clone(),
                    started: std::time::Instant::now(),
                },
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let reload_task = reload::spawn(
        hangup,
        config.clone(),
        commands_tx.clone(),
        writer.clone(),
        shutdown.clone(),
    );

    // Housekeeping: refuse sessions on a full disk, enforce retention.
    let housekeeping = {
        let writer = writer.clone();
        let commands = commands_tx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut accepting = true;
            let mut retention_due = 0u32;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let ok = writer.can_accept_new_session();
                if ok != accepting {
                    accepting = ok;
                    if ok {
                        info!("spool has room again: accepting new sessions");
                    } else {
                        warn!("spool is nearly full: refusing new sessions (503)");
                    }
                    let cmd: DriverCommand = Box::new(move |app: &mut DaemonRecorder, _, _| {
                        app.set_accepting(ok, "spool full")
                    });
                    let _ = commands.send(cmd).await;
                }
                retention_due += 1;
                if retention_due >= 60 {
                    retention_due = 0;
                    match writer.enforce_retention() {
                        Ok(deleted) if !deleted.is_empty() => {
                            info!(count = deleted.len(), "retention deleted recordings")
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "retention failed"),
                    }
                }
            }
        })
    };

    shutdown.cancelled().await;
    info!("stopping: refusing new sessions and finishing every recording");
    let (done_tx, done_rx) = oneshot::channel();
    let cmd: DriverCommand = Box::new(move |app: &mut DaemonRecorder, endpoint, now| {
        app.set_accepting(false, "shutting down");
        app.shutdown(now, endpoint);
        let _ = done_tx.send(());
    });
    if commands_tx.send(cmd).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
    }
    // The BYEs queued by shutdown leave in the drain that follows the command; give them a turn.
    let (flushed_tx, flushed_rx) = oneshot::channel();
    let flush: DriverCommand = Box::new(move |_, _, _| {
        let _ = flushed_tx.send(());
    });
    if commands_tx.send(flush).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), flushed_rx).await;
    }
    driver_stop.cancel();
    match driver_task.await {
        Ok(Ok(_recorder)) => {}
        Ok(Err(e)) => error!(error = %e, "SIP driver failed"),
        Err(e) => error!(error = %e, "SIP driver panicked"),
    }
    capture_stop.cancel();
    let (stats, sink) = capture_task.await.context("capture task")?;
    drop(sink);
    let _ = housekeeping.await;
    let _ = control_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = reload_task.await;
    let _ = rtcp_task.await;
    capture.detach_all();
    let writer =
        Arc::try_unwrap(writer).map_err(|_| anyhow::anyhow!("writer still in use at shutdown"))?;
    let written = writer.shutdown();
    info!(records = stats.records, ?written, "recorder stopped");
    Ok(())
}

/// Convenience for the control API: runs `f` on the driver task and returns its result.
pub async fn query<T: Send + 'static>(
    commands: &mpsc::Sender<DriverCommand>,
    f: impl FnOnce(&mut DaemonRecorder, &mut Endpoint, std::time::Instant) -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let cmd: DriverCommand = Box::new(move |app, endpoint, now| {
        let _ = tx.send(f(app, endpoint, now));
    });
    commands.send(cmd).await.ok()?;
    rx.await.ok()
}
