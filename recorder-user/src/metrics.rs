//! Prometheus metrics: text exposition format 0.0.4 on `GET /metrics`.
//!
//! The HTTP side is a minimal HTTP/1.1 responder (request line and headers read, one response,
//! connection closed): a scrape endpoint needs nothing more, and it keeps a web stack out of the
//! daemon.
//!
//! Ring buffer fill: a BPF ring buffer offers no fill query through aya, so the endpoint exposes
//! the consumer backlog instead: records the kernel wrote to the rings (`captured`) that the
//! consumer has not yet handed to the writer. It is zero when the consumer keeps up and grows
//! when it falls behind, which is what a fill level would show.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    capture::loader::Counters,
    daemon::{query, DriverCommand},
    sip::SipCounters,
    siprec::session::SiprecCounters,
    writer::{WriterHandle, WriterStats, WRITE_LATENCY_BOUNDS_US},
};

/// Errors of the metrics endpoint.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the numbers come from.
#[derive(Clone)]
pub struct Sources {
    pub commands: mpsc::Sender<DriverCommand>,
    pub counters: Arc<Counters>,
    pub writer: Arc<WriterHandle>,
    pub started: Instant,
    /// The ring consumer's back-pressure stalls.
    pub stalls: Arc<crate::capture::ring::StallStats>,
}

/// Everything one scrape shows, gathered first and rendered after (so rendering is testable).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub uptime_secs: u64,
    /// The XDP program's counters by name (`abi::counter::NAMES`).
    pub xdp: BTreeMap<String, u64>,
    pub sessions_active: u64,
    pub siprec: SiprecCounters,
    pub sip: SipCounters,
    pub writer: WriterStats,
    /// Ring consumer stalls: count, total and longest (microseconds).
    pub stalls: (u64, u64, u64),
}

