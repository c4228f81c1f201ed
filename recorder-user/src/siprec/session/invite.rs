//! The INVITE answer path: a new recording session is checked, offered ports, pinned and answered.

use super::*;

impl<F: FlowControl> Recorder<F> {
    #[expect(
        clippy::too_many_arguments,
        reason = "the request's context, all needed"
    )]
    pub(super) fn new_session(
        &mut self,
        now: Instant,
        wall: SystemTime,
        txn: &TxnId,
        dialog: Option<&DialogId>,
        key: SessionKey,
        request: &Request,
        source: SocketAddr,
    ) -> Result<Option<Reply>, Reject> {
        if !acl_allows(&self.config.acl, source.ip()) {
            return Err(Reject::new(403, "Forbidden", "acl"));
        }
        let require = header_tokens(&request.headers, "Require");
        let unsupported: Vec<&String> = require
            .iter()
            .filter(|t| !SUPPORTED_TAGS.iter().any(|s| t.eq_ignore_ascii_case(s)))
            .collect();
        if !unsupported.is_empty() {
            let list = unsupported
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(
                Reject::new(420, "Bad Extension", "bad_extension").header("Unsupported", list)
            );
        }
        let require_siprec = require.iter().any(|t| t.eq_ignore_ascii_case("siprec"));
        let src_feature = has_src_feature(request);
        if self.config.require_siprec_tag && !(require_siprec && src_feature) {
            let what = if require_siprec {
                "Contact must have the +sip.src feature tag"
            } else {
                "Require header must have the siprec option tag"
            };
            return Err(policy_reject(request, what, "missing_siprec_tag"));
        }
        if require_siprec && !src_feature {
            // RFC 7866 wants +sip.src too; some clients omit it. Record anyway.
            warn!(call_id = %key.call_id, "Require: siprec without +sip.src Contact tag; accepting");
        }
        self.admission(now, false)?;
        let timer = self.session_timer(request)?;
        let body = parse_body(request)?;
        let Some(sdp) = body.sdp else {
            return Err(Reject::new(
                488,
                "Not Acceptable Here: no SDP offer",
                "no_sdp",
            ));
        };
        let offer =
            parse_offer(&sdp).map_err(|e| Reject::new(400, format!("Bad SDP: {e}"), "bad_sdp"))?;
        if self.config.require_metadata && body.metadata.is_none() {
            return Err(policy_reject(
                request,
                "INVITE must have a recording metadata part",
                "missing_metadata",
            ));
        }
        self.check_labels(request, &offer)?;
        let metadata = match &body.metadata {
            Some(xml) => {
                let doc = parse_metadata_body(xml)?;
                let mut state = MetadataState::default();
                state.apply(doc, wall);
                Some(state)
            }
            None => None,
        };
        if !offer.streams.iter().any(|s| usable_codec(s).is_some()) {
            return Err(Reject::new(
                488,
                "Not Acceptable Here: no usable media stream",
                "no_usable_stream",
            ));
        }

        // Validated: take ports and pin flows.
        let mut slots: Vec<Slot> = Vec::with_capacity(offer.streams.len());
        for stream in &offer.streams {
            let slot = match usable_codec(stream) {
                Some(codec) => match self.open_stream(now, stream, codec) {
                    Ok(mut info) => {
                        // Inactive-first: the flow is pinned, the answer says inactive.
                        info.paused |= self.config.answer_inactive;
                        Some(info)
                    }
                    Err(reject) => {
                        for info in slots.into_iter().flatten() {
                            self.close_stream(now, &info, false);
                        }
                        return Err(reject);
                    }
                },
                None => None,
            };
            slots.push(slot);
        }

        let id = recording_id();
        let sdp_session_id = u64::from(rand::random::<u32>());
        let answers = answers_for(&offer, &slots, &[]);
        let answer = build_answer(
            &offer,
            &answers,
            self.config.media_address,
            sdp_session_id,
            1,
        );
        let mut reply = Reply::new(200, "OK")
            .header("Contact", self.contact(request))
            .header("Allow", ALLOW)
            .header("Supported", "timer");
        let mut required = Vec::new();
        if require_siprec {
            required.push("siprec");
        }
        if let Some(timer) = &timer {
            reply = reply.header("Session-Expires", timer.header_value());
            if timer.uac_supports {
                required.push("timer");
            }
        }
        if !required.is_empty() {
            reply = reply.header("Require", required.join(", "));
        }
        reply.body = Some(("application/sdp".to_string(), answer.into_bytes()));

        let mut call_ids = call_ids(request, metadata.as_ref(), &self.config.uuid_headers);
        if let Some(gci) = body.gci {
            // Cisco's global call id from the GTD part: worth keeping for correlation.
            call_ids.extra.push(("gci".to_string(), gci));
        }
        let participants = metadata
            .as_ref()
            .map(|m| m.participants())
            .unwrap_or_default();
        let metadata_version = body.metadata.map(|xml| MetadataVersion {
            version: 1,
            received_at: wall,
            method: "INVITE".to_string(),
            xml,
        });
        let delayed = !self.config.answer_delay.is_zero();
        let (phase, immediate) = if delayed {
            let pending = Phase::Pending {
                txn: *txn,
                answer_at: now + self.config.answer_delay,
                reply,
            };
            (pending, None)
        } else {
            (Phase::Answered, Some(reply))
        };
        let session = Session {
            id: id.clone(),
            key: key.clone(),
            dialog: dialog.cloned(),
            phase,
            slots,
            offer,
            answers,
            sdp_session_id,
            sdp_version: 1,
            metadata,
            metadata_version: u32::from(metadata_version.is_some()),
            call_ids: call_ids.clone(),
            participants: participants.clone(),
            require_siprec,
            started_at: wall,
            refresh_deadline: timer.as_ref().and_then(|t| t.deadline(now)),
            session_expires: timer.map(|t| t.interval),
            last_activity: now,
            last_activity_wall: wall,
            packets_seen: 0,
            next_idle_check: now + self.config.idle_timeout / 4,
            snapshot_asked: Vec::new(),
            snapshot_due: None,
            armed_at: None,
        };
        let streams = session.streams();
        info!(id = %id, call_id = %key.call_id, streams = streams.len(), "recording session started");
        self.sessions.insert(key.clone(), session);
        self.check_metadata_refs(&key);
        self.counters.sessions_started += 1;
        (self.events)(SessionEvent::Started {
            id,
            at: wall,
            ids: call_ids,
            streams,
            participants,
            metadata: metadata_version,
        });
        Ok(immediate)
    }

    /// Takes ports for an offered stream and pins its flows.
    pub(super) fn open_stream(
        &mut self,
        now: Instant,
        stream: &OfferStream,
        codec: Codec,
    ) -> Result<StreamInfo, Reject> {
        let need_rtcp = !stream.rtcp_mux;
        let port = self
            .spare_ports
            .pop()
            .or_else(|| self.ports.allocate(now, need_rtcp));
        let Some(port) = port else {
            return Err(Reject::new(503, "Media ports exhausted", "ports_exhausted")
                .header("Retry-After", self.config.retry_after.to_string()));
        };
        let remote = stream_remote(stream);
        let mut info = StreamInfo {
            index: stream.index,
            label: stream_label(stream),
            media: stream.media.clone(),
            flow_id: 0,
            rtcp_flow_id: None,
            local_port: port,
            rtcp_port: need_rtcp.then(|| port + 1),
            remote,
            rtcp_remote: rtcp_remote(stream),
            codec,
            telephone_event_pt: stream.telephone_event.as_ref().map(|c| c.payload_type),
            paused: stream_paused(stream),
            srtp: !stream.crypto.is_empty(),
            sdes: stream
                .is_srtp()
                .then(|| crate::media::sdes::choose(&stream.crypto))
                .flatten(),
        };
        let rtp_spec = self.spec(port, remote);
        info.flow_id = rtp_spec.flow_id;
        if let Err(e) = self.flows.insert(rtp_spec) {
            self.give_back(now, port, false);
            warn!(error = %e, port, "pinning RTP flow failed");
            return Err(Reject::new(500, "Flow table error", "flow_error"));
        }
        if let Some(rtcp_port) = info.rtcp_port {
            let spec = self.spec(rtcp_port, rtcp_remote(stream));
            if let Err(e) = self.flows.insert(spec) {
                let _ = self.flows.remove(rtp_spec.local);
                self.give_back(now, port, false);
                warn!(error = %e, port = rtcp_port, "pinning RTCP flow failed");
                return Err(Reject::new(500, "Flow table error", "flow_error"));
            }
            info.rtcp_flow_id = Some(spec.flow_id);
        }
        Ok(info)
    }

    /// Unpins a stream's flows and gives its ports back.
    pub(super) fn close_stream(&mut self, now: Instant, info: &StreamInfo, advertised: bool) {
        let ip = self.config.media_address;
        for port in std::iter::once(info.local_port).chain(info.rtcp_port) {
            if let Err(e) = self.flows.remove(SocketAddr::new(ip, port)) {
                warn!(error = %e, port, "unpinning flow failed");
            }
        }
        self.give_back(now, info.local_port, advertised);
    }

    /// An advertised port cools down before reuse (late packets must not reach another call);
    /// one no client ever saw in an answer can be reused at once, so it is kept aside here.
    pub(super) fn give_back(&mut self, now: Instant, port: u16, advertised: bool) {
        if advertised {
            self.ports.release(now, port);
        } else {
            self.spare_ports.push(port);
        }
    }

    /// A flow spec with a fresh flow id.
    pub(super) fn spec(&mut self, port: u16, remote: Option<SocketAddr>) -> FlowSpec {
        let flow_id = self.next_flow_id;
        self.next_flow_id += 1;
        FlowSpec {
            flow_id,
            local: SocketAddr::new(self.config.media_address, port),
            remote: if self.config.pin_source { remote } else { None },
            action: self.config.flow_action,
        }
    }

    /// With `require_label`: every live m-line (port not 0) must carry `a=label`, the join key
    /// with the metadata's streams.
    pub(super) fn check_labels(&self, request: &Request, offer: &Offer) -> Result<(), Reject> {
        if !self.config.require_label {
            return Ok(());
        }
        match offer
            .streams
            .iter()
            .find(|s| s.port != 0 && s.label.is_none())
        {
            Some(_) => Err(policy_reject(
                request,
                "SDP must have label media attribute",
                "missing_label",
            )),
            None => Ok(()),
        }
    }

    /// Our Contact: the address the client reached us at, tagged as an SRS (RFC 7866 §6.2).
    pub(super) fn contact(&self, request: &Request) -> String {
        let uri = &request.uri;
        let host = uri.host_with_port.to_string();
        let transport = uri.params.iter().find_map(|p| match p {
            rsip::Param::Transport(t) => Some(t.to_string().to_ascii_lowercase()),
            _ => None,
        });
        match transport {
            Some(t) => format!("<sip:srs@{host};transport={t}>;+sip.srs"),
            None => format!("<sip:srs@{host}>;+sip.srs"),
        }
    }

    /// The session timer a request asks for (RFC 4028), or a 422/400.
    pub(super) fn session_timer(&self, request: &Request) -> Result<Option<SessionTimer>, Reject> {
        let Some(value) = header_value(&request.headers, "Session-Expires") else {
            return Ok(None);
        };
        let mut parts = value.split(';');
        let seconds: u32 = parts
            .next()
            .unwrap_or("")
            .trim()
            .parse()
            .map_err(|_| Reject::new(400, "Malformed Session-Expires", "bad_request"))?;
        if seconds < self.config.min_session_expires {
            return Err(Reject::new(
                422,
                "Session Interval Too Small",
                "session_interval_too_small",
            )
            .header("Min-SE", self.config.min_session_expires.to_string()));
        }
        let refresher = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("refresher"))
            .map(|(_, v)| v.trim().to_ascii_lowercase());
        let uac_supports = header_tokens(&request.headers, "Supported")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("timer"));
        Ok(Some(SessionTimer {
            interval: Duration::from_secs(u64::from(seconds)),
            refresher_uas: refresher.as_deref() == Some("uas"),
            uac_supports,
        }))
    }
}
