//! Receiving side of SRTP/SRTCP for one recorded stream, over the `libsrtp` crate (a pure-Rust
//! implementation of RFC 3711, RFC 6188 and RFC 7714: ROC tracking, replay window, MKI, key
//! lifetimes). Nothing here is hand-written crypto: this file maps SDES parameters to its
//! protection profiles and keeps the state that must survive a re-key and a handover.

use std::collections::BTreeMap;

use libsrtp::{MasterKey, ProtectionProfile, RecvSession, SrtpError, StreamConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::sdes::{SdesCrypto, Suite};

/// Why a packet was not decrypted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SrtpFail {
    /// The tag did not match under any key we hold (tampered, or a key we were not given).
    #[error("authentication failed")]
    Auth,
    /// Seen already, or older than the replay window.
    #[error("replayed packet")]
    Replay,
    /// Too short, unknown MKI, key past its lifetime.
    #[error("undecodable SRTP packet: {0}")]
    Invalid(String),
}

/// The suite's parameters as `libsrtp` profiles (RTP, RTCP). `None` when the packets are
/// plain RTP (unencrypted and unauthenticated).
fn profiles(c: &SdesCrypto) -> Option<(ProtectionProfile, ProtectionProfile)> {
    use ProtectionProfile as P;
    // SRTCP always carries the 80-bit tag, also for the _32 suites (RFC 3711 §5.2).
    let (full, short, null_auth) = match c.suite {
        Suite::AesCm128HmacSha1_80 => (
            P::Aes128CmHmacSha180,
            P::Aes128CmHmacSha180,
            P::Aes128CmNullAuth,
        ),
        Suite::AesCm128HmacSha1_32 => (
            P::Aes128CmHmacSha180,
            P::Aes128CmHmacSha132,
            P::Aes128CmNullAuth,
        ),
        Suite::Aes256CmHmacSha1_80 => (
            P::Aes256CmHmacSha180,
            P::Aes256CmHmacSha180,
            P::Aes256CmNullAuth,
        ),
        Suite::Aes256CmHmacSha1_32 => (
            P::Aes256CmHmacSha180,
            P::Aes256CmHmacSha132,
            P::Aes256CmNullAuth,
        ),
        Suite::AeadAes128Gcm => (P::AeadAes128Gcm, P::AeadAes128Gcm, P::AeadAes128Gcm),
        Suite::AeadAes256Gcm => (P::AeadAes256Gcm, P::AeadAes256Gcm, P::AeadAes256Gcm),
    };
    let rtp = match (c.unencrypted_srtp, c.unauthenticated_srtp) {
        (false, false) => short,
        (false, true) => null_auth,
        // Only the 80-bit suites reach here (see `SdesCrypto::parse`).
        (true, false) => P::NullCipherHmacSha180,
        (true, true) => return None,
    };
    let rtcp = if c.unencrypted_srtcp {
        P::NullCipherHmacSha180
    } else {
        full
    };
    Some((rtp, rtcp))
}

pub(crate) fn config(c: &SdesCrypto) -> Result<Option<StreamConfig>, SrtpFail> {
    let Some((rtp, rtcp)) = profiles(c) else {
        return Ok(None);
    };
    let (key_len, _) = c.suite.key_salt_len();
    let keys = c
        .keys
        .iter()
        .map(|k| {
            let mut mk = MasterKey::new(&k.key_salt[..key_len], &k.key_salt[key_len..], &k.mki);
            if let Some(life) = k.lifetime {
                // The RTCP lifetime is capped at 2^31 by the library; an SDES lifetime covers
                // both, so the smaller applies to SRTCP.
                let rtcp = life.min(1 << 31) as u32;
                mk.set_keys_lifetime(life.min(1 << 48), 0, rtcp, 0)
                    .map_err(|e| SrtpFail::Invalid(e.to_string()))?;
            }
            Ok(mk)
        })
        .collect::<Result<Vec<_>, SrtpFail>>()?;
    let mut cfg = StreamConfig::new(keys, &rtp, &rtcp);
    // A recorder sees what the network delivered: reordering up to a second at 50 pps.
    cfg.set_replay_window_size(1024);
    cfg.validate()
        .map_err(|e| SrtpFail::Invalid(e.to_string()))?;
    Ok(Some(cfg))
}

