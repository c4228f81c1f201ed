//! The recorder: a SIPREC Session Recording Server (RFC 7866) whose media is captured by an XDP
//! program into BPF ring buffers.
//!
//! # Layout
//! Data flows one way, each layer depending only on the ones before it:
//!
//! * [`sip`]: sans-IO SIP transactions and dialogs (bytes + `now` in, datagrams + events out).
//! * [`transport`]: UDP/TCP sockets and the one driver task that owns the SIP endpoint.
//! * [`siprec`]: recording sessions: multipart bodies, SDP offer/answer, RFC 7865 metadata;
//!   turns SIP events into flow-table operations and [`events::SessionEvent`]s.
//! * [`flow`]: the XDP flow map (`flow::maps` is the only code that writes it).
//! * [`capture`]: loads/attaches the XDP program and drains its ring buffers into a sink.
//! * [`writer`]: per-recording files (pcap, WAV, metadata.json) fed by captured packets + events.
//! * [`index`]: the SQLite index of recordings.
//! * [`control`]: the control API the CLI talks to.
//! * [`metrics`]: the Prometheus metrics (what a scrape shows).
//! * [`http`]: the HTTP API and `/metrics` (axum), with bearer tokens and the download audit.
//! * [`events`]: the typed events signaling emits.
pub mod accept;
pub mod capture;
pub mod cli;
pub mod config;
pub mod contain;
pub mod control;
pub mod daemon;
pub mod events;
pub mod flow;
#[doc(hidden)]
pub mod fuzz_api;
pub mod guard;
pub mod handover;
pub mod http;
pub mod index;
pub mod media;
pub mod metrics;
pub mod reload;
pub mod rtcp;
pub mod sip;
pub mod siprec;
pub mod transport;
pub mod writer;
