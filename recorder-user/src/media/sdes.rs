//! SDES key exchange (RFC 4568): the `a=crypto` lines of an offer, read into the suite, keys
//! and session parameters the recorder decrypts the client's packets with, and our answer.
//!
//! The keys are secrets: [`SdesKey`] never prints them (its `Debug` is redacted) and the
//! writer's metadata only carries [`Suite::name`]. They are serialized (base64) only because
//! the handover file carries the session events across a restart (mode 0600).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// The SDES crypto suites we decrypt (RFC 4568 §6.2, RFC 6188 §7.1, RFC 7714 §14.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Suite {
    #[serde(rename = "AES_CM_128_HMAC_SHA1_80")]
    AesCm128HmacSha1_80,
    #[serde(rename = "AES_CM_128_HMAC_SHA1_32")]
    AesCm128HmacSha1_32,
    #[serde(rename = "AES_256_CM_HMAC_SHA1_80")]
    Aes256CmHmacSha1_80,
    #[serde(rename = "AES_256_CM_HMAC_SHA1_32")]
    Aes256CmHmacSha1_32,
    #[serde(rename = "AEAD_AES_128_GCM")]
    AeadAes128Gcm,
    #[serde(rename = "AEAD_AES_256_GCM")]
    AeadAes256Gcm,
}

impl Suite {
    pub const ALL: [Suite; 6] = [
        Suite::AesCm128HmacSha1_80,
        Suite::AesCm128HmacSha1_32,
        Suite::Aes256CmHmacSha1_80,
        Suite::Aes256CmHmacSha1_32,
        Suite::AeadAes128Gcm,
        Suite::AeadAes256Gcm,
    ];

    /// The name as written in `a=crypto`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
            Suite::Aes256CmHmacSha1_80 => "AES_256_CM_HMAC_SHA1_80",
            Suite::Aes256CmHmacSha1_32 => "AES_256_CM_HMAC_SHA1_32",
            Suite::AeadAes128Gcm => "AEAD_AES_128_GCM",
            Suite::AeadAes256Gcm => "AEAD_AES_256_GCM",
        }
    }

    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
    }

    /// Master key and salt lengths in bytes.
    pub fn key_salt_len(self) -> (usize, usize) {
        match self {
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => (16, 14),
            Suite::Aes256CmHmacSha1_80 | Suite::Aes256CmHmacSha1_32 => (32, 14),
            Suite::AeadAes128Gcm => (16, 12),
            Suite::AeadAes256Gcm => (32, 12),
        }
    }

    /// Preference when several are offered: AEAD over CM, longer keys, then longer tags.
    fn strength(self) -> u8 {
        match self {
            Suite::AesCm128HmacSha1_32 => 0,
            Suite::AesCm128HmacSha1_80 => 1,
            Suite::Aes256CmHmacSha1_32 => 2,
            Suite::Aes256CmHmacSha1_80 => 3,
            Suite::AeadAes128Gcm => 4,
            Suite::AeadAes256Gcm => 5,
        }
    }

    pub fn is_aead(self) -> bool {
        matches!(self, Suite::AeadAes128Gcm | Suite::AeadAes256Gcm)
    }
}

/// One `inline:` key parameter.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdesKey {
    /// Master key then master salt.
    #[serde(serialize_with = "ser_b64", deserialize_with = "de_b64")]
    pub key_salt: Vec<u8>,
    /// Packets the key may protect (`|2^20|` or `|1048576|`).
    pub lifetime: Option<u64>,
    /// `|MKI:length|`: the MKI as it appears in packets (big-endian, `length` bytes).
    pub mki: Option<Vec<u8>>,
}

impl fmt::Debug for SdesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SdesKey")
            .field("key_salt", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .field("mki", &self.mki)
            .finish()
    }
}

