//! Prometheus metrics: what one scrape shows, encoded by `prometheus-client` (OpenMetrics
//! text); the HTTP server in [`crate::http`] serves it on `GET /metrics`.
//!
//! Ring buffer fill: a BPF ring buffer offers no fill query through aya, so the endpoint exposes
//! the consumer backlog instead: records the kernel wrote to the rings (`captured`) that the
//! consumer has not yet handed to the writer. It is zero when the consumer keeps up and grows
//! when it falls behind, which is what a fill level would show.

use std::{collections::BTreeMap, fmt::Write, sync::Arc, time::Instant};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    capture::loader::Counters,
    daemon::{query, DriverCommand},
    sip::SipCounters,
    siprec::session::SiprecCounters,
    writer::{WriterHandle, WriterStats, WRITE_LATENCY_BOUNDS_US},
};

/// Where the numbers come from.
#[derive(Clone)]
pub struct Sources {
    pub commands: mpsc::Sender<DriverCommand>,
    pub counters: Arc<Counters>,
    pub writer: Arc<WriterHandle>,
    pub started: Instant,
    /// The ring consumer's back-pressure stalls.
    pub stalls: Arc<crate::capture::ring::StallStats>,
    /// SIP admission under load (queues, 503s at once, stream connections).
    pub transport: Option<crate::transport::TransportMonitor>,
    /// What the control socket's and HTTP API's limits refused.
    pub api: Arc<crate::guard::ApiCounters>,
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
    pub transport: crate::transport::TransportStats,
    pub api: crate::guard::ApiStats,
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
            transport: sources
                .transport
                .as_ref()
                .map(|t| t.stats())
                .unwrap_or_default(),
            api: sources.api.stats(),
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

    /// The exposition text (OpenMetrics, as `prometheus-client` encodes it).
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// The content type of [`Snapshot::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's numbers as a `prometheus-client` collector. The numbers are gathered from the
/// daemon's own counters at scrape time, so every metric is a constant of this snapshot.
#[derive(Debug)]
struct Exposition(Snapshot);

/// A label value escaped as the text format wants (`prometheus-client` writes them verbatim,
/// and SIP method names come from the network).
#[derive(Debug)]
struct Escaped(String);

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(&escape(&self.0))
    }
}

