//! The daemon: wires capture, signaling, writers and the control API, and runs them until a
//! signal says stop.
//!
//! Tasks: the SIP driver (owns the endpoint and the SIPREC sessions, hence the flow map), the
//! ring consumer (feeds the writers), the control server, and a housekeeping tick (disk space,
//! retention). Signaling never touches files; the writers learn about sessions from the events
//! the SIPREC layer emits.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    capture::{
        loader::{Capture, CaptureConfig, CaptureError, Counters},
        ring::RingConsumer,
    },
    config::{Config, LogFormat},
    control::{self, ControlState},
    events::SessionEvent,
    flow::maps::BpfFlowTable,
    handover::Handover,
    http, metrics, reload,
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
    let filter = crate::config::log_filter(&config.log_level)
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
    let filter = crate::config::log_filter(level)?;
    let reload = LOG_FILTER
        .get()
        .ok_or("logging was not set up by the daemon")?;
    reload(filter)
}

/// Raises the soft limit on open files to the hard one (sessions need sockets and, briefly,
/// files; the default soft limit of 1024 is far below what 10 000 sessions take) and logs both.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a pointer to a local rlimit.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "getrlimit(RLIMIT_NOFILE) failed");
        return;
    }
    let soft = limit.rlim_cur;
    if soft < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            warn!(soft, hard = limit.rlim_max, error = %std::io::Error::last_os_error(), "raising RLIMIT_NOFILE failed");
            return;
        }
    }
    info!(
        soft_was = soft,
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        "open files limit"
    );
}

/// The nice value signaling threads run at: the daemon's own (read the first time, before any
/// thread is lowered) plus `signaling_nice`.
fn signaling_priority(nice: u8) -> i32 {
    static TARGET: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *TARGET.get_or_init(|| {
        // SAFETY: getpriority takes and returns plain integers; errno is reset first because
        // -1 is a valid nice value.
        let base = unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
        };
        (base + i32::from(nice)).min(19)
    })
}

/// Lowers the calling thread (Linux keeps a nice value per thread) to the signaling priority,
/// so it yields the CPU to the recording threads. Threads a lowered thread spawns inherit it;
/// setting the same value again is harmless. A failure is logged and changes nothing else.
fn lower_this_thread(nice: u8) {
    if nice == 0 {
        return;
    }
    let target = signaling_priority(nice);
    // SAFETY: setpriority and gettid take and return plain integers.
    let failed =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, target) != 0 };
    if failed {
        warn!(nice = target, error = %std::io::Error::last_os_error(), "could not lower a signaling thread's priority");
    }
}

/// Runs the daemon on a fresh runtime until SIGTERM/SIGINT.
/// Keeps memory the process frees for its next allocations instead of giving it back to the
/// kernel (glibc trims the heap when 128 KiB at its top are free, and maps allocations over a
/// moving threshold of its own). The packet stage frees and allocates chunk buffers and WAV
/// windows all the time: given back, each reuse faulted in and zeroed a fresh page (11.6 % of
/// the receive CPU in `clear_page_erms` at 3 000 calls with media, far more where the
/// hypervisor takes freed guest pages back). The price is that RSS stays at its peak.
fn keep_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters (it takes the allocator's locks).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // The largest value glibc takes on 64 bits (HEAP_MAX_SIZE / 2); fixed, so it no
        // longer moves.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

pub fn run_blocking(config: Config) -> Result<()> {
    keep_freed_heap();
    init_logging(&config);
    raise_nofile_limit();
    let nice = config.signaling_nice;
    // Read before any thread is lowered.
    signaling_priority(nice);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Workers and blocking threads: signaling, control, HTTP, never the writers (their
        // threads are spawned from the main thread before it lowers itself, in `run`).
        .on_thread_start(move || lower_this_thread(nice))
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

/// Whether the process has file descriptors to spare for new sessions (each takes RTCP sockets
/// and, briefly, files): more than a twentieth of its limit, and at least 256, still free.
fn fds_to_spare() -> bool {
    let Ok(open) = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count() as u64) else {
        return true;
    };
    // SAFETY: getrlimit writes the struct it is given.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return true;
    }
    let limit = limit.rlim_cur;
    limit.saturating_sub(open) > (limit / 20).max(256)
}

/// How long shutdown waits for the writer's other users to let go of it.
const WRITER_RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Waits (up to `wait`) until `shared` has no other owner and returns its value. Control
/// connections outlive the control listener: one still answering a query (an index search
/// takes seconds with tens of thousands of recordings) holds the writer for that long, and
/// failing then would leave the recordings unfinished and XDP attached.
async fn sole_owner<T>(mut shared: Arc<T>, wait: Duration) -> Result<T, Arc<T>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match Arc::try_unwrap(shared) {
            Ok(value) => return Ok(value),
            Err(still) if tokio::time::Instant::now() >= deadline => return Err(still),
            Err(still) => shared = still,
        }
        // Nothing signals the last clone's drop: poll, briefly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Holds an exclusive lock on the spool for the daemon's lifetime: two daemons on one spool (or
/// one handover file) would corrupt each other's recordings.
fn lock_spool(spool: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = spool.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "{} is locked: another recorder daemon uses this spool",
            path.display()
        );
    }
    Ok(file)
}