/// The offered `a=crypto` line we decrypt with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdesCrypto {
    pub tag: u32,
    pub suite: Suite,
    /// One key, or several told apart by their MKI.
    pub keys: Vec<SdesKey>,
    /// `UNENCRYPTED_SRTP`: RTP payloads are sent in the clear (still authenticated).
    pub unencrypted_srtp: bool,
    /// `UNENCRYPTED_SRTCP`.
    pub unencrypted_srtcp: bool,
    /// `UNAUTHENTICATED_SRTP`: RTP packets carry no tag.
    pub unauthenticated_srtp: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SdesError {
    #[error("a=crypto has no {0}")]
    Missing(&'static str),
    #[error("crypto suite {0:?} is not supported")]
    Suite(String),
    #[error("key parameter is not inline: base64")]
    KeyMethod,
    #[error("key is not base64")]
    Base64,
    #[error("key and salt are {got} bytes, {suite} needs {want}")]
    KeyLength {
        suite: &'static str,
        got: usize,
        want: usize,
    },
    #[error("bad key lifetime or MKI {0:?}")]
    KeyParam(String),
    #[error("session parameter {0:?} is not supported")]
    SessionParam(String),
}

impl SdesCrypto {
    /// Parses the value of one `a=crypto:` attribute.
    pub fn parse(value: &str) -> Result<Self, SdesError> {
        let mut fields = value.split_whitespace();
        let tag = fields
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or(SdesError::Missing("tag"))?;
        let suite_name = fields.next().ok_or(SdesError::Missing("crypto suite"))?;
        let suite =
            Suite::from_name(suite_name).ok_or_else(|| SdesError::Suite(suite_name.into()))?;
        let key_params = fields.next().ok_or(SdesError::Missing("key parameter"))?;
        let keys = key_params
            .split(';')
            .map(|k| parse_key(suite, k))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.len() > 1 && keys.iter().any(|k| k.mki.is_none()) {
            return Err(SdesError::KeyParam("several keys without MKI".into()));
        }
        let mut c = SdesCrypto {
            tag,
            suite,
            keys,
            unencrypted_srtp: false,
            unencrypted_srtcp: false,
            unauthenticated_srtp: false,
        };
        for param in fields {
            match param.to_ascii_uppercase().as_str() {
                "UNENCRYPTED_SRTP" => c.unencrypted_srtp = true,
                "UNENCRYPTED_SRTCP" => c.unencrypted_srtcp = true,
                "UNAUTHENTICATED_SRTP" => c.unauthenticated_srtp = true,
                // Key derivation rate 0 is the default; anything else derives new session keys
                // during the call, which no client in the field does.
                "KDR=0" => {}
                // Only telling the receiver what the sender does: nothing to change here.
                p if p.starts_with("FEC_ORDER=") || p.starts_with("WSH=") => {}
                _ => return Err(SdesError::SessionParam(param.into())),
            }
        }
        // An AEAD suite authenticates as it decrypts: neither half can be turned off, and
        // the 32-bit-tag suites have no unencrypted form in the SRTP implementation.
        if (suite.is_aead()
            && (c.unencrypted_srtp || c.unencrypted_srtcp || c.unauthenticated_srtp))
            || (c.unencrypted_srtp
                && matches!(
                    suite,
                    Suite::AesCm128HmacSha1_32 | Suite::Aes256CmHmacSha1_32
                ))
        {
            return Err(SdesError::SessionParam(
                "unencrypted or unauthenticated form of this suite".into(),
            ));
        }
        Ok(c)
    }

    /// The session parameters to repeat in our answer (RFC 4568 §6.3: both sides declare them).
    fn session_params(&self) -> String {
        let mut out = String::new();
        for (on, name) in [
            (self.unencrypted_srtp, " UNENCRYPTED_SRTP"),
            (self.unencrypted_srtcp, " UNENCRYPTED_SRTCP"),
            (self.unauthenticated_srtp, " UNAUTHENTICATED_SRTP"),
        ] {
            if on {
                out.push_str(name);
            }
        }
        out
    }
}

fn parse_key(suite: Suite, param: &str) -> Result<SdesKey, SdesError> {
    let info = param.strip_prefix("inline:").ok_or(SdesError::KeyMethod)?;
    let mut parts = info.split('|');
    let key_salt = base64_decode(parts.next().unwrap_or("")).ok_or(SdesError::Base64)?;
    let (k, s) = suite.key_salt_len();
    if key_salt.len() != k + s {
        return Err(SdesError::KeyLength {
            suite: suite.name(),
            got: key_salt.len(),
            want: k + s,
        });
    }
    let mut key = SdesKey {
        key_salt,
        lifetime: None,
        mki: None,
    };
    for part in parts {
        let bad = || SdesError::KeyParam(part.into());
        if let Some((value, len)) = part.split_once(':') {
            let value: u64 = value.parse().map_err(|_| bad())?;
            let len: usize = len.parse().map_err(|_| bad())?;
            if !(1..=8).contains(&len) || (len < 8 && value >> (8 * len) != 0) {
                return Err(bad());
            }
            key.mki = Some(value.to_be_bytes()[8 - len..].to_vec());
        } else if let Some(exp) = part.strip_prefix("2^") {
            let exp: u32 = exp.parse().map_err(|_| bad())?;
            key.lifetime = Some(1u64.checked_shl(exp).filter(|_| exp < 64).ok_or_else(bad)?);
        } else {
            key.lifetime = Some(part.parse().map_err(|_| bad())?);
        }
    }
    Ok(key)
}

/// The offered line we decrypt with: the strongest suite we can use, the first of equals.
pub fn choose(offered: &[String]) -> Option<SdesCrypto> {
    let mut best: Option<SdesCrypto> = None;
    for c in offered.iter().filter_map(|v| SdesCrypto::parse(v).ok()) {
        if best
            .as_ref()
            .is_none_or(|b| c.suite.strength() > b.suite.strength())
        {
            best = Some(c);
        }
    }
    best
}

/// Our `a=crypto` value answering `chosen`: its tag and suite, our key, its session parameters.
/// We never send media, so our key protects nothing; SDES still requires one.
pub fn answer(chosen: &SdesCrypto) -> String {
    let (k, s) = chosen.suite.key_salt_len();
    let key: Vec<u8> = (0..k + s).map(|_| rand::random::<u8>()).collect();
    format!(
        "{} {} inline:{}{}",
        chosen.tag,
        chosen.suite.name(),
        base64_encode(&key),
        chosen.session_params()
    )
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional (some clients leave it off).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be zero padding of the last byte, and one char alone is no byte.
    (bits < 6 && acc & ((1 << bits) - 1) == 0).then_some(out)
}

fn ser_b64<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    base64_encode(v).serialize(s)
}