type Labels = Vec<(&'static str, Escaped)>;

fn labels<const N: usize>(pairs: [(&'static str, String); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k, Escaped(v))).collect()
}

/// Writes metric families into one scrape.
struct Families<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Families<'_, '_> {
    /// A counter: `name` is the exposed name, `_total` included (the encoder appends it).
    fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        let base = name.strip_suffix("_total").unwrap_or(name);
        let family = self
            .0
            .encode_descriptor(base, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(family)
    }

    fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let base = name.strip_suffix("_total").unwrap_or(name);
        let mut family = self
            .0
            .encode_descriptor(base, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, labels: Labels, v: u64) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        if labels.is_empty() {
            // An empty label set would be written as `{}`.
            return ConstGauge::new(v).encode(family);
        }
        ConstGauge::new(v).encode(family.encode_family(&labels)?)
    }

    /// A histogram from cumulative bucket counts (the writer keeps them so).
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        cumulative: &[u64],
        count: u64,
        sum_ns: u64,
    ) -> std::fmt::Result {
        // The encoder sums per-bucket counts itself; f64::MAX is its +Inf.
        let mut buckets = Vec::with_capacity(cumulative.len() + 1);
        let mut below = 0;
        for (bound, n) in WRITE_LATENCY_BOUNDS_US.iter().zip(cumulative) {
            buckets.push((*bound as f64 / 1e6, n.saturating_sub(below)));
            below = (*n).max(below);
        }
        buckets.push((f64::MAX, count.saturating_sub(below)));
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        family.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let mut out = Families(&mut encoder);
        out.gauge(
            "recorder_build_info",
            "Version of the running recorder.",
            labels([("version", env!("CARGO_PKG_VERSION").to_string())]),
            1,
        )?;
        out.gauge(
            "recorder_uptime_seconds",
            "Seconds since the daemon started.",
            Vec::new(),
            s.uptime_secs,
        )?;
        out.gauge(
            "recorder_sessions_active",
            "Recording sessions in progress.",
            Vec::new(),
            s.sessions_active,
        )?;
        out.counter(
            "recorder_sessions_started_total",
            "Recording sessions started.",
            s.siprec.sessions_started,
        )?;
        out.counters(
            "recorder_sessions_ended_total",
            "Recording sessions ended, by reason.",
            s.siprec
                .sessions_ended
                .iter()
                .map(|(reason, n)| (labels([("reason", reason.to_string())]), *n)),
        )?;
        out.counters(
            "recorder_sessions_rejected_total",
            "Recording requests refused, by status code and cause.",
            s.siprec.rejections.iter().map(|((code, cause), n)| {
                (
                    labels([("code", code.to_string()), ("cause", cause.to_string())]),
                    *n,
                )
            }),
        )?;

        out.counter(
            "recorder_xdp_frames_seen_total",
            "Frames the XDP program ran on.",
            s.xdp("seen"),
        )?;
        out.counter(
            "recorder_xdp_packets_matched_total",
            "UDP packets to a recorded port.",
            s.xdp("matched"),
        )?;
        out.counter(
            "recorder_xdp_packets_captured_total",
            "Packets copied into a ring buffer.",
            s.xdp("captured"),
        )?;
        out.counter(
            "recorder_xdp_packets_truncated_total",
            "Captured packets cut to the snap length.",
            s.xdp("truncated"),
        )?;
        let by_reason = |reasons: &[&str]| {
            reasons
                .iter()
                .map(|r| (labels([("reason", r.to_string())]), s.xdp(r)))
                .collect::<Vec<_>>()
        };
        out.counters(
            "recorder_xdp_packets_dropped_total",
            "Packets of a recorded flow the kernel could not capture, by reason.",
            by_reason(&["ring_full", "copy_failed"]),
        )?;
        out.counters(
            "recorder_xdp_frames_ignored_total",
            "Frames not captured by design, by reason.",
            by_reason(&[
                "wrong_source",
                "parse_failed",
                "fragment_skipped",
                "not_udp",
            ]),
        )?;

        out.gauge(
            "recorder_ring_backlog_records",
            "Records captured by the kernel and not yet consumed (ring buffer fill).",
            Vec::new(),
            s.ring_backlog(),
        )?;
        out.counter(
            "recorder_ring_records_consumed_total",
            "Records taken from the ring buffers and handed to the writer.",
            s.writer.packets_in,
        )?;
        out.counter(
            "recorder_ring_consumer_stalls_total",
            "Times the writer had no room and records waited in the rings (back-pressure).",
            s.stalls.0,
        )?;
        out.counter(
            "recorder_ring_consumer_stalled_microseconds_total",
            "Time the ring consumer waited for the writer.",
            s.stalls.1,
        )?;
        out.gauge(
            "recorder_ring_consumer_longest_stall_microseconds",
            "Longest wait for the writer since start (size ring_bytes to cover it).",
            Vec::new(),
            s.stalls.2,
        )?;
        out.gauge(
            "recorder_writer_queue_packets",
            "Packets waiting in the queues to the writer's shards.",
            Vec::new(),
            s.writer.queued_packets,
        )?;
        out.gauge(
            "recorder_index_queue_jobs",
            "Rows, links and removals waiting for the index thread.",
            Vec::new(),
            s.writer.index_queued,
        )?;
        out.gauge(
            "recorder_writer_ended_awaiting_link",
            "Ended recordings waiting for their index link (the CallUUID lookup) before they finish.",
            Vec::new(),
            s.writer.ended_awaiting_link,
        )?;
        out.counters(
            "recorder_writer_packets_dropped_total",
            "Packets the writer could not store, by reason (wav_write_failed: WAV chunks of up to 1 s).",
            [
                ("pcap_write_failed", s.writer.pcap_write_failed),
                ("wav_write_failed", s.writer.wav_write_failed),
                ("unknown_flow", s.writer.unknown_flow),
            ]
            .map(|(r, n)| (labels([("reason", r.to_string())]), n)),
        )?;
        out.counter(
            "recorder_panics_total",
            "Panics contained to the one message, event or packet they happened on (each is a bug; the other calls went on).",
            crate::contain::panics(),
        )?;
        out.counter(
            "recorder_srtp_auth_failures_total",
            "SRTP and SRTCP packets that failed authentication (kept in the pcap, never decoded).",
            s.writer.srtp_auth_failed,
        )?;
        out.counters(
            "recorder_writer_errors_total",
            "Writer operations that failed, by kind (recording not created or not resumed, index update, metadata.json replacement, event for an unknown recording).",
            [
                ("start_failed", s.writer.start_failed),
                ("index", s.writer.index_errors),
                ("metadata_write", s.writer.metadata_write_failed),
                ("unknown_recording_event", s.writer.unknown_recording_events),
            ]
            .map(|(r, n)| (labels([("kind", r.to_string())]), n)),
        )?;

        out.counters(
            "recorder_sip_requests_total",
            "SIP requests received, by method (retransmissions included).",
            s.sip
                .requests
                .iter()
                .map(|(m, n)| (labels([("method", m.clone())]), *n)),
        )?;
        out.counters(
            "recorder_sip_responses_sent_total",
            "SIP responses sent, by status code.",
            s.sip
                .responses_sent
                .iter()
                .map(|(c, n)| (labels([("code", c.to_string())]), *n)),
        )?;
        out.counters(
            "recorder_sip_responses_received_total",
            "SIP responses received to the recorder's requests, by status code.",
            s.sip
                .responses_received
                .iter()
                .map(|(c, n)| (labels([("code", c.to_string())]), *n)),
        )?;

        out.counters(
            "recorder_sip_rejected_total",
            "SIP messages the endpoint rejected or dropped by itself, by category.",
            s.sip
                .rejections
                .iter()
                .map(|(c, n)| (labels([("category", c.to_string())]), *n)),
        )?;
        let t = &s.transport;
        out.counters(
            "recorder_sip_admitted_total",
            "SIP messages queued for the driver, by queue (priority: live dialogs and transactions).",
            [
                ("priority", t.priority),
                ("new_invite", t.new_invites),
                ("other", t.other),
            ]
            .map(|(q, n)| (labels([("queue", q.to_string())]), n)),
        )?;
        out.counters(
            "recorder_sip_shed_total",
            "New SIP requests turned away because the driver's queue was full: answered 503 at once, or dropped (nothing to answer).",
            [("503", t.invites_shed), ("dropped", t.dropped)]
                .map(|(a, n)| (labels([("action", a.to_string())]), n)),
        )?;
        out.gauge(
            "recorder_sip_queue_depth",
            "New SIP requests waiting for the driver.",
            Vec::new(),
            t.queue_depth,
        )?;
        out.gauge(
            "recorder_sip_queue_peak",
            "The deepest the driver's new-request queue has been.",
            Vec::new(),
            t.queue_peak,
        )?;
        out.gauge(
            "recorder_sip_stream_connections",
            "Inbound SIP TCP and TLS connections open.",
            Vec::new(),
            t.connections_open,
        )?;
        out.counter(
            "recorder_sip_stream_connections_refused_total",
            "Inbound SIP stream connections closed on accept (over the limit).",
            t.connections_refused,
        )?;
        out.counter(
            "recorder_sip_framing_errors_total",
            "SIP stream connections closed because their bytes could not be framed.",
            t.framing_errors,
        )?;
        out.counter(
            "recorder_sip_write_queue_full_total",
            "SIP messages to stream peers dropped because the peer does not read.",
            t.write_queue_full,
        )?;
        let a = &s.api;
        out.counters(
            "recorder_api_refused_total",
            "Control socket and HTTP requests or connections refused by a limit, by interface and limit.",
            [
                ("control", "connections", a.control_refused),
                ("control", "line_length", a.control_line_too_long),
                ("control", "timeout", a.control_timeouts),
                ("http", "connections", a.http_connections_refused),
                ("http", "in_flight", a.http_overloaded),
                ("http", "timeout", a.http_timeouts),
            ]
            .map(|(i, l, n)| {
                (
                    labels([("interface", i.to_string()), ("limit", l.to_string())]),
                    n,
                )
            }),
        )?;

        out.counter(
            "recorder_disk_bytes_written_total",
            "Bytes written to recording files (pcap records and WAV samples).",
            s.writer.bytes_written,
        )?;
        out.histogram(
            "recorder_write_latency_seconds",
            "Time to store one packet in its recording's files.",
            &s.writer.write_latency.buckets,
            s.writer.write_latency.count,
            s.writer.write_latency.sum_ns,
        )
    }
}

/// Label value escaping of the text format: backslash, double quote, line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
            if line.starts_with("# HELP ") || line == "# EOF" {
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
        s.sip.rejections.insert("malformed", 9);
        s.transport.invites_shed = 11;
        s.api.control_line_too_long = 2;
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
        assert_eq!(
            m["recorder_sip_rejected_total{category=\"malformed\"}"],
            9.0
        );
        assert_eq!(m["recorder_sip_shed_total{action=\"503\"}"], 11.0);
        assert_eq!(
            m["recorder_api_refused_total{interface=\"control\",limit=\"line_length\"}"],
            2.0
        );
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
}