/// One key's receive context.
struct Keyed {
    crypto: SdesCrypto,
    /// `None`: plain RTP (the session parameters turned both halves off).
    session: Option<RecvSession>,
    /// SSRCs seen, so that a handover can carry their rollover counters.
    ssrcs: Vec<u32>,
}

impl Keyed {
    fn new(crypto: &SdesCrypto, rocs: &BTreeMap<u32, u32>) -> Result<Self, SrtpFail> {
        let session = match config(crypto)? {
            None => None,
            Some(cfg) => {
                let mut s = RecvSession::new();
                // Streams of SSRCs known from before a handover start at their ROC; new ones
                // come from the template.
                for (&ssrc, &roc) in rocs {
                    s.add_stream(Some(ssrc), &cfg)
                        .and_then(|()| s.set_roc(ssrc, roc))
                        .map_err(|e| SrtpFail::Invalid(e.to_string()))?;
                }
                s.add_stream(None, &cfg)
                    .map_err(|e| SrtpFail::Invalid(e.to_string()))?;
                Some(s)
            }
        };
        Ok(Self {
            crypto: crypto.clone(),
            session,
            ssrcs: rocs.keys().copied().collect(),
        })
    }

    fn unprotect(&mut self, packet: &[u8], rtcp: bool) -> Result<Vec<u8>, SrtpFail> {
        let Some(s) = self.session.as_mut() else {
            return Ok(packet.to_vec());
        };
        let out = if rtcp {
            s.rtcp_unprotect(packet.to_vec())
        } else {
            s.rtp_unprotect(packet.to_vec())
        };
        match out {
            Ok(plain) => {
                if !rtcp && plain.len() >= 12 {
                    let ssrc = u32::from_be_bytes([plain[8], plain[9], plain[10], plain[11]]);
                    if !self.ssrcs.contains(&ssrc) {
                        self.ssrcs.push(ssrc);
                    }
                }
                Ok(plain)
            }
            Err(SrtpError::Authentication) => Err(SrtpFail::Auth),
            Err(SrtpError::InvalidPacketIndex) => Err(SrtpFail::Replay),
            Err(e) => Err(SrtpFail::Invalid(e.to_string())),
        }
    }

    fn rocs(&self) -> BTreeMap<u32, u32> {
        let Some(s) = self.session.as_ref() else {
            return BTreeMap::new();
        };
        self.ssrcs
            .iter()
            .filter_map(|&ssrc| Some((ssrc, s.get_roc(ssrc).ok()?)))
            .collect()
    }
}

/// Decrypts one stream's packets: the current key and, after a re-key, the previous one for
/// the packets the client sent before it switched (still in flight, or reordered).
///
/// Serialized (for a handover) as its rollover counters only; the keys come back from the
/// stream's [`crate::events::StreamInfo`] through [`SrtpRx::set_key`].
#[derive(Default, Serialize, Deserialize)]
#[serde(from = "RxState", into = "RxState")]
pub struct SrtpRx {
    current: Option<Keyed>,
    previous: Option<Keyed>,
    /// Counters restored from a handover, applied when the key is set.
    restored: BTreeMap<u32, u32>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct RxState {
    /// SSRC -> rollover counter under the current key.
    rocs: BTreeMap<u32, u32>,
}

impl From<RxState> for SrtpRx {
    fn from(s: RxState) -> Self {
        Self {
            restored: s.rocs,
            ..Default::default()
        }
    }
}

impl From<SrtpRx> for RxState {
    fn from(rx: SrtpRx) -> Self {
        RxState {
            rocs: rx.current.as_ref().map_or(rx.restored, Keyed::rocs),
        }
    }
}

impl Clone for SrtpRx {
    /// Clones the counters only (see the type docs); the contexts are rebuilt from the key.
    fn clone(&self) -> Self {
        RxState::from(SrtpRx {
            current: None,
            previous: None,
            restored: self
                .current
                .as_ref()
                .map_or_else(|| self.restored.clone(), Keyed::rocs),
        })
        .into()
    }
}

impl std::fmt::Debug for SrtpRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpRx")
            .field("suite", &self.suite().map(Suite::name))
            .finish()
    }
}

