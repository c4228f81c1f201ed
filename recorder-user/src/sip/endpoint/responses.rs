//! Responses the endpoint builds: to a transaction's request (headers copied, our To-tag,
//! Contact and Record-Route), the 503 answered from raw bytes under overload, and the
//! capability headers for OPTIONS.

use super::*;

impl Endpoint {
    /// Builds a response to the request of `txn` for the app to add headers and a body to.
    ///
    /// Copies Via (the top one stamped with `received`/`rport`), From, To, Call-ID and CSeq;
    /// adds our To-tag when the request had none (the same tag for every response of the
    /// transaction, and the dialog's tag once its 2xx is sent); adds our Contact to 101-299
    /// responses to INVITE and 2xx to UPDATE, and copies Record-Route into 101-299 to INVITE.
    /// `None` when `txn` is unknown.
    pub fn make_response(
        &self,
        txn: &TxnId,
        status: u16,
        reason: Option<&str>,
    ) -> Option<rsip::Response> {
        let t = self.txns.get(txn)?;
        let answer = Answer {
            request: &t.request,
            facts: &t.facts,
            source: t.source,
            route: t.route,
            local_tag: t.local_tag.as_deref(),
        };
        Some(self.build_response(&answer, status, reason))
    }

    /// The 503 (with `Retry-After`) for a new request the driver has no room for, built
    /// from the raw bytes without touching any state ([`crate::sip::admission::raw_response`]): the
    /// transport answers a flood with it from its receive tasks, before the request reaches the
    /// endpoint, so it must cost far less than a parse. Sent back to the source address. `None`
    /// when `incoming` lacks the headers a response needs (dropped and counted instead).
    pub fn overload_answer(&self, incoming: &Incoming) -> Option<Transmit> {
        let extra = [
            format!("Retry-After: {}", self.config.retry_after_secs),
            format!("Server: {}", self.config.user_agent),
        ];
        let bytes =
            crate::sip::admission::raw_response(&incoming.bytes, 503, "Overloaded", &extra)?;
        Some(Transmit {
            transport: incoming.transport,
            destination: incoming.source,
            connection: incoming.connection,
            local: Some(incoming.local),
            bytes: Bytes::from(bytes),
        })
    }

    pub(super) fn build_response(
        &self,
        a: &Answer<'_>,
        status: u16,
        reason: Option<&str>,
    ) -> rsip::Response {
        let mut headers = rsip::Headers::default();
        let mut first = true;
        for h in a.request.headers.iter() {
            match h {
                Header::Via(v) if first => {
                    first = false;
                    headers.push(Header::Via(rsip::headers::Via::new(stamp_via(
                        v.value(),
                        &a.facts.via,
                        a.source,
                    ))));
                }
                Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => {
                    headers.push(h.clone())
                }
                Header::To(t) => {
                    let value = match (a.facts.to_tag.is_none(), a.local_tag, status > 100) {
                        (true, Some(tag), true) => format!("{};tag={tag}", t.value()),
                        _ => t.value().to_string(),
                    };
                    headers.push(Header::To(rsip::headers::To::new(value)));
                }
                _ => {}
            }
        }
        let invite = a.request.method == rsip::Method::Invite;
        if invite && (101..300).contains(&status) {
            for h in a.request.headers.iter() {
                if let Header::RecordRoute(_) = h {
                    headers.push(h.clone());
                }
            }
        }
        if (invite && (101..300).contains(&status))
            || (a.request.method == rsip::Method::Update && (200..300).contains(&status))
        {
            headers.push(Header::Contact(rsip::headers::Contact::new(
                self.contact_value(a.route.transport),
            )));
        }
        headers.push(Header::Server(rsip::headers::Server::new(
            self.config.user_agent.clone(),
        )));
        let status_code = match reason {
            Some(reason) => rsip::StatusCode::Other(status, sanitize_reason(reason)),
            None => rsip::StatusCode::from(status),
        };
        rsip::Response {
            status_code,
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }

    pub(super) fn contact_value(&self, transport: Transport) -> String {
        let (port, param) = match transport {
            Transport::Udp => (self.config.contact_port, ""),
            Transport::Tcp => (self.config.contact_port, ";transport=tcp"),
            Transport::Tls => (
                self.config
                    .contact_tls_port
                    .unwrap_or(self.config.contact_port),
                ";transport=tls",
            ),
        };
        let mut value = format!(
            "<sip:{}@{}:{}{}>",
            self.config.contact_user,
            bracket_v6(&self.config.contact_host),
            port,
            param
        );
        for p in &self.config.contact_params {
            value.push(';');
            value.push_str(p);
        }
        value
    }

    /// `Allow`, `Accept`, `Supported` and the configured extra OPTIONS headers, for an app
    /// that answers OPTIONS itself.
    pub fn capability_headers(&self) -> Vec<Header> {
        let mut extra = vec![
            Header::Allow(rsip::headers::Allow::new(self.config.allow.join(", "))),
            Header::Accept(rsip::headers::Accept::new(self.config.accept.join(", "))),
            Header::Supported(rsip::headers::Supported::new(
                self.config.supported.join(", "),
            )),
        ];
        for (name, value) in &self.config.options_headers {
            extra.push(Header::Other(name.clone(), value.clone()));
        }
        extra
    }
}