fn de_b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    base64_decode(&text).ok_or_else(|| serde::de::Error::custom("invalid base64 key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY30: &str = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";

    #[test]
    fn parses_rfc4568_example_with_lifetime_and_mki() {
        let c = SdesCrypto::parse(&format!(
            "1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^20|1:4"
        ))
        .unwrap();
        assert_eq!((c.tag, c.suite), (1, Suite::AesCm128HmacSha1_80));
        assert_eq!(c.keys.len(), 1);
        assert_eq!(c.keys[0].key_salt.len(), 30);
        assert_eq!(&c.keys[0].key_salt[..4], b"YS__");
        assert_eq!(c.keys[0].lifetime, Some(1 << 20));
        assert_eq!(c.keys[0].mki, Some(vec![0, 0, 0, 1]));
    }

    #[test]
    fn rejects_wrong_key_length_unknown_suite_and_params() {
        assert!(matches!(
            SdesCrypto::parse(&format!("1 AES_256_CM_HMAC_SHA1_80 inline:{KEY30}")),
            Err(SdesError::KeyLength { want: 46, .. })
        ));
        assert!(matches!(
            SdesCrypto::parse(&format!("1 F8_128_HMAC_SHA1_80 inline:{KEY30}")),
            Err(SdesError::Suite(_))
        ));
        assert!(matches!(
            SdesCrypto::parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30} KDR=5")),
            Err(SdesError::SessionParam(_))
        ));
        assert!(matches!(
            SdesCrypto::parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:9")),
            Err(SdesError::KeyParam(_))
        ));
        assert!(SdesCrypto::parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}!")).is_err());
    }

    #[test]
    fn session_params_are_read_and_echoed() {
        let c = SdesCrypto::parse(&format!(
            "3 AES_CM_128_HMAC_SHA1_80 inline:{KEY30} UNENCRYPTED_SRTCP UNAUTHENTICATED_SRTP"
        ))
        .unwrap();
        assert!(c.unencrypted_srtcp && c.unauthenticated_srtp && !c.unencrypted_srtp);
        let a = answer(&c);
        assert!(a.starts_with("3 AES_CM_128_HMAC_SHA1_80 inline:"), "{a}");
        assert!(
            a.ends_with(" UNENCRYPTED_SRTCP UNAUTHENTICATED_SRTP"),
            "{a}"
        );
        // AEAD cannot be unauthenticated.
        let gcm = base64_encode(&[7u8; 28]);
        assert!(SdesCrypto::parse(&format!(
            "1 AEAD_AES_128_GCM inline:{gcm} UNAUTHENTICATED_SRTP"
        ))
        .is_err());
    }

    #[test]
    fn strongest_offered_suite_is_chosen_and_answered_with_its_tag() {
        let k46 = base64_encode(&[1u8; 46]);
        let k44 = base64_encode(&[2u8; 44]);
        let offered = vec![
            format!("1 AES_CM_128_HMAC_SHA1_32 inline:{KEY30}"),
            format!("2 AES_256_CM_HMAC_SHA1_80 inline:{k46}"),
            format!("3 AEAD_AES_256_GCM inline:{k44}"),
            format!("4 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}"),
            "5 F8_128_HMAC_SHA1_80 inline:abc".to_string(),
        ];
        let c = choose(&offered).unwrap();
        assert_eq!((c.tag, c.suite), (3, Suite::AeadAes256Gcm));
        let a = answer(&c);
        let ours = a.strip_prefix("3 AEAD_AES_256_GCM inline:").unwrap();
        assert_eq!(base64_decode(ours).unwrap().len(), 44);
        assert_ne!(base64_decode(ours).unwrap(), vec![2u8; 44]);
        assert_eq!(
            choose(&offered[..2]).map(|c| c.suite),
            Some(Suite::Aes256CmHmacSha1_80)
        );
        assert!(choose(&offered[4..]).is_none());
    }

    #[test]
    fn base64_round_trips_and_keys_never_print() {
        for n in 0..50 {
            let v: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&v)).unwrap(), v);
        }
        let c = SdesCrypto::parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}")).unwrap();
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("89, 83") && printed.contains("redacted"),
            "{printed}"
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<SdesCrypto>(&json).unwrap(), c);
    }
}
