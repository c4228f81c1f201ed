//! Endpoint configuration, the source ACL's network type, and the counters.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

/// Static configuration of the endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// User part of our Contact URI.
    pub contact_user: String,
    /// Host of our Contact URI and of the Via of requests we send (an address clients can reach).
    pub contact_host: String,
    pub contact_port: u16,
    /// Port of our Contact on TLS dialogs (the TLS listener's), when it differs.
    pub contact_tls_port: Option<u16>,
    /// Header parameters appended to our Contact (e.g. `+sip.srs`).
    pub contact_params: Vec<String>,
    /// Sent as `Server` in responses and `User-Agent` in requests.
    pub user_agent: String,
    /// Methods listed in `Allow`.
    pub allow: Vec<String>,
    /// Option tags listed in `Supported`; a `Require` outside this list gets 420.
    pub supported: Vec<String>,
    /// Body types listed in `Accept`.
    pub accept: Vec<String>,
    /// Extra headers for the 200 to OPTIONS.
    pub options_headers: Vec<(String, String)>,
    /// Hand out-of-dialog OPTIONS to the app instead of answering them here.
    pub app_handles_options: bool,
    /// Server transactions kept at most; beyond that new requests get 503.
    pub max_transactions: usize,
    /// `Retry-After` seconds in those 503s.
    pub retry_after_secs: u32,
    /// Networks allowed to open dialogs (new INVITEs); others get 403. Empty: everyone.
    pub allowed_networks: Vec<Network>,
    /// A request the app has not answered by then gets 500 from the endpoint (so a stuck app
    /// neither leaks transactions nor leaves clients waiting).
    pub app_answer_timeout: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        Self {
            contact_user: "srs".into(),
            contact_host: "127.0.0.1".into(),
            contact_port: 5060,
            contact_tls_port: None,
            contact_params: Vec::new(),
            user_agent: concat!("recorder/", env!("CARGO_PKG_VERSION")).into(),
            allow: list(&[
                "INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "UPDATE", "INFO",
            ]),
            supported: list(&["siprec", "timer"]),
            accept: list(&[
                "application/sdp",
                "application/rs-metadata+xml",
                "application/rs-metadata",
                "multipart/mixed",
            ]),
            options_headers: Vec::new(),
            app_handles_options: false,
            max_transactions: 10_000,
            retry_after_secs: 5,
            app_answer_timeout: 64 * super::T1,
            allowed_networks: Vec::new(),
        }
    }
}

/// An IP network (`10.1.0.0/16`, `2001:db8::/32`, or one address) for the source ACL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is inside (IPv4-mapped IPv6 sources match IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("bad network address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

/// Counters for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SipCounters {
    /// Requests received, by method (retransmissions included).
    pub requests: BTreeMap<String, u64>,
    /// Responses sent, by status (first transmissions only).
    pub responses_sent: BTreeMap<u16, u64>,
    /// Responses received to our requests, by status.
    pub responses_received: BTreeMap<u16, u64>,
    /// Stateless rejections and drops, by category (e.g. `malformed`, `unknown-dialog`).
    pub rejections: BTreeMap<&'static str, u64>,
    /// Retransmitted requests answered from their transaction (never given to the app).
    pub retransmissions_absorbed: u64,
    /// Timer-driven re-sends of our responses and requests.
    pub retransmissions_sent: u64,
    /// ACKs absorbed (all ACKs end here).
    pub acks: u64,
    /// 2xx responses never ACKed.
    pub ack_timeouts: u64,
    /// CRLF keep-alives received.
    pub keepalives: u64,
}

impl SipCounters {
    pub(crate) fn count_response(&mut self, status: u16) {
        *self.responses_sent.entry(status).or_default() += 1;
    }
}
