//! G.711 decoding (ITU-T G.711, the classic table-free algorithm as in Sun's `g711.c`).
//!
//! No maintained Rust crate for G.711 was available to the build, and the algorithm is a few
//! lines; the decoders are turned into 256-entry tables at compile time.

/// μ-law (PCMU) byte to 16-bit linear PCM.
#[cfg(test)]
pub(crate) fn ulaw(b: u8) -> i16 {
    ULAW[b as usize]
}

/// A-law (PCMA) byte to 16-bit linear PCM.
#[cfg(test)]
pub(crate) fn alaw(b: u8) -> i16 {
    ALAW[b as usize]
}

/// Decoding tables, indexed by the G.711 byte.
pub(crate) static ULAW: [i16; 256] = table(false);
pub(crate) static ALAW: [i16; 256] = table(true);

const fn table(alaw: bool) -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if alaw {
            alaw_decode(i as u8)
        } else {
            ulaw_decode(i as u8)
        };
        i += 1;
    }
    t
}

const fn ulaw_decode(u: u8) -> i16 {
    const BIAS: i32 = 0x84;
    let u = !u;
    let mut t = (((u & 0x0f) as i32) << 3) + BIAS;
    t <<= (u & 0x70) >> 4;
    (if u & 0x80 != 0 { BIAS - t } else { t - BIAS }) as i16
}

const fn alaw_decode(a: u8) -> i16 {
    let a = a ^ 0x55;
    let mut t = ((a & 0x0f) as i32) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

/// Encoders, only for tests (the recorder never encodes).
#[cfg(test)]
pub(crate) mod encode {
    const SEG_END: [i32; 8] = [0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF];

    fn seg(v: i32) -> usize {
        SEG_END.iter().position(|&e| v <= e).unwrap_or(8)
    }

    pub(crate) fn ulaw(pcm: i16) -> u8 {
        const BIAS: i32 = 0x84;
        let mut v = pcm as i32 >> 2;
        let mask = if v < 0 {
            v = -v;
            0x7F
        } else {
            0xFF
        };
        let v = (v + (BIAS >> 2)).min(8159);
        let s = seg(v << 2) as i32;
        let u = if s >= 8 {
            0x7F
        } else {
            (s << 4) | ((v >> (s + 1)) & 0xF)
        };
        (u ^ mask) as u8
    }

    pub(crate) fn alaw(pcm: i16) -> u8 {
        let mut v = pcm as i32 >> 3;
        let mask = if v >= 0 {
            0xD5
        } else {
            v = -v - 1;
            0x55
        };
        let s = seg(v << 3) as i32;
        let a = if s >= 8 {
            0x7F
        } else {
            let mut a = s << 4;
            a |= if s < 2 {
                (v >> 1) & 0xF
            } else {
                (v >> s) & 0xF
            };
            a
        };
        (a ^ mask) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_code_points() {
        // Silence codes and full scale from the G.711 tables.
        assert_eq!(ulaw(0xFF), 0);
        assert_eq!(ulaw(0x7F), 0);
        assert_eq!(ulaw(0x00), -32124);
        assert_eq!(ulaw(0x80), 32124);
        assert_eq!(alaw(0xD5), 8);
        assert_eq!(alaw(0x55), -8);
        assert_eq!(alaw(0xAA), 32256);
        assert_eq!(alaw(0x2A), -32256);
    }

    #[test]
    fn round_trip_is_close() {
        for pcm in (-32000i32..32000).step_by(97) {
            let pcm = pcm as i16;
            let u = ulaw(encode::ulaw(pcm)) as i32;
            let a = alaw(encode::alaw(pcm)) as i32;
            // Quantisation error is at most half a step: ~3% of the value, plus the small-signal step.
            let tol = (pcm as i32).abs() / 16 + 16;
            assert!((u - pcm as i32).abs() <= tol, "ulaw {pcm} -> {u}");
            assert!((a - pcm as i32).abs() <= tol, "alaw {pcm} -> {a}");
        }
    }
}
