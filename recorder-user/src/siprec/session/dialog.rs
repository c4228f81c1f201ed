//! In-dialog requests: re-INVITE and UPDATE offers, metadata updates, snapshot requests, BYE,
//! and ending sessions.

use super::*;

impl<F: FlowControl> Recorder<F> {
    pub(super) fn in_dialog(
        &mut self,
        now: Instant,
        wall: SystemTime,
        dialog: Option<&DialogId>,
        key: &SessionKey,
        request: &Request,
    ) -> Result<Option<Reply>, Reject> {
        if let Some(session) = self.sessions.get_mut(key) {
            session.last_activity = now;
            session.last_activity_wall = wall;
            if session.dialog.is_none() {
                session.dialog = dialog.cloned();
            }
        }
        match &request.method {
            Method::Invite | Method::Update => self.renegotiate(now, wall, key, request).map(Some),
            Method::Bye => {
                let body = parse_body(request).unwrap_or_default();
                if let Some(xml) = body.metadata {
                    // Final metadata: a bad body must not keep the session alive.
                    match parse_metadata_body(&xml) {
                        Ok(doc) => self.apply_metadata(wall, key, request, doc, xml),
                        Err(e) => warn!(reason = %e.reason, "ignoring bad metadata in BYE"),
                    }
                }
                let reason = header_value(&request.headers, "Reason");
                self.end_session(now, key, EndReason::Bye { reason }, false);
                Ok(Some(Reply::new(200, "OK")))
            }
            Method::Options => Ok(Some(options_reply())),
            Method::Info | Method::Notify | Method::Message => Ok(Some(Reply::new(200, "OK"))),
            Method::Refer => {
                Err(Reject::new(405, "Method Not Allowed", "method_not_allowed")
                    .header("Allow", ALLOW))
            }
            // The transaction layer answers CANCEL; PRACK is harmless.
            Method::Cancel | Method::PRack => Ok(Some(Reply::new(200, "OK"))),
            _ => {
                Err(Reject::new(405, "Method Not Allowed", "method_not_allowed")
                    .header("Allow", ALLOW))
            }
        }
    }

    /// re-INVITE or UPDATE: new offer and/or metadata; refreshes the session timer.
    pub(super) fn renegotiate(
        &mut self,
        now: Instant,
        wall: SystemTime,
        key: &SessionKey,
        request: &Request,
    ) -> Result<Reply, Reject> {
        let is_invite = request.method == Method::Invite;
        if self
            .sessions
            .get(key)
            .is_some_and(|s| matches!(s.phase, Phase::Pending { .. }))
        {
            return Err(Reject::new(491, "Request Pending", "request_pending"));
        }
        let timer = self.session_timer(request)?;
        let body = parse_body(request)?;
        let offer = match &body.sdp {
            Some(sdp) => Some(
                parse_offer(sdp)
                    .map_err(|e| Reject::new(400, format!("Bad SDP: {e}"), "bad_sdp"))?,
            ),
            None => None,
        };
        if let Some(offer) = &offer {
            self.check_labels(request, offer)?;
        }
        let metadata = match body.metadata {
            Some(xml) => Some((parse_metadata_body(&xml)?, xml)),
            None => None,
        };

        // Validated: apply.
        if let Some(offer) = offer {
            self.apply_offer(now, wall, key, offer);
        }
        if let Some((doc, xml)) = metadata {
            self.apply_metadata(wall, key, request, doc, xml);
            self.check_metadata_refs(key);
        }
        let contact = self.contact(request);
        let Some(session) = self.sessions.get_mut(key) else {
            return Err(Reject::new(
                481,
                "Call/Transaction Does Not Exist",
                "unknown_dialog",
            ));
        };
        if let Some(t) = &timer {
            session.session_expires = Some(t.interval);
        }
        session.refresh_deadline = match &timer {
            Some(t) => t.deadline(now),
            None => session.session_expires.map(|se| now + se),
        };
        let mut required = Vec::new();
        // Our Contact (with +sip.srs) goes in every 2xx that refreshes the target.
        let mut reply = Reply::new(200, "OK").header("Contact", contact);
        if is_invite {
            reply = reply.header("Allow", ALLOW).header("Supported", "timer");
            if session.require_siprec {
                required.push("siprec");
            }
        }
        if let Some(t) = &timer {
            reply = reply.header("Session-Expires", t.header_value());
            if t.uac_supports {
                required.push("timer");
            }
        }
        if !required.is_empty() {
            reply = reply.header("Require", required.join(", "));
        }
        // An answer to a new offer, or (offer-less re-INVITE) our current SDP again.
        if body.sdp.is_some() || is_invite {
            session.sdp_version += 1;
            let sdp = build_answer(
                &session.offer,
                &session.answers,
                self.config.media_address,
                session.sdp_session_id,
                session.sdp_version,
            );
            reply.body = Some(("application/sdp".to_string(), sdp.into_bytes()));
        }
        Ok(reply)
    }

