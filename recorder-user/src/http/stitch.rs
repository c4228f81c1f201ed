//! One WAV of a whole interaction: each segment's WAV mixed down to mono and placed at its
//! wall-clock start (frame 0 of a recording's WAV is its start), silence between segments.
//! Channels and overlapping segments add up, saturating, so that every voice stays at its level.

use std::path::Path;

use super::api::ApiError;

/// The recorder writes 16-bit PCM at this rate.
pub const RATE: u32 = 8000;
const HEADER_LEN: usize = 44;
/// Longest interaction stitched (the result is built in memory: 2 bytes a frame).
pub const MAX_FRAMES: u64 = RATE as u64 * 4 * 3600;

/// The mono mix of one of the recorder's WAV files (a live one is read as far as it goes).
pub fn mono(path: &Path) -> Result<Vec<i16>, ApiError> {
    let data = std::fs::read(path)
        .map_err(|e| ApiError::Unavailable(format!("reading {}: {e}", path.display())))?;
    mono_of(&data, &path.display().to_string())
}

/// The mono mix of a WAV the recorder wrote (`what` names it in errors).
pub fn mono_of(data: &[u8], what: &str) -> Result<Vec<i16>, ApiError> {
    let bad = |why: &str| ApiError::Unavailable(format!("{what}: {why}"));
    if data.len() < HEADER_LEN
        || &data[0..4] != b"RIFF"
        || &data[8..12] != b"WAVE"
        || &data[36..40] != b"data"
    {
        return Err(bad("not a WAV written by the recorder"));
    }
    let channels = u16::from_le_bytes([data[22], data[23]]) as usize;
    let rate = u32::from_le_bytes([data[24], data[25], data[26], data[27]]);
    let bits = u16::from_le_bytes([data[34], data[35]]);
    if channels == 0 || rate != RATE || bits != 16 {
        return Err(bad("not 16-bit PCM at 8 kHz"));
    }
    Ok(data[HEADER_LEN..]
        .chunks_exact(channels * 2)
        .map(|frame| {
            frame.chunks_exact(2).fold(0i16, |mix, s| {
                mix.saturating_add(i16::from_le_bytes([s[0], s[1]]))
            })
        })
        .collect())
}

/// Mixes `segments` (frames from the interaction's start, samples) into one mono WAV file.
pub fn stitch(segments: &[(u64, Vec<i16>)]) -> Result<Vec<u8>, ApiError> {
    let frames = segments
        .iter()
        .map(|(at, s)| at + s.len() as u64)
        .max()
        .unwrap_or(0);
    if frames > MAX_FRAMES {
        return Err(ApiError::Unavailable(format!(
            "the interaction lasts {} s: longer than {} s to stitch",
            frames / RATE as u64,
            MAX_FRAMES / RATE as u64
        )));
    }
    let mut mix = vec![0i16; frames as usize];
    for (at, samples) in segments {
        for (out, s) in mix[*at as usize..].iter_mut().zip(samples) {
            *out = out.saturating_add(*s);
        }
    }
    let data_len = (mix.len() * 2) as u32;
    let mut wav = Vec::with_capacity(HEADER_LEN + mix.len() * 2);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&RATE.to_le_bytes());
    wav.extend_from_slice(&(RATE * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in mix {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    Ok(wav)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(wav: &[u8]) -> Vec<i16> {
        wav[HEADER_LEN..]
            .chunks_exact(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]))
            .collect()
    }

    #[test]
    fn segments_land_at_their_offsets_with_silence_between() {
        let wav = stitch(&[(0, vec![1, 2, 3]), (5, vec![7, 8]), (1, vec![10, i16::MAX])]).unwrap();
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(wav[40..44].try_into().unwrap()), 14);
        assert_eq!(samples(&wav), [1, 12, i16::MAX, 0, 0, 7, 8]);
    }

    #[test]
    fn stereo_recordings_mix_down_to_mono() {
        let dir = std::env::temp_dir().join(format!("recorder-stitch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.wav");
        // A stereo WAV as the recorder writes it: frames (100, -30) and (i16::MAX, 5), and a
        // torn last frame of a live file.
        let mut wav = stitch(&[]).unwrap();
        wav[22] = 2;
        for s in [100i16, -30, i16::MAX, 5, 9] {
            wav.extend_from_slice(&s.to_le_bytes());
        }
        std::fs::write(&path, &wav).unwrap();
        assert_eq!(mono(&path).unwrap(), [70, i16::MAX]);
        std::fs::write(&path, b"RIFF....not a wav at all, not at all, really").unwrap();
        assert!(matches!(mono(&path), Err(ApiError::Unavailable(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
