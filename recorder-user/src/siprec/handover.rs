//! Handing the live recording sessions over to a restarted daemon (issue 5, "restart without
//! losing packets").
//!
//! The old daemon calls [`Recorder::handover`]: sessions still waiting for their answer delay
//! get 503 (their INVITE transaction cannot outlive the process), every other session is
//! written into a [`RecorderHandover`] together with its SIP dialog, and the recorder is left
//! empty without a BYE, an `Ended` event or a flow removed: the flows stay pinned in the
//! kernel and capture goes on. The new daemon calls [`Recorder::restore`] with the adopted
//! flow table; the sessions carry on with the same recording ids, dialogs, ports and flow ids,
//! and no `Started` event is emitted (the writer restores its own recordings).
//!
//! `Instant`s do not outlive a process, so every deadline is saved as the time left (or
//! elapsed) at the handover, and the wall-clock time the daemon was down is taken off on
//! restore: a session timer expires when it would have without the restart.
//!
//! A restored session's flows are checked against the table. A flow that is missing, or
//! pinned with another flow id, source or action, is pinned again as the session says (with a
//! warning): the ports are the session's and the client keeps sending there, so re-pinning
//! loses only what arrived while the entry was wrong. A session whose flows cannot be pinned
//! (the table refuses) is ended with [`EndReason::Error`] and a BYE; one whose dialog cannot
//! be rebuilt is ended with [`EndReason::Error`] without one (there is no dialog to send it
//! in), and the client's next in-dialog request gets 481.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use super::{send_reply, Phase, Recorder, Session, SessionKey, SiprecConfig, Slot};
use crate::{
    events::{CallIds, EndReason, Participant, RecordingId, SessionEvent},
    flow::{FlowControl, FlowSpec},
    sip::{DialogSnapshot, Endpoint},
    siprec::{
        metadata::MetadataState,
        ports::PortAllocator,
        sdp::{Offer, StreamAnswer},
    },
};

/// Layout version of [`RecorderHandover`]; a state file of another version is refused.
pub const HANDOVER_VERSION: u32 = 1;

/// Why a handover cannot be restored at all (single sessions that fail end on their own).
#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("session state has layout version {found}, this build reads {expected}")]
    Version { found: u32, expected: u32 },
    /// The flows are keyed by the media address: moved, none of them would be found.
    #[error("media address changed from {saved} to {configured}; sessions cannot be carried on")]
    MediaAddress { saved: IpAddr, configured: IpAddr },
}

/// The live sessions of a recorder, for the next daemon (serialize it with serde).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecorderHandover {
    version: u32,
    /// Wall-clock time of the handover: the restore takes the downtime off every timer.
    saved_at: SystemTime,
    media_address: IpAddr,
    /// Above every flow id ever handed out, so new flows never reuse one.
    next_flow_id: u64,
    /// Released RTP ports still cooling down, with how long ago each was released.
    cooling_ports: Vec<(u16, Duration)>,
    sessions: Vec<SessionSnapshot>,
}

impl RecorderHandover {
    /// Whether a recorder with `config` can carry these sessions on (checked by
    /// [`Recorder::restore`]; the daemon asks first, to fall back to a fresh start).
    pub fn check(&self, config: &SiprecConfig) -> Result<(), HandoverError> {
        if self.version != HANDOVER_VERSION {
            return Err(HandoverError::Version {
                found: self.version,
                expected: HANDOVER_VERSION,
            });
        }
        if self.media_address != config.media_address {
            return Err(HandoverError::MediaAddress {
                saved: self.media_address,
                configured: config.media_address,
            });
        }
        Ok(())
    }

    /// Recording ids of the sessions it carries.
    pub fn recording_ids(&self) -> Vec<RecordingId> {
        self.sessions.iter().map(|s| s.id.clone()).collect()
    }

    /// When the handover was made.
    pub fn saved_at(&self) -> SystemTime {
        self.saved_at
    }

    /// Shifts the handover back in time, as if the daemon had been down `by` longer.
    #[cfg(test)]
    pub(super) fn age(&mut self, by: Duration) {
        self.saved_at -= by;
    }
}