/// Runs everything until `shutdown` is cancelled, then stops in order. Either (default) no new
/// sessions, every recording finished (`shutdown`), rings drained, files closed, XDP detached;
/// or, with `detach_on_exit`, the live recordings handed over to the next daemon: capture stays
/// attached and pinned, sessions and open files are saved in the handover file.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // Before anything else: a SIGHUP during start-up must not kill the daemon (default action).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // SIGUSR1 drains (default action: terminate, which would lose the live recordings).
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("installing the SIGUSR1 handler")?;
    let media_address = config.media_address.context("media_address is required")?;
    std::fs::create_dir_all(&config.spool)
        .with_context(|| format!("creating spool {}", config.spool.display()))?;
    let _spool_lock = lock_spool(&config.spool)?;

    // What the previous daemon left to carry on, if it left with detach_on_exit.
    let handover_path = config.handover_path();
    let handover = match Handover::load(&handover_path) {
        Ok(handover) => handover,
        Err(e) => {
            error!(error = %e, "the previous daemon's sessions cannot be carried on; its recordings are repaired as interrupted");
            None
        }
    };
    if let Some(h) = &handover {
        info!(
            recordings = h.writer.recording_ids().len(),
            written_by = %h.written_by,
            capture_pinned = h.capture_pinned,
            "carrying on the recordings of the previous daemon"
        );
    }
    let mut capture_config = CaptureConfig {
        snaplen: config.snaplen,
        ring_bytes: config.ring_bytes,
        max_flows: config.max_flows,
        // RTP/RTCP ports are all allocated from this range at this address: the program finds
        // them by array index.
        flow_addrs: vec![media_address],
        flow_ports: Some((config.rtp_ports.lo, config.rtp_ports.hi)),
        attach_mode: config.attach_mode,
        pin_dir: Some(config.pin_dir.clone()),
        create_pins: true,
    };
    let mut capture = match Capture::load(&capture_config) {
        // No bpffs there (`ip netns exec` remounts /sys), or a directory the service user may
        // not create (the systemd unit creates it): run, but say what a restart will lose.
        Err(e @ (CaptureError::NotBpffs(_) | CaptureError::PinDir { .. })) => {
            warn!(error = %e, "capture is not pinned: a restart cannot carry on recordings without loss");
            capture_config.pin_dir = None;
            Capture::load(&capture_config)
        }
        loaded => loaded,
    }
    .context("loading the XDP program")?;
    if capture.adopted() {
        info!(pin_dir = %config.pin_dir.display(), "adopted the pinned capture: packets buffered while no daemon ran are drained now");
    } else if handover.as_ref().is_some_and(|h| h.capture_pinned) {
        warn!("the previous daemon's pinned capture is gone (reboot, or pins removed): packets between its exit and now are lost");
    }
    for interface in &config.interfaces {
        capture
            .attach(interface, config.attach_mode)
            .with_context(|| format!("attaching XDP to {interface}"))?;
    }
    // A pinned link on an interface no longer configured would capture into our rings forever.
    for stale in capture.stale_links() {
        match capture.unpin_stale_link(&stale) {
            Ok(()) => {
                info!(interface = %stale.interface, "detached XDP from an interface no longer configured")
            }
            Err(e) => {
                warn!(interface = %stale.interface, error = %e, "could not detach XDP from an interface no longer configured")
            }
        }
    }
    let flows = capture.take_flow_table()?;
    let consumer = RingConsumer::new(capture.take_rings()?)?;
    let stalls = consumer.stall_stats();
    let counters: Arc<Counters> = Arc::new(capture.take_counters()?);

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
    let transport_monitor = sockets.monitor();
    let api_counters = Arc::new(crate::guard::ApiCounters::default());
    let tls_listen = sockets.tls_local_addrs();
    let contact_host = match listen.first().map(|a| a.ip()) {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => media_address,
    };
    let mut endpoint = Endpoint::new(EndpointConfig {
        contact_host: contact_host.to_string(),
        contact_port: listen.first().map(|a| a.port()).unwrap_or(5060),
        contact_tls_port: tls_listen.first().map(|a| a.port()),
        contact_params: vec!["+sip.srs".into()],
        retry_after_secs: config.retry_after_secs,
        // UDP transactions linger 32 s after their answer (two per call: INVITE and BYE), so
        // the table scales with the session limit: 4 per session allows ~600 calls/s at 10 000
        // sessions before new INVITEs get 503.
        max_transactions: config.max_sessions.saturating_mul(4).max(10_000),
        // The recorder answers OPTIONS: 503 while it would refuse a new session, so that a
        // load balancer probing with OPTIONS sends its INVITEs elsewhere.
        app_handles_options: true,
        ..EndpointConfig::default()
    });
    let (events_tx, events_rx) = mpsc::unbounded_channel::<SessionEvent>();
    let (rtcp_tx, rtcp_rx) = mpsc::unbounded_channel::<SessionEvent>();
    // Shared so that restored sessions' CallUUIDs are known to the log lines of their end.
    let call_uuids = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let rtcp_restored = rtcp_tx.clone();
    let siprec_config = SiprecConfig {
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
    };
    let uuids = call_uuids.clone();
    let on_event = Box::new(move |event: SessionEvent| {
        if let Ok(mut uuids) = uuids.lock() {
            log_event(&event, &mut uuids);
        }
        let _ = rtcp_tx.send(event.clone());
        // Fails only once the capture task is gone, at the very end of shutdown.
        let _ = events_tx.send(event);
    });
    // Sessions first: what cannot be restored is repaired on disk instead of resumed.
    let had_handover = handover.is_some();
    let handover = handover.filter(|h| match h.recorder.check(&siprec_config) {
        Ok(()) => true,
        Err(e) => {
            error!(error = %e, "the previous daemon's sessions cannot be carried on; its recordings are repaired as interrupted");
            false
        }
    });
    let (mut recorder, writer_handover) = match handover {
        Some(h) => (
            Recorder::restore(
                siprec_config,
                flows,
                on_event,
                h.recorder,
                std::time::Instant::now(),
                &mut endpoint,
            )
            .context("restoring the previous daemon's sessions")?,
            Some(h.writer),
        ),
        None => (Recorder::new(siprec_config, flows, on_event), None),
    };
    recorder.set_draining(config.drain);
    // Sessions that could not go on were ended by restore: their Ended events wait in the
    // channel for the resumed writer.
    let handed_over = writer_handover
        .as_ref()
        .map(|h| h.recording_ids())
        .unwrap_or_default();
    // Flow map entries no live session owns (a crash left them, or a session could not be
    // carried on) would capture into nothing; their ids stay retired.
    if let Some(max) = recorder.flows().max_flow_id() {
        recorder.flow_ids_above(max);
    }
    let owned = recorder.flow_locals();
    match recorder
        .flows_mut()
        .retain(|spec, _| owned.contains(&spec.local))
    {
        Ok(stale) if !stale.is_empty() => {
            info!(
                count = stale.len(),
                "removed flow map entries no live session owns"
            )
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not remove stale flow map entries"),
    }
    let mut carried_on = 0;
    if !handed_over.is_empty() {
        let restored = recorder.sessions();
        carried_on = restored.len();
        info!(
            sessions = carried_on,
            "previous daemon's sessions carried on"
        );
        let now = std::time::SystemTime::now();
        for session in restored {
            if let Ok(mut uuids) = call_uuids.lock() {
                let uuid = session.call_ids.call_uuid.clone();
                uuids.insert(session.id.clone(), uuid.unwrap_or_else(|| "-".into()));
            }
            // Receiver reports learn the restored streams as if they had just been negotiated.
            let _ = rtcp_restored.send(SessionEvent::MediaChanged {
                id: session.id,
                at: now,
                streams: session.streams,
            });
        }
    }

    let repair_t0 = std::time::Instant::now();
    let mut repaired_ids = Vec::new();
    match writer::repair_spool_except(&config.spool, &handed_over) {
        Ok(repaired) if !repaired.is_empty() => {
            repaired_ids = repaired.iter().map(|r| r.id.clone()).collect();
            let rebuilt: Vec<&str> = repaired
                .iter()
                .filter(|r| r.rebuilt)
                .map(|r| r.id.as_str())
                .take(20)
                .collect();
            if !rebuilt.is_empty() {
                warn!(
                    ids = ?rebuilt,
                    "recordings killed before their first metadata.json: rebuilt it from their files"
                );
            }
            let ports: Vec<u16> = repaired
                .iter()
                .flat_map(|r| r.local_ports.iter().copied())
                .collect();
            recorder.cool_down_ports(std::time::Instant::now(), &ports);
            let ids: Vec<&str> = repaired.iter().map(|r| r.id.as_str()).take(20).collect();
            warn!(
                count = repaired.len(),
                first_ids = ?ids,
                ports_cooling = ports.len(),
                took_ms = repair_t0.elapsed().as_millis() as u64,
                "repaired recordings interrupted by a crash; their RTP ports rest for port_cooldown_secs before reuse"
            )
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
    writer_config.metadata_interval = Duration::from_secs(config.metadata_interval_secs);
    if config.writer_shards > 0 {
        writer_config.shards = config.writer_shards;
    }
    writer_config.queue_packets = config.writer_queue_packets;
    writer_config.pcap_srtp = config.pcap_srtp;
    // Repaired recordings are indexed whether or not the index had their row.
    writer_config.reindex = repaired_ids;
    let (writer, sink) = match writer_handover {
        Some(h) => writer::start_resumed(writer_config, h),
        None => writer::start(writer_config),
    }
    .context("starting the writers")?;
    let writer = Arc::new(writer);
    // The writers' threads run (at the daemon's priority); what this thread does from here is
    // signaling, which yields to them when the CPU is short.
    lower_this_thread(config.signaling_nice);
    if config.signaling_nice > 0 {
        info!(
            signaling_nice = config.signaling_nice,
            "signaling threads yield the CPU to the writers"
        );
    }
    if had_handover {
        // Used: a later crash must not bring back sessions that end from now on.
        if let Err(e) = Handover::remove(&handover_path) {
            warn!(error = %e, "could not remove the used handover file");
        }
    }

    // Capture runs until every session has ended, so no packet of a finishing call is lost.
    // Signaling events reach the writers through the capture task, after a ring drain, so a
    // call's last packets are written before the event that ends it.
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

    // Receiver reports follow the same events as the writers.
    let rtcp_task = tokio::spawn(crate::rtcp::run(
        media_address,
        writer.reception_reader(),
        rtcp_rx,
        shutdown.clone(),
    ));
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
        detach_on_exit = config.detach_on_exit,
        "recorder running"
    );

    let detach_on_exit = Arc::new(AtomicBool::new(config.detach_on_exit));
    let control_state = ControlState::new(
        config.clone(),
        commands_tx.clone(),
        counters.clone(),
        writer.clone(),
        capture.attachments(),
        control::RestartInfo {
            pinned_in: capture.layout_dir().map(|d| d.to_path_buf()),
            adopted: capture.adopted(),
            carried_on,
            detach_on_exit: detach_on_exit.clone(),
        },
    )
    .with_consumer_stalls(stalls.clone())
    .with_guards(transport_monitor.clone(), api_counters.clone());
    let control_task = control::serve(control_state, shutdown.clone())
        .await
        .context("starting the control socket")?;
    let http_tasks = http::start(
        &config,
        metrics::Sources {
            commands: commands_tx.clone(),
            counters: counters.clone(),
            writer: writer.clone(),
            started: std::time::Instant::now(),
            stalls: stalls.clone(),
            transport: Some(transport_monitor),
            api: api_counters,
        },
        shutdown.clone(),
    )
    .await?;
    let reload_task = reload::spawn(
        hangup,
        config.clone(),
        commands_tx.clone(),
        writer.clone(),
        detach_on_exit.clone(),
        shutdown.clone(),
    );

    // SIGUSR1: drain (no new session, the live ones finish).
    let drain_task = {
        let commands = commands_tx.clone();
        let stop = shutdown.clone();
        let mut usr1 = usr1;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    got = usr1.recv() => if got.is_none() { break },
                }
                info!("SIGUSR1: draining");
                let cmd: DriverCommand =
                    Box::new(|app: &mut DaemonRecorder, _, _| app.set_draining(true));
                if commands.send(cmd).await.is_err() {
                    break;
                }
            }
        })
    };

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
                // A session needs sockets and files: without them it would be answered and
                // not recorded.
                let refusal = if !writer.can_accept_new_session() {
                    Some("spool full")
                } else if !fds_to_spare() {
                    Some("file descriptors nearly exhausted")
                } else {
                    None
                };
                let ok = refusal.is_none();
                if ok != accepting {
                    accepting = ok;
                    match refusal {
                        None => info!("accepting new sessions again"),
                        Some(reason) => warn!(reason, "refusing new sessions (503)"),
                    }
                    let reason = refusal.unwrap_or_default();
                    let cmd: DriverCommand = Box::new(move |app: &mut DaemonRecorder, _, _| {
                        app.set_accepting(ok, reason)
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
    let hand_over = detach_on_exit.load(Ordering::Relaxed);
    let (done_tx, done_rx) = oneshot::channel();
    let cmd: DriverCommand = if hand_over {
        info!(
            "stopping: handing the live recordings over to the next daemon; capture stays attached"
        );
        Box::new(move |app: &mut DaemonRecorder, endpoint, now| {
            app.set_accepting(false, "restarting");
            let _ = done_tx.send(Some(app.handover(now, endpoint)));
        })
    } else {
        info!("stopping: refusing new sessions and finishing every recording");
        Box::new(move |app: &mut DaemonRecorder, endpoint, now| {
            app.set_accepting(false, "shutting down");
            app.shutdown(now, endpoint);
            let _ = done_tx.send(None);
        })
    };
    let mut recorder_handover = None;
    if commands_tx.send(cmd).await.is_ok() {
        if let Ok(Ok(saved)) = tokio::time::timeout(Duration::from_secs(5), done_rx).await {
            recorder_handover = saved;
        }
    }
    // The BYEs (or 503s) queued above leave in the drain that follows the command; give them a
    // turn.
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
    for task in http_tasks {
        let _ = task.await;
    }
    let _ = reload_task.await;
    let _ = drain_task.await;
    let _ = rtcp_task.await;
    let writer = sole_owner(writer, WRITER_RELEASE_WAIT)
        .await
        .map_err(|_| anyhow::anyhow!("writer still in use at shutdown"))?;
    if let (true, Some(recorder_handover)) = (hand_over, recorder_handover) {
        let pinned = capture.pinning();
        let writer_handover = writer
            .handover()
            .context("handing over the open recordings")?;
        let recordings = writer_handover.recording_ids().len();
        Handover::new(recorder_handover, writer_handover, pinned)
            .save(&handover_path)
            .context("saving the handover file (the recordings stay active on disk and are repaired as interrupted at the next start)")?;
        let released = if pinned {
            capture.release_pinned()
        } else {
            capture.detach_and_unpin()
        };
        if let Err(e) = released {
            error!(error = %e, "releasing the capture");
        }
        info!(
            records = stats.records,
            recordings,
            capture_pinned = pinned,
            handover = %handover_path.display(),
            "recorder stopped; the next daemon carries on"
        );
        return Ok(());
    }
    if hand_over {
        error!("the sessions could not be saved: finishing the recordings instead");
    }
    if let Err(e) = capture.detach_and_unpin() {
        warn!(error = %e, "detaching XDP and removing its pins");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_the_writers_last_other_user() {
        let shared = Arc::new(7u32);
        let held = shared.clone();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            let _ = release_rx.await;
            drop(held);
        });
        let waiting = tokio::spawn(sole_owner(shared, Duration::from_secs(30)));
        // Its first try fails while `held` is alive.
        tokio::task::yield_now().await;
        release_tx.send(()).unwrap();
        holder.await.unwrap();
        assert_eq!(waiting.await.unwrap().ok(), Some(7));
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_user_that_never_lets_go() {
        let shared = Arc::new(7u32);
        let _held = shared.clone();
        let back = sole_owner(shared, Duration::from_millis(120))
            .await
            .expect_err("still shared");
        assert_eq!(Arc::strong_count(&back), 2);
    }
}
