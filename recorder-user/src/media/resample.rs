//! A stream's decoded audio at the WAV's rate, through `rubato`'s synchronous FFT resampler.
//!
//! The resampler runs on fixed 10 ms chunks and keeps its filter state between packets, so a
//! contiguous stream resamples without seams. Its output lags its input by a fixed delay: the
//! first frames after a (re)start are dropped, and positions are those of the input. A packet
//! that does not follow on (loss, a gap, reordering) restarts it at the packet's position.

use rubato::{audioadapter_buffers::direct::InterleavedSlice, Fft, FixedSync, Resampler as _};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ResampleError {
    #[error("resampler: {0}")]
    Construct(#[from] rubato::ResamplerConstructionError),
    #[error("resampler: {0}")]
    Process(#[from] rubato::ResampleError),
}

pub struct Resampler {
    inner: Fft<f32>,
    from: u32,
    to: u32,
    /// Input not processed yet (less than a chunk).
    pending: Vec<f32>,
    /// Output frames still to drop after a restart (the filter's delay).
    drop: usize,
    /// Output position (frames at `to`) of the next output frame, and where the next packet
    /// must start to follow on.
    next_out: i64,
    next_in: Option<i64>,
    out: Vec<f32>,
}

impl Resampler {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let inner = Fft::<f32>::new(
            from as usize,
            to as usize,
            from as usize / 100,
            1,
            FixedSync::Input,
        )?;
        let drop = inner.output_delay();
        Ok(Self {
            inner,
            from,
            to,
            pending: Vec::new(),
            drop,
            next_out: 0,
            next_in: None,
            out: Vec::new(),
        })
    }

    pub fn rates(&self) -> (u32, u32) {
        (self.from, self.to)
    }

    /// Feeds the samples of one packet whose first sample belongs at output frame `pos`;
    /// calls `emit(position, samples)` for every run of output ready.
    pub fn push(
        &mut self,
        pos: i64,
        samples: &[i16],
        mut emit: impl FnMut(i64, &[i16]),
    ) -> Result<(), ResampleError> {
        // One input sample's worth of tolerance: positions are rounded to output frames.
        let step = i64::from(self.to.div_ceil(self.from));
        if self.next_in.is_none_or(|next| (pos - next).abs() > step) {
            self.inner.reset();
            self.pending.clear();
            self.drop = self.inner.output_delay();
            self.next_out = pos;
        }
        self.next_in = Some(pos + samples.len() as i64 * i64::from(self.to) / i64::from(self.from));
        self.pending
            .extend(samples.iter().map(|&s| f32::from(s) / 32768.0));
        let chunk = self.inner.input_frames_next();
        let mut used = 0;
        while self.pending.len() - used >= chunk {
            let n_out = self.inner.output_frames_next();
            self.out.resize(n_out, 0.0);
            let input = InterleavedSlice::new(&self.pending[used..used + chunk], 1, chunk)
                .expect("one channel, chunk frames");
            let mut output = InterleavedSlice::new_mut(&mut self.out[..], 1, n_out)
                .expect("one channel, n_out frames");
            let (_, written) = self.inner.process_into_buffer(&input, &mut output, None)?;
            used += chunk;
            let skip = self.drop.min(written);
            self.drop -= skip;
            let ready: Vec<i16> = self.out[skip..written]
                .iter()
                .map(|&s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16)
                .collect();
            if !ready.is_empty() {
                emit(self.next_out, &ready);
                self.next_out += ready.len() as i64;
            }
        }
        self.pending.drain(..used);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::codec::tests::{tone, tone_ratio};

    #[test]
    fn upsamples_a_contiguous_stream_in_place_and_restarts_after_a_gap() {
        let mut r = Resampler::new(8000, 48000).unwrap();
        let input = tone(400.0, 8000, 8000);
        let mut wav = vec![0i16; 70000];
        let mut place = |pos: i64, s: &[i16]| {
            let pos = pos as usize;
            wav[pos..pos + s.len()].copy_from_slice(s);
        };
        for (i, packet) in input.chunks(160).enumerate() {
            r.push(i as i64 * 960, packet, &mut place).unwrap();
        }
        // A packet after a 100 ms gap starts at its own position.
        r.push(48000 + 4800, &input[..1600], &mut place).unwrap();
        assert!(tone_ratio(&wav[2000..46000], 400.0, 48000) > 0.95);
        // Output lags by the filter delay, not more: the last 20 ms of the first run and the
        // first frames are dropped, the rest is in place.
        assert!(wav[45000..47000].iter().any(|&s| s.abs() > 4000));
        assert!(
            wav[48000..52800].iter().all(|&s| s == 0),
            "the gap stays silent"
        );
        assert!(tone_ratio(&wav[53500..58000], 400.0, 48000) > 0.9);
        // In phase with the input: a zero crossing of the input at sample 20 (400 Hz: every
        // 10 samples) lands within a few output frames of 120.
        let crossing = (100..140)
            .find(|&i| wav[i] <= 0 && wav[i + 1] > 0 || wav[i] >= 0 && wav[i + 1] < 0)
            .unwrap();
        assert!((crossing as i64 - 120).abs() <= 3, "crossing at {crossing}");
    }
}