/// One session: everything [`Session`] holds, with deadlines as durations.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SessionSnapshot {
    id: RecordingId,
    key: SessionKey,
    dialog: DialogSnapshot,
    /// The ACK came (else it is awaited: `dialog.awaiting_ack`).
    confirmed: bool,
    slots: Vec<Slot>,
    offer: Offer,
    answers: Vec<StreamAnswer>,
    sdp_session_id: u64,
    sdp_version: u64,
    metadata: Option<MetadataState>,
    metadata_version: u32,
    call_ids: CallIds,
    participants: Vec<Participant>,
    require_siprec: bool,
    started_at: SystemTime,
    session_expires: Option<Duration>,
    /// Time left before the session timer expires.
    refresh_in: Option<Duration>,
    /// Time since the last signaling or RTP.
    idle_for: Duration,
    last_activity_wall: SystemTime,
    packets_seen: u64,
    idle_check_in: Duration,
    snapshot_asked: Vec<String>,
    snapshot_due: Option<String>,
    /// A metadata snapshot request that was in flight or waiting for its 491 back-off: the
    /// new daemon sends it again (the old client transaction died with the process).
    snapshot_unanswered: Option<String>,
}

impl<F: FlowControl> Recorder<F> {
    /// Hands every live session over to the next daemon and leaves this recorder empty and
    /// refusing new INVITEs. Sessions still waiting to be answered get 503 with Retry-After,
    /// their flows removed and an `Ended { Shutdown }`; the others keep their flows pinned,
    /// get no BYE and no `Ended`, and their dialogs leave `endpoint` (nothing is sent for them
    /// from here on). Drain `endpoint`'s transmits afterwards: the 503s are queued there.
    pub fn handover(&mut self, now: Instant, endpoint: &mut Endpoint) -> RecorderHandover {
        self.set_accepting(false, "restarting");
        let ending: Vec<(SessionKey, Option<EndReason>)> = self
            .sessions
            .values()
            .filter_map(|s| match (&s.phase, &s.dialog) {
                (Phase::Pending { .. }, _) => Some((s.key.clone(), None)),
                (_, Some(d)) if endpoint.has_dialog(d) => None,
                _ => Some((
                    s.key.clone(),
                    Some(EndReason::Error {
                        detail: "SIP dialog gone at handover".into(),
                    }),
                )),
            })
            .collect();
        for (key, error) in ending {
            let reason = error.unwrap_or(EndReason::Shutdown);
            self.end_session(now, &key, reason, false);
        }
        // Only the 503s: snapshot requests are carried over instead of sent now.
        for (txn, reply) in std::mem::take(&mut self.outbox.replies) {
            send_reply(now, endpoint, &txn, reply);
        }
        let mut unanswered: Vec<_> = self
            .snapshots_in_flight
            .drain()
            .map(|(dialog, sent)| (dialog, sent.xml))
            .collect();
        unanswered.extend(
            std::mem::take(&mut self.snapshot_retries)
                .into_iter()
                .map(|(_, dialog, xml)| (dialog, xml)),
        );
        let mut sessions = Vec::new();
        for (_, s) in std::mem::take(&mut self.sessions) {
            let Some(dialog_id) = s.dialog.clone() else {
                continue;
            };
            let Some(dialog) = endpoint.export_dialog(now, &dialog_id) else {
                continue;
            };
            endpoint.forget_dialog(&dialog_id);
            let snapshot_unanswered = unanswered
                .iter()
                .find(|(d, _)| *d == dialog_id)
                .map(|(_, xml)| xml.clone());
            sessions.push(SessionSnapshot {
                id: s.id,
                key: s.key,
                dialog,
                confirmed: matches!(s.phase, Phase::Confirmed),
                slots: s.slots,
                offer: s.offer,
                answers: s.answers,
                sdp_session_id: s.sdp_session_id,
                sdp_version: s.sdp_version,
                metadata: s.metadata,
                metadata_version: s.metadata_version,
                call_ids: s.call_ids,
                participants: s.participants,
                require_siprec: s.require_siprec,
                started_at: s.started_at,
                session_expires: s.session_expires,
                refresh_in: s.refresh_deadline.map(|d| d.saturating_duration_since(now)),
                idle_for: now.saturating_duration_since(s.last_activity),
                last_activity_wall: s.last_activity_wall,
                packets_seen: s.packets_seen,
                idle_check_in: s.next_idle_check.saturating_duration_since(now),
                snapshot_asked: s.snapshot_asked,
                snapshot_due: s.snapshot_due,
                snapshot_unanswered,
            });
        }
        info!(sessions = sessions.len(), "recording sessions handed over");
        RecorderHandover {
            version: HANDOVER_VERSION,
            saved_at: SystemTime::now(),
            media_address: self.config.media_address,
            next_flow_id: self.next_flow_id,
            cooling_ports: self.ports.cooling(now),
            sessions,
        }
    }