    /// Diffs a new offer against the session's streams, m-line by m-line, and moves the flow
    /// table to match. Our local ports stay the same for streams that continue.
    pub(super) fn apply_offer(
        &mut self,
        now: Instant,
        wall: SystemTime,
        key: &SessionKey,
        offer: Offer,
    ) {
        let Some(mut session) = self.sessions.remove(key) else {
            return;
        };
        let mut changed = false;
        let mut toggles = Vec::new();
        let count = offer.streams.len().max(session.slots.len());
        session.slots.resize(count, None);
        for (index, slot) in session.slots.iter_mut().enumerate() {
            let stream = offer.streams.get(index);
            let codec = stream.and_then(usable_codec);
            match (slot.take(), stream, codec) {
                (Some(mut info), Some(stream), Some(codec)) => {
                    let remote = stream_remote(stream);
                    let te = stream.telephone_event.as_ref().map(|c| c.payload_type);
                    let rtcp_to = rtcp_remote(stream);
                    if info.remote != remote
                        || info.codec != codec
                        || info.telephone_event_pt != te
                        || info.rtcp_remote != rtcp_to
                    {
                        info.remote = remote;
                        info.rtcp_remote = rtcp_to;
                        info.codec = codec;
                        info.telephone_event_pt = te;
                        // Same local key; the generation bump tells the data path it changed.
                        self.rewrite_flow(info.local_port, info.flow_id, remote);
                        if let (Some(port), Some(id)) = (info.rtcp_port, info.rtcp_flow_id) {
                            self.rewrite_flow(port, id, rtcp_remote(stream));
                        }
                        changed = true;
                    }
                    let label = stream_label(stream);
                    if label != info.label {
                        info.label = label;
                        changed = true;
                    }
                    let paused = stream_paused(stream);
                    if paused != info.paused {
                        info.paused = paused;
                        toggles.push((info.label.clone(), paused));
                        changed = true;
                    }
                    // A new SDES key (a transfer to a new leg): the writer decrypts with it
                    // from now on, and with the old one what is still in flight.
                    let sdes = stream
                        .is_srtp()
                        .then(|| crate::media::sdes::choose(&stream.crypto))
                        .flatten();
                    if sdes != info.sdes {
                        info.srtp = !stream.crypto.is_empty();
                        info.sdes = sdes;
                        changed = true;
                    }
                    *slot = Some(info);
                }
                (Some(info), _, _) => {
                    // Port 0 (or nothing usable left): the stream is gone.
                    self.close_stream(now, &info, true);
                    changed = true;
                }
                (None, Some(stream), Some(codec)) => match self.open_stream(now, stream, codec) {
                    Ok(info) => {
                        *slot = Some(info);
                        changed = true;
                    }
                    // Out of ports mid-call: refuse this stream only, keep the session.
                    Err(e) => {
                        warn!(id = %session.id, index, reason = %e.reason, "cannot add stream")
                    }
                },
                (None, _, _) => {}
            }
        }
        // m-lines never disappear (RFC 3264 §8); tolerate it, the slots are empty by now.
        session.slots.truncate(offer.streams.len());
        session.answers = answers_for(&offer, &session.slots, &session.answers);
        session.offer = offer;
        let id = session.id.clone();
        let streams = session.streams();
        self.sessions.insert(key.clone(), session);
        for (label, paused) in toggles {
            let event = if paused {
                SessionEvent::Paused {
                    id: id.clone(),
                    at: wall,
                    label,
                }
            } else {
                SessionEvent::Resumed {
                    id: id.clone(),
                    at: wall,
                    label,
                }
            };
            (self.events)(event);
        }
        if changed {
            (self.events)(SessionEvent::MediaChanged {
                id,
                at: wall,
                streams,
            });
        }
    }

    /// Re-pins a flow at the same local port with a new expected source.
    pub(super) fn rewrite_flow(&mut self, port: u16, flow_id: u64, remote: Option<SocketAddr>) {
        let local = SocketAddr::new(self.config.media_address, port);
        let spec = FlowSpec {
            flow_id,
            local,
            remote: if self.config.pin_source { remote } else { None },
            action: self.config.flow_action,
        };
        if let Err(e) = self.flows.rewrite(local, spec) {
            warn!(error = %e, port, "rewriting flow failed; pinning afresh");
            if let Err(e) = self.flows.insert(spec) {
                warn!(error = %e, port, "pinning flow failed");
            }
        }
    }