impl Snapshot {
    /// Reads every source; parts whose source is gone stay at zero.
    pub async fn gather(sources: &Sources) -> Self {
        let xdp = match sources.counters.named() {
            Ok(named) => named.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the XDP counters");
                BTreeMap::new()
            }
        };
        let (sessions_active, siprec, sip) = query(&sources.commands, |app, endpoint, _| {
            (
                app.session_count() as u64,
                app.counters().clone(),
                endpoint.counters().clone(),
            )
        })
        .await
        .unwrap_or_default();
        Self {
            uptime_secs: sources.started.elapsed().as_secs(),
            xdp,
            sessions_active,
            siprec,
            sip,
            writer: sources.writer.stats(),
            stalls: {
                use std::sync::atomic::Ordering::Relaxed;
                let s = &sources.stalls;
                (
                    s.stalls.load(Relaxed),
                    s.stalled_us.load(Relaxed),
                    s.longest_stall_us.load(Relaxed),
                )
            },
        }
    }

    fn xdp(&self, name: &str) -> u64 {
        self.xdp.get(name).copied().unwrap_or(0)
    }

    /// Records captured by the kernel and not yet consumed (see the module documentation).
    pub fn ring_backlog(&self) -> u64 {
        self.xdp("captured").saturating_sub(self.writer.packets_in)
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        out.single(
            "recorder_build_info",
            "gauge",
            "Version of the running recorder.",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        out.single(
            "recorder_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            &[],
            self.uptime_secs,
        );

        out.single(
            "recorder_sessions_active",
            "gauge",
            "Recording sessions in progress.",
            &[],
            self.sessions_active,
        );
        out.single(
            "recorder_sessions_started_total",
            "counter",
            "Recording sessions started.",
            &[],
            self.siprec.sessions_started,
        );
        out.family(
            "recorder_sessions_ended_total",
            "counter",
            "Recording sessions ended, by reason.",
            self.siprec
                .sessions_ended
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], *n)),
        );
        out.family(
            "recorder_sessions_rejected_total",
            "counter",
            "Recording requests refused, by status code and cause.",
            self.siprec.rejections.iter().map(|((code, cause), n)| {
                (
                    vec![("code", code.to_string()), ("cause", cause.to_string())],
                    *n,
                )
            }),
        );

        out.single(
            "recorder_xdp_frames_seen_total",
            "counter",
            "Frames the XDP program ran on.",
            &[],
            self.xdp("seen"),
        );
        out.single(
            "recorder_xdp_packets_matched_total",
            "counter",
            "UDP packets to a recorded port.",
            &[],
            self.xdp("matched"),
        );
        out.single(
            "recorder_xdp_packets_captured_total",
            "counter",
            "Packets copied into a ring buffer.",
            &[],
            self.xdp("captured"),
        );
        out.single(
            "recorder_xdp_packets_truncated_total",
            "counter",
            "Captured packets cut to the snap length.",
            &[],
            self.xdp("truncated"),
        );
        out.family(
            "recorder_xdp_packets_dropped_total",
            "counter",
            "Packets of a recorded flow the kernel could not capture, by reason.",
            ["ring_full", "copy_failed"]
                .into_iter()
                .map(|r| (vec![("reason", r.to_string())], self.xdp(r))),
        );
        out.family(
            "recorder_xdp_frames_ignored_total",
            "counter",
            "Frames not captured by design, by reason.",
            [
                "wrong_source",
                "parse_failed",
                "fragment_skipped",
                "not_udp",
            ]
            .into_iter()
            .map(|r| (vec![("reason", r.to_string())], self.xdp(r))),
        );

        out.single(
            "recorder_ring_backlog_records",
            "gauge",
            "Records captured by the kernel and not yet consumed (ring buffer fill).",
            &[],
            self.ring_backlog(),
        );
        out.single(
            "recorder_ring_records_consumed_total",
            "counter",
            "Records taken from the ring buffers and handed to the writer.",
            &[],
            self.writer.packets_in,
        );
        out.single(
            "recorder_ring_consumer_stalls_total",
            "counter",
            "Times the writer had no room and records waited in the rings (back-pressure).",
            &[],
            self.stalls.0,
        );
        out.single(
            "recorder_ring_consumer_stalled_microseconds_total",
            "counter",
            "Time the ring consumer waited for the writer.",
            &[],
            self.stalls.1,
        );
        out.single(
            "recorder_ring_consumer_longest_stall_microseconds",
            "gauge",
            "Longest wait for the writer since start (size ring_bytes to cover it).",
            &[],
            self.stalls.2,
        );
        out.single(
            "recorder_writer_queue_packets",
            "gauge",
            "Packets waiting in the queues to the writer's shards.",
            &[],
            self.writer.queued_packets,
        );
        out.family(
            "recorder_writer_packets_dropped_total",
            "counter",
            "Packets the writer could not store, by reason (wav_write_failed: WAV chunks of up to 1 s).",
            [
                ("pcap_write_failed", self.writer.pcap_write_failed),
                ("wav_write_failed", self.writer.wav_write_failed),
                ("unknown_flow", self.writer.unknown_flow),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("reason", r.to_string())], n)),
        );
        out.single(
            "recorder_srtp_auth_failures_total",
            "counter",
            "SRTP and SRTCP packets that failed authentication (kept in the pcap, never decoded).",
            &[],
            self.writer.srtp_auth_failed,
        );
        out.family(
            "recorder_writer_errors_total",
            "counter",
            "Writer operations that failed, by kind (recording not created or not resumed, index update, metadata.json replacement, event for an unknown recording).",
            [
                ("start_failed", self.writer.start_failed),
                ("index", self.writer.index_errors),
                ("metadata_write", self.writer.metadata_write_failed),
                ("unknown_recording_event", self.writer.unknown_recording_events),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("kind", r.to_string())], n)),
        );

        out.family(
            "recorder_sip_requests_total",
            "counter",
            "SIP requests received, by method (retransmissions included).",
            self.sip
                .requests
                .iter()
                .map(|(m, n)| (vec![("method", m.clone())], *n)),
        );
        out.family(
            "recorder_sip_responses_sent_total",
            "counter",
            "SIP responses sent, by status code.",
            self.sip
                .responses_sent
                .iter()
                .map(|(c, n)| (vec![("code", c.to_string())], *n)),
        );
        out.family(
            "recorder_sip_responses_received_total",
            "counter",
            "SIP responses received to the recorder's requests, by status code.",
            self.sip
                .responses_received
                .iter()
                .map(|(c, n)| (vec![("code", c.to_string())], *n)),
        );

        out.single(
            "recorder_disk_bytes_written_total",
            "counter",
            "Bytes written to recording files (pcap records and WAV samples).",
            &[],
            self.writer.bytes_written,
        );
        out.histogram(
            "recorder_write_latency_seconds",
            "Time to store one packet in its recording's files.",
            &self.writer.write_latency.buckets,
            self.writer.write_latency.count,
            self.writer.write_latency.sum_ns,
        );
        out.text
    }
}

/// Builds exposition text.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.header(name, kind, help);
        let labels: Vec<(&str, String)> = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.sample(name, &labels, v);
    }

    fn family<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl Iterator<Item = (Vec<(&'a str, String)>, u64)>,
    ) {
        self.header(name, kind, help);
        for (labels, v) in samples {
            self.sample(name, &labels, v);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, cumulative: &[u64], count: u64, sum_ns: u64) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, n) in WRITE_LATENCY_BOUNDS_US.iter().zip(cumulative) {
            let le = format!("{}", *bound as f64 / 1e6);
            self.sample(&bucket, &[("le", le)], n);
        }
        self.sample(&bucket, &[("le", "+Inf".into())], count);
        self.sample(&format!("{name}_sum"), &[], sum_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), &[], count);
    }
}