impl SrtpRx {
    /// Sets the key of the stream; a different key than the current one becomes current and
    /// the old one is kept for stragglers. The same key again changes nothing.
    pub fn set_key(&mut self, crypto: &SdesCrypto) -> Result<(), SrtpFail> {
        if self.current.as_ref().is_some_and(|k| k.crypto == *crypto) {
            return Ok(());
        }
        let restored = std::mem::take(&mut self.restored);
        let rocs = match &self.current {
            // A new master key under the same SSRCs: RFC 3711 keeps the packet index (ROC)
            // across re-keying.
            Some(k) => k.rocs(),
            None => restored,
        };
        let new = Keyed::new(crypto, &rocs)?;
        self.previous = self.current.replace(new);
        Ok(())
    }

    pub fn suite(&self) -> Option<Suite> {
        self.current.as_ref().map(|k| k.crypto.suite)
    }

    pub fn is_keyed(&self) -> bool {
        self.current.is_some()
    }

    /// The plain RTP (or RTCP) packet; the current key first, then the previous one.
    pub fn unprotect(&mut self, packet: &[u8], rtcp: bool) -> Result<Vec<u8>, SrtpFail> {
        let Some(cur) = self.current.as_mut() else {
            return Err(SrtpFail::Invalid("no key".into()));
        };
        let err = match cur.unprotect(packet, rtcp) {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if let Some(prev) = self.previous.as_mut() {
            if let Ok(p) = prev.unprotect(packet, rtcp) {
                return Ok(p);
            }
        }
        Err(err)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use libsrtp::SendSession;

    use super::*;
    use crate::media::sdes::{base64_encode, SdesCrypto};

    pub(crate) fn crypto(suite: &str, key: &[u8], extra: &str) -> SdesCrypto {
        SdesCrypto::parse(&format!("1 {suite} inline:{}{extra}", base64_encode(key))).unwrap()
    }

    /// A sender with the same key, from the same implementation: round-trip checks of our
    /// parameter mapping (the independent senders are in the end-to-end tests).
    pub(crate) fn sender(c: &SdesCrypto) -> SendSession {
        let mut s = SendSession::new();
        s.add_stream(None, &config(c).unwrap().unwrap()).unwrap();
        s
    }

    pub(crate) fn rtp(seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0];
        p.extend(seq.to_be_bytes());
        p.extend(ts.to_be_bytes());
        p.extend(ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn every_suite_round_trips_and_rejects_a_flipped_bit() {
        for suite in Suite::ALL {
            let (k, s) = suite.key_salt_len();
            let key: Vec<u8> = (0..k + s).map(|i| i as u8 * 3).collect();
            let c = crypto(suite.name(), &key, "");
            let mut tx = sender(&c);
            let mut rx = SrtpRx::default();
            rx.set_key(&c).unwrap();
            let plain = rtp(7, 160, 0x1234, &[0x55; 160]);
            let cipher = tx.rtp_protect(plain.clone()).unwrap();
            assert_ne!(cipher[12..172], plain[12..], "{suite:?} did not encrypt");
            let mut bad = cipher.clone();
            bad[20] ^= 1;
            assert_eq!(rx.unprotect(&bad, false), Err(SrtpFail::Auth), "{suite:?}");
            assert_eq!(rx.unprotect(&cipher, false).unwrap(), plain, "{suite:?}");
            assert_eq!(rx.unprotect(&cipher, false), Err(SrtpFail::Replay));
            assert_eq!(rx.suite(), Some(suite));
        }
    }

    #[test]
    fn rollover_counter_follows_sequence_wrap_and_survives_a_handover() {
        let key = [9u8; 30];
        let c = crypto("AES_CM_128_HMAC_SHA1_80", &key, "");
        let mut tx = sender(&c);
        let mut rx = SrtpRx::default();
        rx.set_key(&c).unwrap();
        let mut seq = 65_530u16;
        for i in 0..20u32 {
            let p = rtp(seq, i * 160, 42, &[i as u8; 20]);
            assert_eq!(
                rx.unprotect(&tx.rtp_protect(p.clone()).unwrap(), false)
                    .unwrap(),
                p
            );
            seq = seq.wrapping_add(1);
        }
        // A handover carries the ROC (1 now) only; the key comes back from the stream info.
        let json = serde_json::to_string(&rx).unwrap();
        assert!(json.contains("\"rocs\":{\"42\":1}"), "{json}");
        let mut rx: SrtpRx = serde_json::from_str(&json).unwrap();
        rx.set_key(&c).unwrap();
        let p = rtp(seq, 99 * 160, 42, &[1; 20]);
        assert_eq!(
            rx.unprotect(&tx.rtp_protect(p.clone()).unwrap(), false)
                .unwrap(),
            p
        );
    }

    #[test]
    fn rekey_keeps_the_old_key_for_packets_in_flight() {
        let old = crypto("AES_CM_128_HMAC_SHA1_32", &[1u8; 30], "");
        let new = crypto("AES_CM_128_HMAC_SHA1_80", &[2u8; 30], "");
        let (mut tx_old, mut tx_new) = (sender(&old), sender(&new));
        let mut rx = SrtpRx::default();
        rx.set_key(&old).unwrap();
        let a = tx_old.rtp_protect(rtp(1, 0, 5, &[1; 10])).unwrap();
        let late = tx_old.rtp_protect(rtp(2, 160, 5, &[2; 10])).unwrap();
        assert!(rx.unprotect(&a, false).is_ok());
        rx.set_key(&new).unwrap();
        rx.set_key(&new).unwrap(); // A re-answer with the same key keeps the old one too.
        let b = tx_new.rtp_protect(rtp(3, 320, 5, &[3; 10])).unwrap();
        assert_eq!(rx.unprotect(&b, false).unwrap()[12..], [3; 10]);
        assert_eq!(rx.unprotect(&late, false).unwrap()[12..], [2; 10]);
        assert_eq!(rx.suite(), Some(Suite::AesCm128HmacSha1_80));
    }

    /// The packet stage must never panic on what the network sends: garbage, truncated and
    /// bit-flipped packets of every length, RTP and RTCP, under every suite (with MKI too).
    #[test]
    fn garbage_and_truncated_packets_are_errors_not_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for suite in Suite::ALL {
            let (k, s) = suite.key_salt_len();
            let key = base64_encode(&vec![3u8; k + s]);
            for extra in ["", "|2:1"] {
                let c =
                    SdesCrypto::parse(&format!("1 {} inline:{key}{extra}", suite.name())).unwrap();
                let mut tx = sender(&c);
                let mut rx = SrtpRx::default();
                rx.set_key(&c).unwrap();
                let good = if extra.is_empty() {
                    tx.rtp_protect(rtp(1, 0, 9, &[1; 40])).unwrap()
                } else {
                    tx.rtp_protect_mki(rtp(1, 0, 9, &[1; 40]), &Some(vec![2]))
                        .unwrap()
                };
                for len in 0..good.len() + 4 {
                    let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    if len > 0 {
                        junk[0] = 0x80 | (junk[0] & 0x3f);
                    }
                    for rtcp in [false, true] {
                        assert!(rx.unprotect(&junk, rtcp).is_err());
                        assert!(
                            rx.unprotect(&good[..len.min(good.len())], rtcp).is_err()
                                || len >= good.len()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_key_past_its_lifetime_decrypts_no_more() {
        let c = SdesCrypto::parse(&format!(
            "1 AES_CM_128_HMAC_SHA1_80 inline:{}|2^4",
            base64_encode(&[5u8; 30])
        ))
        .unwrap();
        let mut tx = sender(&c);
        let mut rx = SrtpRx::default();
        rx.set_key(&c).unwrap();
        let mut results = Vec::new();
        for seq in 0..20u16 {
            // The sender's own count stops it too: only what it protected is offered.
            let Ok(p) = tx.rtp_protect(rtp(seq, 0, 8, &[0; 4])) else {
                break;
            };
            results.push(rx.unprotect(&p, false).is_ok());
        }
        assert!(results.len() >= 15, "{results:?}");
        assert!(results[..15].iter().all(|&ok| ok), "{results:?}");
        // 2^4 packets per key: the 17th (if the sender made one) is refused.
        assert!(results.iter().skip(16).all(|&ok| !ok), "{results:?}");
        let late = {
            let mut other = sender(&crypto("AES_CM_128_HMAC_SHA1_80", &[5u8; 30], ""));
            for seq in 0..17u16 {
                let _ = other.rtp_protect(rtp(seq, 0, 8, &[0; 4]));
            }
            other.rtp_protect(rtp(17, 0, 8, &[0; 4])).unwrap()
        };
        assert!(matches!(
            rx.unprotect(&late, false),
            Err(SrtpFail::Invalid(_))
        ));
    }

    #[test]
    fn session_params_and_mki_and_rtcp() {
        let key = [4u8; 30];
        for extra in [
            "",
            " UNENCRYPTED_SRTP",
            " UNAUTHENTICATED_SRTP",
            " UNENCRYPTED_SRTCP",
        ] {
            let c = crypto("AES_CM_128_HMAC_SHA1_80", &key, extra);
            let mut tx = sender(&c);
            let mut rx = SrtpRx::default();
            rx.set_key(&c).unwrap();
            let p = rtp(10, 0, 77, &[0xAB; 40]);
            let cipher = tx.rtp_protect(p.clone()).unwrap();
            assert_eq!(
                cipher[12..52] == p[12..],
                extra == " UNENCRYPTED_SRTP",
                "{extra}"
            );
            assert_eq!(rx.unprotect(&cipher, false).unwrap(), p, "{extra}");
            // An RTCP receiver report (SRTCP always authenticated).
            let mut rr = vec![0x80, 201, 0, 1];
            rr.extend(77u32.to_be_bytes());
            let sr = tx.rtcp_protect(rr.clone()).unwrap();
            let mut bad = sr.clone();
            bad[5] ^= 0x10;
            assert_eq!(rx.unprotect(&bad, true), Err(SrtpFail::Auth), "{extra}");
            assert_eq!(rx.unprotect(&sr, true).unwrap(), rr, "{extra}");
        }
        // MKI: the packet carries it, our side finds the key by it.
        let c = SdesCrypto::parse(&format!(
            "1 AES_CM_128_HMAC_SHA1_80 inline:{}|2^31|7:2",
            base64_encode(&key)
        ))
        .unwrap();
        let mut tx = sender(&c);
        let mut rx = SrtpRx::default();
        rx.set_key(&c).unwrap();
        let p = rtp(1, 0, 3, &[1; 8]);
        let cipher = tx.rtp_protect_mki(p.clone(), &Some(vec![0, 7])).unwrap();
        assert_eq!(cipher.len(), p.len() + 2 + 10);
        assert_eq!(cipher[p.len()..p.len() + 2], [0, 7]);
        assert_eq!(rx.unprotect(&cipher, false).unwrap(), p);
    }
}