    /// Merges metadata into the session (partial merges, complete replaces) and reports the
    /// participants it now has.
    pub(super) fn apply_metadata(
        &mut self,
        wall: SystemTime,
        key: &SessionKey,
        request: &Request,
        doc: MetadataDoc,
        xml: String,
    ) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let state = session.metadata.get_or_insert_with(MetadataState::default);
        state.apply(doc, wall);
        session.participants = state.participants();
        let fresh = call_ids(request, Some(state), &self.config.uuid_headers);
        merge_call_ids(&mut session.call_ids, fresh);
        session.metadata_version += 1;
        let event = SessionEvent::ParticipantsChanged {
            id: session.id.clone(),
            at: wall,
            participants: session.participants.clone(),
            metadata: Some(MetadataVersion {
                version: session.metadata_version,
                received_at: wall,
                method: request.method.to_string(),
                xml,
            }),
            ids: session.call_ids.clone(),
        };
        (self.events)(event);
    }

    /// Schedules a metadata snapshot request when the session's metadata references ids it
    /// never described (a missed partial update): once per inconsistency, i.e. only when an
    /// unresolved id was not asked about yet.
    pub(super) fn check_metadata_refs(&mut self, key: &SessionKey) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let unresolved = session
            .metadata
            .as_ref()
            .map(MetadataState::unresolved_refs)
            .unwrap_or_default();
        if unresolved.is_empty() {
            session.snapshot_asked.clear();
            return;
        }
        if unresolved
            .iter()
            .all(|id| session.snapshot_asked.contains(id))
        {
            return;
        }
        for id in &unresolved {
            if !session.snapshot_asked.contains(id) {
                session.snapshot_asked.push(id.clone());
            }
        }
        let reason = format!(
            "metadata references undescribed ids: {}",
            unresolved.join(", ")
        );
        info!(id = %session.id, %reason, "requesting a metadata snapshot");
        session.snapshot_due = Some(reason);
        self.snapshots_due.push(key.clone());
    }

    /// Queues the due snapshot requests of confirmed dialogs (an initial INVITE's request
    /// waits for its ACK).
    pub(super) fn queue_snapshot_requests(&mut self) {
        if self.snapshots_due.is_empty() {
            return;
        }
        let sessions = &mut self.sessions;
        let outbox = &mut self.outbox;
        // Kept: sessions still waiting for their ACK. Dropped: sent, or the session is gone.
        self.snapshots_due.retain(|key| {
            let Some(session) = sessions.get_mut(key) else {
                return false;
            };
            let (Phase::Confirmed, Some(dialog)) = (&session.phase, &session.dialog) else {
                return session.snapshot_due.is_some();
            };
            if let Some(reason) = session.snapshot_due.take() {
                outbox.snapshot_requests.push((
                    dialog.clone(),
                    snapshot_request_xml(&reason),
                    false,
                ));
            }
            false
        });
    }

    /// Ends a session: flows removed, ports released, `Ended` emitted, BYE queued if asked.
    pub(super) fn end_session(
        &mut self,
        now: Instant,
        key: &SessionKey,
        reason: EndReason,
        send_bye: bool,
    ) {
        let Some(session) = self.sessions.remove(key) else {
            return;
        };
        // Before the flows go: their kernel counters go with them.
        let ring_drops: Vec<(u64, u64)> = session
            .slots
            .iter()
            .flatten()
            .flat_map(|info| std::iter::once(info.flow_id).chain(info.rtcp_flow_id))
            .map(|flow| (flow, self.flows.ring_drops(flow)))
            .filter(|(_, n)| *n > 0)
            .collect();
        for info in session.slots.iter().flatten() {
            self.close_stream(now, info, true);
        }
        if let Some(dialog) = &session.dialog {
            self.snapshots_in_flight.remove(dialog);
            self.snapshot_retries.retain(|(_, d, _)| d != dialog);
        }
        match session.phase {
            // Never answered: the INVITE gets a final answer instead of a BYE.
            Phase::Pending { txn, .. } => {
                if reason != EndReason::Cancel {
                    let reply = Reply::new(503, "Service Unavailable")
                        .header("Retry-After", self.config.retry_after.to_string());
                    self.outbox.replies.push((txn, reply));
                }
            }
            Phase::Answered | Phase::Confirmed => {
                if let (true, Some(dialog)) = (send_bye, session.dialog) {
                    self.outbox.byes.push((dialog, bye_reason(&reason)));
                }
            }
        }
        info!(id = %session.id, reason = reason.name(), "recording session ended");
        *self
            .counters
            .sessions_ended
            .entry(reason.name())
            .or_default() += 1;
        (self.events)(SessionEvent::Ended {
            id: session.id,
            at: SystemTime::now(),
            reason,
            ring_drops,
        });
    }

    pub(super) fn shutdown_sessions(&mut self, now: Instant) {
        let keys: Vec<SessionKey> = self.sessions.keys().cloned().collect();
        for key in keys {
            self.end_session(now, &key, EndReason::Shutdown, true);
        }
    }

    pub(super) fn session_for_dialog(&self, dialog: &DialogId) -> Option<SessionKey> {
        // Our dialogs are the client's: its Call-ID and From tag (the dialog's remote tag) are
        // the session's key, one lookup. The scan is for a session keyed otherwise, if any.
        let key = SessionKey {
            call_id: dialog.call_id.clone(),
            from_tag: dialog.remote_tag.clone(),
        };
        if self
            .sessions
            .get(&key)
            .is_some_and(|s| s.dialog.as_ref() == Some(dialog))
        {
            return Some(key);
        }
        self.sessions
            .values()
            .find(|s| s.dialog.as_ref() == Some(dialog))
            .map(|s| s.key.clone())
    }

    pub(super) fn session_for_txn(&self, txn: &TxnId) -> Option<SessionKey> {
        self.sessions
            .values()
            .find(|s| matches!(&s.phase, Phase::Pending { txn: t, .. } if t == txn))
            .map(|s| s.key.clone())
    }
}
