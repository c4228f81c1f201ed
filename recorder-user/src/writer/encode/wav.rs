//! Multi-channel 16-bit PCM WAV addressed by frame position, kept in memory around the present
//! and handed to the file thread in chunks.
//!
//! Samples are placed at their frame position (from RTP timestamps, see `rtp::Aligner`), so
//! packets may arrive in any order. The frames of the last [`WINDOW_MS`] before the newest
//! arrival stay in memory (a packet's position is never more than `Aligner::MAX_DRIFT_MS`
//! before its arrival); older frames are written with `pwrite` by the file thread, a chunk of
//! about [`CHUNK_MS`] at a time. Audio for a frame already written is cut (counted as out of
//! range by the caller); frames nobody wrote are silence (a hole in the file reads as zeros).
//! The header's sizes are rewritten with every chunk and at the end.

use std::{
    fs::OpenOptions,
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use crate::writer::fileio::WavChunk;

pub(crate) const HEADER_LEN: u64 = 44;
const BYTES_PER_SAMPLE: u64 = 2;
/// Frames kept in memory behind the newest arrival: longer than the furthest a packet may be
/// placed before its arrival (1 s), plus reordering between rings.
pub(crate) const WINDOW_MS: u64 = 1500;
/// Frames are handed to the file thread about this much at a time (64 KB of 8 kHz stereo;
/// see `pcap::CHUNK` for why not less).
pub(crate) const CHUNK_MS: u64 = 2000;

pub(crate) struct WavWriter {
    pub path: PathBuf,
    channels: u16,
    rate: u32,
    /// First frame held in `window`; frames before it were handed to the file thread.
    base: u64,
    /// Interleaved frames from `base` (zero: silence).
    window: Vec<i16>,
    /// Frames in the recording (the WAV's length once finished).
    frames: u64,
    /// The first frame count whose end is on a page boundary, and how often that recurs.
    page_phase: Option<(u64, u64)>,
}

/// See [`WavWriter::page_aligned`].
fn page_phase(channels: u16) -> Option<(u64, u64)> {
    use crate::writer::fileio::PAGE;
    let fb = channels as u64 * BYTES_PER_SAMPLE;
    // The boundaries recur every PAGE / gcd(fb, PAGE) frames, if at all.
    let period = PAGE >> fb.trailing_zeros().min(12);
    (0..period)
        .find(|m| (HEADER_LEN + m * fb).is_multiple_of(PAGE))
        .map(|first| (first, period))
}

impl WavWriter {
    /// A WAV to be created at `path` by the file thread (with [`WavWriter::empty_header`]);
    /// nothing touches the filesystem here.
    pub(crate) fn new(path: &Path, channels: u16, rate: u32) -> Self {
        Self {
            path: path.to_path_buf(),
            channels: channels.max(1),
            rate,
            base: 0,
            window: Vec::new(),
            frames: 0,
            page_phase: page_phase(channels.max(1)),
        }
    }

    /// The header of the WAV before any frame.
    pub(crate) fn empty_header(&self) -> [u8; HEADER_LEN as usize] {
        header(self.channels, self.rate, 0)
    }

    /// Goes on writing a WAV a handover finished with `frames` frames (checked: length and
    /// format as expected).
    pub(crate) fn open(path: &Path, channels: u16, rate: u32, frames: u64) -> io::Result<Self> {
        let channels = channels.max(1);
        let len = HEADER_LEN + frames * channels as u64 * BYTES_PER_SAMPLE;
        let mut f = OpenOptions::new().read(true).open(path)?;
        let actual = f.metadata()?.len();
        let expected = header(channels, rate, (len - HEADER_LEN) as u32);
        let mut d = [0u8; HEADER_LEN as usize];
        // The size fields may lag (the header is rewritten per chunk); the format must match.
        let same = actual == len
            && f.read_exact(&mut d).is_ok()
            && d[..4] == expected[..4]
            && d[8..40] == expected[8..40];
        if !same {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not the WAV this recording had", path.display()),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            channels,
            rate,
            base: frames,
            window: Vec::new(),
            frames,
            page_phase: page_phase(channels),
        })
    }

    pub(crate) fn channels(&self) -> u16 {
        self.channels
    }

    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    fn frame_bytes(&self) -> u64 {
        self.channels as u64 * BYTES_PER_SAMPLE
    }

    /// Frames in the recording so far.
    pub(crate) fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames waiting in memory.
    pub(crate) fn window_frames(&self) -> u64 {
        (self.window.len() / self.channels as usize) as u64
    }

    /// First frame still in memory.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// Largest number of frames a RIFF file can hold (32-bit sizes).
    fn max_frames(&self) -> u64 {
        (u32::MAX as u64 - HEADER_LEN) / self.frame_bytes()
    }

    /// Places `samples` on `channel` from frame `start`. Returns how many were placed: fewer
    /// when the first ones fall before the window (already written) or past the RIFF limit.
    pub(crate) fn write(
        &mut self,
        channel: u16,
        start: u64,
        samples: impl ExactSizeIterator<Item = i16>,
    ) -> usize {
        if channel >= self.channels {
            return 0;
        }
        let skip = self.base.saturating_sub(start);
        let start = start.max(self.base);
        let n = (samples.len() as u64)
            .saturating_sub(skip)
            .min(self.max_frames().saturating_sub(start)) as usize;
        if n == 0 {
            return 0;
        }
        let ch = self.channels as usize;
        let first = (start - self.base) as usize;
        let end = first + n;
        if self.window.len() < end * ch {
            self.window.resize(end * ch, 0);
        }
        // Frame by frame (a strided iterator over the whole window did not compile to a
        // plain loop: the costliest line of the packet stage).
        let channel = channel as usize;
        for (frame, s) in self.window[first * ch..end * ch]
            .chunks_exact_mut(ch)
            .zip(samples.skip(skip as usize))
        {
            frame[channel] = s;
        }
        self.frames = self.frames.max(start + n as u64);
        n
    }

    /// Makes the recording at least `frames` long (silence).
    pub(crate) fn extend_to(&mut self, frames: u64) {
        self.frames = self.frames.max(frames.min(self.max_frames()));
    }

    /// Hands the frames before `cut` to the file (they leave memory); `None` when there are
    /// none. With `keep`, every frame in memory is written but stays there, so later packets
    /// may still change them (a sync: the file then holds everything recorded so far).
    pub(crate) fn take_chunk(
        &mut self,
        cut: u64,
        keep: bool,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Option<WavChunk> {
        let held = self.window_frames();
        let (write, forget) = if keep {
            (held, 0)
        } else {
            let cut = self.page_aligned(cut).unwrap_or(cut);
            if cut <= self.base {
                return None;
            }
            // Past what is held, the frames are silence: skipped (a hole reads as zeros), and
            // the recording is that long at least.
            ((cut - self.base).min(held), cut - self.base)
        };
        let ch = self.channels as usize;
        let frames = &self.window[..write as usize * ch];
        let mut bytes = buffer(frames.len() * 2);
        // One copy of the whole run (a sample at a time cost more than the packet stage's
        // every other WAV work at 10 000 recordings).
        #[cfg(target_endian = "little")]
        bytes.extend_from_slice(bytemuck::cast_slice(frames));
        #[cfg(not(target_endian = "little"))]
        for s in frames {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        let offset = HEADER_LEN + self.base * self.frame_bytes();
        let written_to = self.base + write;
        if forget > 0 {
            self.window.drain(..(forget.min(held) as usize) * ch);
            self.base += forget;
            self.frames = self.frames.max(self.base);
        }
        if bytes.is_empty() {
            return None;
        }
        Some(WavChunk {
            path: self.path.clone(),
            offset,
            bytes,
            header: header(
                self.channels,
                self.rate,
                (written_to * self.frame_bytes()) as u32,
            ),
        })
    }

    /// The last frame at or before `cut` whose end lies on a page boundary of the file (None:
    /// this frame size never ends on one).
    ///
    /// Chunks that start and end on page boundaries are written whole pages at a time: no page
    /// is written twice, and the page cache can use large folios. 4 000 files appended round
    /// robin cost 35-40 % less CPU in 64 KiB writes on page boundaries than in writes a few
    /// bytes off them. The frames after the boundary stay in memory for the next chunk.
    fn page_aligned(&self, cut: u64) -> Option<u64> {
        let (first, period) = self.page_phase?;
        (cut >= first).then(|| cut - (cut - first) % period)
    }

    /// The file's final length and header (every frame, silence up to `frames`), for after the
    /// last chunk.
    pub(crate) fn final_len_and_header(&self) -> (u64, [u8; HEADER_LEN as usize]) {
        let data = self.frames * self.frame_bytes();
        (
            HEADER_LEN + data,
            header(self.channels, self.rate, data as u32),
        )
    }
}

pub(crate) fn header(channels: u16, rate: u32, data_len: u32) -> [u8; HEADER_LEN as usize] {
    let block_align = channels * BYTES_PER_SAMPLE as u16;
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(36u32.saturating_add(data_len)).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&channels.to_le_bytes());
    h[24..28].copy_from_slice(&rate.to_le_bytes());
    h[28..32].copy_from_slice(&(rate * block_align as u32).to_le_bytes());
    h[32..34].copy_from_slice(&block_align.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    h
}

/// What [`repair`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WavRepair {
    pub channels: u16,
    pub rate: u32,
    pub frames: u64,
    pub old_len: u64,
    pub new_len: u64,
}

/// Fixes a WAV left by a crash: keeps everything up to the last frame that was written (the
/// larger of the header's last flushed size and the last non-zero frame; the zero tail of the
/// mapping is cut), cuts to a whole frame and rewrites the header sizes.
pub(crate) fn repair(path: &Path) -> io::Result<WavRepair> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let old_len = data.len() as u64;
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if data.len() < HEADER_LEN as usize || &data[0..4] != b"RIFF" || &data[36..40] != b"data" {
        return Err(bad("not a WAV written by the recorder"));
    }
    let channels = u16::from_le_bytes([data[22], data[23]]);
    let rate = u32::from_le_bytes([data[24], data[25], data[26], data[27]]);
    if channels == 0 {
        return Err(bad("WAV header says 0 channels"));
    }
    let fb = channels as usize * BYTES_PER_SAMPLE as usize;
    let body = &data[HEADER_LEN as usize..];
    let flushed = u32::from_le_bytes([data[40], data[41], data[42], data[43]]) as usize;
    let last_nonzero = body.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let frames = (flushed.max(last_nonzero).min(body.len())).div_ceil(fb);
    let frames = frames.min(body.len() / fb) as u64;
    let data_len = frames * fb as u64;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header(channels, rate, data_len as u32))?;
    let new_len = HEADER_LEN + data_len;
    file.set_len(new_len)?;
    file.sync_all()?;
    Ok(WavRepair {
        channels,
        rate,
        frames,
        old_len,
        new_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks handed over at ripe frames end on a page boundary of the file (the frames after
    /// it wait for the next chunk), follow each other, and fall back to the exact cut where a
    /// frame size never ends on one.
    #[test]
    fn chunks_end_on_page_boundaries_where_frames_allow() {
        for channels in [1u16, 2, 3, 4] {
            let fb = u64::from(channels) * BYTES_PER_SAMPLE;
            let mut w = WavWriter::new(Path::new("unused.wav"), channels, 8000);
            for c in 0..channels {
                w.write(c, 0, std::iter::repeat_n(1_i16, 40_000));
            }
            let mut at = HEADER_LEN;
            for cut in [16_000_u64, 32_000, 40_000] {
                let chunk = w.take_chunk(cut, false, Vec::with_capacity).unwrap();
                assert_eq!(
                    chunk.offset, at,
                    "{channels} channels: chunks follow each other"
                );
                let end = chunk.offset + chunk.bytes.len() as u64;
                let exact = HEADER_LEN + cut * fb;
                if channels == 4 {
                    assert_eq!(end, exact, "8-byte frames never end on a page: exact cut");
                } else {
                    assert_eq!(
                        end % 4096,
                        0,
                        "{channels} channels: cut {cut} ends at {end}"
                    );
                    assert!(
                        end <= exact && exact - end < 4096 * fb,
                        "at most a period short"
                    );
                }
                assert_eq!(w.base(), (end - HEADER_LEN) / fb);
                assert_eq!(w.window_frames(), 40_000 - w.base(), "the rest stays");
                at = end;
            }
        }
    }
}
