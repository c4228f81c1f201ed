//! Where our messages go (RFC 3261 §18.2.2, RFC 3581, §12.2.1.1) and how they are encoded.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use rsip::{
    headers::{ToTypedHeader, UntypedHeader},
    Header,
};

use super::{
    dialog::Dialog,
    endpoint::{Incoming, Transport},
    message,
    transaction::Route,
};

/// RFC 3261 §18.2.2 / RFC 3581: where a response goes.
pub(crate) fn response_route(incoming: &Incoming, via: &message::TopVia) -> Route {
    let destination = match incoming.transport {
        // Stream transports answer on the connection the request came on; `destination` is
        // only used if it has gone: the received address and the sent-by port (§18.2.2).
        Transport::Tcp | Transport::Tls if incoming.connection.is_some() => {
            let default = if incoming.transport == Transport::Tls {
                5061
            } else {
                5060
            };
            SocketAddr::new(incoming.source.ip(), via.port.unwrap_or(default))
        }
        Transport::Tcp | Transport::Tls => incoming.source,
        Transport::Udp if via.rport => incoming.source,
        Transport::Udp => SocketAddr::new(incoming.source.ip(), via.port.unwrap_or(5060)),
    };
    Route {
        transport: incoming.transport,
        destination,
        connection: incoming.connection,
        local: Some(incoming.local),
    }
}

/// Adds `received` (when the source differs from sent-by, or rport asks) and fills `rport`
/// in the first value of the top Via line.
pub(crate) fn stamp_via(value: &str, via: &message::TopVia, source: SocketAddr) -> String {
    let (first, rest) = match value.find(',') {
        Some(comma) => value.split_at(comma),
        None => (value, ""),
    };
    let mut parts: Vec<String> = first.split(';').map(|p| p.trim().to_string()).collect();
    let same_host = matches!(via.host, rsip::Host::IpAddr(ip) if ip == source.ip());
    let add_received = !same_host || via.rport;
    parts.retain(|p| !(add_received && p.to_ascii_lowercase().starts_with("received=")));
    for p in parts.iter_mut().skip(1) {
        if p.eq_ignore_ascii_case("rport") {
            *p = format!("rport={}", source.port());
        }
    }
    if add_received {
        parts.push(format!("received={}", source.ip()));
    }
    format!("{}{rest}", parts.join(";"))
}

/// Where our in-dialog requests go: the first Route, else the remote target, when they are IP
/// literals, else the address the dialog came from; on TCP also the dialog's connection.
pub(crate) fn in_dialog_route(d: &Dialog, target: &rsip::Uri) -> Route {
    // On TCP the dialog's connection is used while it lives; `destination` is where the
    // transport connects if it has gone (never the client's ephemeral source port).
    let first_route = d.route_set.first().and_then(|r| {
        let start = r.find('<')? + 1;
        let end = start + r[start..].find('>')?;
        rsip::Uri::try_from(&r[start..end]).ok()
    });
    let destination = first_route
        .as_ref()
        .and_then(uri_addr)
        .or_else(|| uri_addr(target))
        .unwrap_or(d.source);
    Route {
        destination,
        ..d.route
    }
}

pub(crate) fn uri_addr(uri: &rsip::Uri) -> Option<SocketAddr> {
    let ip = message::marker_ip(&uri.host_with_port.host)?;
    Some(SocketAddr::new(
        ip,
        uri.host_with_port.port.map_or(5060, |p| *p.value()),
    ))
}

pub(crate) fn uri_for(addr: SocketAddr) -> rsip::Uri {
    rsip::Uri {
        scheme: Some(rsip::Scheme::Sip),
        host_with_port: addr.into(),
        ..Default::default()
    }
}

pub(crate) fn bracket_v6(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_string(),
    }
}

pub(crate) fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A reason phrase must stay on the status line.
pub(crate) fn sanitize_reason(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(crate) fn ensure_to_tag(response: &mut rsip::Response, tag: &str) {
    for h in response.headers.iter_mut() {
        if let Header::To(to) = h {
            let has_tag = to
                .typed()
                .map(|t| message::tag_param(&t.params).is_some())
                .unwrap_or(true);
            if !has_tag {
                *to = rsip::headers::To::new(format!("{};tag={tag}", to.value()));
            }
            return;
        }
    }
}

/// Encodes with a correct Content-Length and the body bytes as they are (rsip's `Display`
/// would pass the body through a lossy UTF-8 conversion).
pub(crate) fn encode_response(response: &mut rsip::Response) -> Bytes {
    response
        .headers
        .retain(|h| !matches!(h, Header::ContentLength(_)));
    response
        .headers
        .push(Header::ContentLength(rsip::headers::ContentLength::new(
            response.body.len().to_string(),
        )));
    let head = format!(
        "{} {}\r\n{}\r\n",
        response.version, response.status_code, response.headers
    );
    let mut out = message::restore_ipv6(&head).into_owned().into_bytes();
    out.extend_from_slice(&response.body);
    Bytes::from(out)
}