    /// Rebuilds a recorder from a [`RecorderHandover`]: sessions, their dialogs (imported into
    /// `endpoint`), their ports (marked in use) and flow ids (new ones come above them). The
    /// flows are expected in `flows` already (the adopted kernel table); see the module docs
    /// for what happens when one is missing or differs. No `Started` is emitted; a session
    /// that cannot be carried on is ended (`Ended { Error }`). The flows the restored sessions
    /// own are [`Recorder::flow_locals`]: any other entry in the table is stale.
    pub fn restore(
        config: SiprecConfig,
        flows: F,
        events: Box<dyn FnMut(SessionEvent) + Send>,
        handover: RecorderHandover,
        now: Instant,
        endpoint: &mut Endpoint,
    ) -> Result<Self, HandoverError> {
        handover.check(&config)?;
        let downtime = SystemTime::now()
            .duration_since(handover.saved_at)
            .unwrap_or_default();
        let mut rec = Recorder::new(config, flows, events);
        rec.next_flow_id = handover.next_flow_id.max(1);
        // Every saved session's ports are taken first; one that fails gives its own back.
        let in_use: Vec<u16> = handover
            .sessions
            .iter()
            .flat_map(|s| s.slots.iter().flatten().map(|i| i.local_port))
            .collect();
        let cooling: Vec<(u16, Duration)> = handover
            .cooling_ports
            .iter()
            .map(|&(port, ago)| (port, ago.saturating_add(downtime)))
            .collect();
        let (lo, hi) = rec.config.rtp_ports;
        rec.ports =
            PortAllocator::restore(lo, hi, rec.config.port_cooldown, now, &in_use, &cooling);
        let mut claimed = HashSet::new();
        let mut restored = 0;
        for snapshot in handover.sessions {
            let id = snapshot.id.clone();
            match rec.restore_session(now, downtime, snapshot, endpoint, &mut claimed) {
                Ok(()) => restored += 1,
                Err(detail) => {
                    warn!(id = %id, %detail, "recording session not carried on");
                    *rec.counters.sessions_ended.entry("error").or_default() += 1;
                    (rec.events)(SessionEvent::Ended {
                        id,
                        at: SystemTime::now(),
                        reason: EndReason::Error { detail },
                        ring_drops: Vec::new(),
                    });
                }
            }
        }
        let above = rec
            .sessions
            .values()
            .flat_map(|s| s.flow_ids().collect::<Vec<_>>())
            .max()
            .map_or(1, |max| max + 1);
        rec.next_flow_id = rec.next_flow_id.max(above);
        info!(
            sessions = restored,
            ?downtime,
            "recording sessions carried on"
        );
        // BYEs of sessions whose flows could not be pinned again.
        rec.flush(now, endpoint);
        Ok(rec)
    }

    /// Puts the RTP ports of calls a crash cut off (the repaired recordings') in cool-down,
    /// released `now`: their senders do not know the daemon died and may go on sending there,
    /// and a new call given such a port would record the old call's media.
    pub fn cool_down_ports(&mut self, now: Instant, ports: &[u16]) {
        self.ports.cool_down(now, ports);
    }

    /// Local addresses of every flow the sessions own (RTP and RTCP).
    pub fn flow_locals(&self) -> Vec<SocketAddr> {
        let ip = self.config.media_address;
        self.sessions
            .values()
            .flat_map(|s| s.slots.iter().flatten())
            .flat_map(|i| std::iter::once(i.local_port).chain(i.rtcp_port))
            .map(|port| SocketAddr::new(ip, port))
            .collect()
    }