/// Label value escaping of the text format: backslash, double quote, line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `addr` and serves scrapes until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    info!(%addr, "metrics endpoint listening");
    let sources = Arc::new(sources);
    Ok(tokio::spawn(async move {
        let mut backoff = crate::accept::AcceptBackoff::new("metrics");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff.succeeded();
                        let sources = sources.clone();
                        let shutdown = shutdown.clone();
                        // Ends with the daemon: the sources hold the writer, which shutdown
                        // needs back.
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                result = handle(stream, &sources) => if let Err(e) = result {
                                    debug!(%peer, error = %e, "metrics connection ended");
                                },
                            }
                        });
                    }
                    Err(e) => backoff.failed(&e).await,
                },
            }
        }
    }))
}

/// Longest request head accepted (a scrape's is a few hundred bytes).
const MAX_HEAD: usize = 8192;

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Parses the request line of `head` (headers are read but not needed).
fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let mut parts = text.lines().next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head_only: false },
        ("HEAD", "/metrics") => Route::Metrics { head_only: true },
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

async fn handle(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let (status, body, head_only) = match route(&head) {
        Route::Metrics { head_only } => (
            "200 OK",
            Snapshot::gather(sources).await.render(),
            head_only,
        ),
        Route::NotFound => ("404 Not Found", "not found: try /metrics\n".into(), false),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "GET or HEAD\n".into(), false),
        Route::BadRequest => ("400 Bad Request", "bad request\n".into(), false),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::LatencyHistogram;

    /// Parses exposition text into `name{labels}` -> value, checking every line's form.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut samples = BTreeMap::new();
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("sample has a value");
            let name = key.split('{').next().unwrap();
            assert!(
                typed.iter().any(|t| name.starts_with(t.as_str())),
                "{name} has a TYPE line"
            );
            samples.insert(key.to_string(), value.parse().expect("numeric value"));
        }
        samples
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            uptime_secs: 12,
            sessions_active: 2,
            ..Default::default()
        };
        s.xdp.insert("captured".into(), 110);
        s.xdp.insert("ring_full".into(), 3);
        s.siprec.sessions_started = 5;
        s.siprec.sessions_ended.insert("bye", 3);
        s.siprec.rejections.insert((503, "session_limit"), 4);
        s.sip.requests.insert("INVITE".into(), 7);
        s.sip.responses_sent.insert(200, 6);
        s.writer.packets_in = 100;
        s.writer.bytes_written = 4242;
        s.writer.write_latency = LatencyHistogram {
            buckets: vec![1, 2, 3, 3, 3, 3, 3, 3, 3, 3],
            count: 4,
            sum_ns: 250_000_000,
        };
        s
    }

    #[test]
    fn renders_parsable_text_with_the_snapshot_numbers() {
        let m = parse(&snapshot().render());
        assert_eq!(m["recorder_sessions_active"], 2.0);
        assert_eq!(m["recorder_sessions_started_total"], 5.0);
        assert_eq!(m["recorder_sessions_ended_total{reason=\"bye\"}"], 3.0);
        assert_eq!(
            m["recorder_sessions_rejected_total{code=\"503\",cause=\"session_limit\"}"],
            4.0
        );
        assert_eq!(m["recorder_xdp_packets_captured_total"], 110.0);
        assert_eq!(
            m["recorder_xdp_packets_dropped_total{reason=\"ring_full\"}"],
            3.0
        );
        assert_eq!(m["recorder_ring_backlog_records"], 10.0);
        assert_eq!(m["recorder_sip_requests_total{method=\"INVITE\"}"], 7.0);
        assert_eq!(m["recorder_sip_responses_sent_total{code=\"200\"}"], 6.0);
        assert_eq!(m["recorder_disk_bytes_written_total"], 4242.0);
        assert_eq!(
            m["recorder_write_latency_seconds_bucket{le=\"0.000001\"}"],
            1.0
        );
        assert_eq!(m["recorder_write_latency_seconds_bucket{le=\"+Inf\"}"], 4.0);
        assert_eq!(m["recorder_write_latency_seconds_sum"], 0.25);
        assert_eq!(m["recorder_write_latency_seconds_count"], 4.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = Snapshot::default();
        s.sip.requests.insert("X\"Y".into(), 1);
        assert!(s
            .render()
            .contains("recorder_sip_requests_total{method=\"X\\\"Y\"} 1"));
    }

    #[test]
    fn routes_by_request_line() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"garbage"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }
}
