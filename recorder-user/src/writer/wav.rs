//! Multi-channel 16-bit PCM WAV written through an [`MmapFile`], addressed by frame position.
//!
//! Samples are placed at their frame position (from RTP timestamps), so packets may arrive in any
//! order; frames nobody wrote are the zero tail of the mapping, i.e. silence. The header's sizes
//! are rewritten on every flush and at the end.

use std::{
    fs::OpenOptions,
    io::{self, Read, Seek, SeekFrom, Write},
    path::Path,
};

use super::mmapfile::MmapFile;

pub(crate) const HEADER_LEN: u64 = 44;
const BYTES_PER_SAMPLE: u64 = 2;

pub(crate) struct WavWriter {
    out: MmapFile,
    channels: u16,
    rate: u32,
}

impl WavWriter {
    /// `floor`: see [`MmapFile::create`].
    pub(crate) fn create(path: &Path, channels: u16, rate: u32, floor: u64) -> io::Result<Self> {
        let mut w = Self {
            out: MmapFile::create(path, floor)?,
            channels: channels.max(1),
            rate,
        };
        let h = w.header(0);
        w.out.write_at(0, &h)?;
        Ok(w)
    }

    /// Goes on writing a WAV a handover finished with `frames` frames (checked: length and
    /// format as expected).
    pub(crate) fn open(
        path: &Path,
        channels: u16,
        rate: u32,
        frames: u64,
        floor: u64,
    ) -> io::Result<Self> {
        let channels = channels.max(1);
        let len = HEADER_LEN + frames * channels as u64 * BYTES_PER_SAMPLE;
        let out = MmapFile::open(path, len, floor)?;
        let expected = header(channels, rate, (len - HEADER_LEN) as u32);
        // The size fields may lag (the header is rewritten on flush); the format must match.
        let d = out.bytes();
        if d.len() < HEADER_LEN as usize || d[..4] != expected[..4] || d[8..40] != expected[8..40] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not the WAV this recording had", path.display()),
            ));
        }
        Ok(Self {
            out,
            channels,
            rate,
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

    /// Frames in the file so far.
    pub(crate) fn frames(&self) -> u64 {
        (self.out.len() - HEADER_LEN) / self.frame_bytes()
    }

    /// Largest number of frames a RIFF file can hold (32-bit sizes).
    fn max_frames(&self) -> u64 {
        (u32::MAX as u64 - HEADER_LEN) / self.frame_bytes()
    }

    /// Writes `samples` on `channel` starting at frame `start`. Returns how many were written
    /// (fewer when the RIFF size limit is reached); on a disk error nothing is written.
    pub(crate) fn write(
        &mut self,
        channel: u16,
        start: u64,
        samples: impl ExactSizeIterator<Item = i16>,
    ) -> io::Result<usize> {
        let n = (samples.len() as u64).min(self.max_frames().saturating_sub(start)) as usize;
        if n == 0 || channel >= self.channels {
            return Ok(0);
        }
        let fb = self.frame_bytes() as usize;
        let off = HEADER_LEN + start * fb as u64;
        let region = self
            .out
            .slice_mut(off, (n - 1) * fb + 2 * (channel as usize + 1))?;
        let at = 2 * channel as usize;
        // One frame per chunk (the last one may stop right after this channel).
        for (frame, s) in region.chunks_mut(fb).zip(samples.take(n)) {
            frame[at..at + 2].copy_from_slice(&s.to_le_bytes());
        }
        // The slice may end mid-frame (last channel not reached): round the length up.
        self.extend_to(start + n as u64)?;
        Ok(n)
    }

    /// Makes the file at least `frames` long (silence).
    pub(crate) fn extend_to(&mut self, frames: u64) -> io::Result<()> {
        let frames = frames.min(self.max_frames());
        let end = HEADER_LEN + frames * self.frame_bytes();
        if end > self.out.len() {
            self.out.slice_mut(end - 1, 1)?;
        }
        Ok(())
    }

    fn header(&self, data_len: u64) -> [u8; HEADER_LEN as usize] {
        header(self.channels, self.rate, data_len as u32)
    }

    /// Rewrites the header sizes for the frames written so far, then starts writeback.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let h = self.header(self.frames() * self.frame_bytes());
        self.out.write_at(0, &h)?;
        self.out.flush_async()
    }

    pub(crate) fn finish(mut self) -> io::Result<()> {
        let h = self.header(self.frames() * self.frame_bytes());
        self.out.write_at(0, &h)?;
        self.out.finish()
    }
}

fn header(channels: u16, rate: u32, data_len: u32) -> [u8; HEADER_LEN as usize] {
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