    /// Restores one session; `Err` says why it cannot go on (its flows are then unpinned).
    fn restore_session(
        &mut self,
        now: Instant,
        downtime: Duration,
        mut snap: SessionSnapshot,
        endpoint: &mut Endpoint,
        claimed: &mut HashSet<u16>,
    ) -> Result<(), String> {
        let ours: Vec<(u16, u64, Option<SocketAddr>)> = snap
            .slots
            .iter()
            .flatten()
            .flat_map(|i| {
                let rtcp = i
                    .rtcp_port
                    .zip(i.rtcp_flow_id)
                    .map(|(port, id)| (port, id, i.rtcp_remote));
                std::iter::once((i.local_port, i.flow_id, i.remote)).chain(rtcp)
            })
            .collect();
        let key_matches = snap.key.call_id == snap.dialog.id.call_id
            && snap.key.from_tag == snap.dialog.id.remote_tag;
        let rtp_ports: Vec<u16> = snap.slots.iter().flatten().map(|i| i.local_port).collect();
        if !key_matches {
            self.unpin_owned(now, &ours, &rtp_ports);
            return Err(format!(
                "session key does not match dialog {}",
                snap.dialog.id
            ));
        }
        if let Some((port, _, _)) = ours.iter().find(|(port, _, _)| claimed.contains(port)) {
            // Not ours to unpin either: another restored session holds the port.
            return Err(format!(
                "port {port} is claimed by another restored session"
            ));
        }
        if let Some(p) = snap.dialog.awaiting_ack.as_mut() {
            p.ack_wait = p.ack_wait.saturating_sub(downtime);
        }
        let confirmed = snap.confirmed || snap.dialog.awaiting_ack.is_none();
        let dialog = match endpoint.import_dialog(now, snap.dialog) {
            Ok(dialog) => dialog,
            Err(e) => {
                self.unpin_owned(now, &ours, &rtp_ports);
                return Err(e.to_string());
            }
        };
        claimed.extend(ours.iter().map(|(port, _, _)| *port));
        let mut flow_error = None;
        for &(port, flow_id, remote) in &ours {
            if let Err(e) = self.check_flow(port, flow_id, remote) {
                flow_error = Some(e);
                break;
            }
        }
        let back = |d: Duration| now.checked_sub(d).unwrap_or(now);
        let session = Session {
            id: snap.id,
            key: snap.key.clone(),
            dialog: Some(dialog.clone()),
            phase: if confirmed {
                Phase::Confirmed
            } else {
                Phase::Answered
            },
            slots: snap.slots,
            offer: snap.offer,
            answers: snap.answers,
            sdp_session_id: snap.sdp_session_id,
            sdp_version: snap.sdp_version,
            metadata: snap.metadata,
            metadata_version: snap.metadata_version,
            call_ids: snap.call_ids,
            participants: snap.participants,
            require_siprec: snap.require_siprec,
            started_at: snap.started_at,
            session_expires: snap.session_expires,
            refresh_deadline: snap.refresh_in.map(|d| now + d.saturating_sub(downtime)),
            last_activity: back(snap.idle_for.saturating_add(downtime)),
            last_activity_wall: snap.last_activity_wall,
            packets_seen: snap.packets_seen,
            next_idle_check: now + snap.idle_check_in.saturating_sub(downtime),
            snapshot_asked: snap.snapshot_asked,
            snapshot_due: snap.snapshot_due,
            armed_at: None,
        };
        info!(id = %session.id, call_id = %dialog.call_id, confirmed, "recording session carried on");
        let snapshot_due = session.snapshot_due.is_some();
        self.sessions.insert(snap.key.clone(), session);
        self.arm(&snap.key);
        if snapshot_due {
            self.snapshots_due.push(snap.key.clone());
        }
        if let Some(detail) = flow_error {
            // The dialog is back: the client hears why with a BYE.
            let reason = EndReason::Error { detail };
            self.end_session(now, &snap.key, reason, true);
            return Ok(());
        }
        if let Some(xml) = snap.snapshot_unanswered {
            self.snapshot_retries.push((now, dialog, xml));
        }
        Ok(())
    }

    /// Makes the table hold the flow a restored stream expects at `port`.
    fn check_flow(
        &mut self,
        port: u16,
        flow_id: u64,
        remote: Option<SocketAddr>,
    ) -> Result<(), String> {
        let local = SocketAddr::new(self.config.media_address, port);
        let expected = FlowSpec {
            flow_id,
            local,
            remote: if self.config.pin_source { remote } else { None },
            action: self.config.flow_action,
        };
        match self.flows.lookup(local) {
            Some((spec, _)) if spec == expected => Ok(()),
            Some((spec, _)) => {
                warn!(%local, found = ?spec, ?expected, "restored flow differs from the table; rewriting");
                self.flows
                    .rewrite(local, expected)
                    .map(|_| ())
                    .map_err(|e| format!("flow table: {e}"))
            }
            None => {
                warn!(%local, flow_id, "restored flow missing from the table; pinning again");
                self.flows
                    .insert(expected)
                    .map(|_| ())
                    .map_err(|e| format!("flow table: {e}"))
            }
        }
    }

    /// Unpins the flows of a session that cannot go on, where the table still holds its ids,
    /// and lets its ports cool down.
    fn unpin_owned(
        &mut self,
        now: Instant,
        ours: &[(u16, u64, Option<SocketAddr>)],
        rtp_ports: &[u16],
    ) {
        for &port in rtp_ports {
            self.ports.release(now, port);
        }
        for &(port, flow_id, _) in ours {
            let local = SocketAddr::new(self.config.media_address, port);
            if self
                .flows
                .lookup(local)
                .is_some_and(|(s, _)| s.flow_id == flow_id)
            {
                if let Err(e) = self.flows.remove(local) {
                    warn!(error = %e, %local, "unpinning flow failed");
                }
            }
        }
    }
}
