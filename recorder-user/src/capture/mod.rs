//! Capture: loading the XDP program (`loader`) and draining its ring buffers (`ring`).
//!
//! Every record the XDP program writes becomes a [`CapturedPacket`] handed to a [`PacketSink`]
//! (the writers implement it). The sink is called on the capture task: it must not block.
//!
//! Restart without loss: with a pin directory, the maps and the XDP links are pinned in bpffs
//! under `<pin_dir>/<layout_version()>/`. `Capture::release_pinned` leaves them capturing while no
//! daemon runs; the next `Capture::load` adopts them (flows, counters, and the rings with their
//! unread records) and `attach` swaps its program into the pinned link atomically.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use recorder_ebpf::abi::RecordHeader;

/// One captured frame, borrowed from the ring buffer for the duration of the sink call.
#[derive(Clone, Copy, Debug)]
pub struct CapturedPacket<'a> {
    pub header: RecordHeader,
    /// The frame from its Ethernet header, `header.cap_len` bytes (may be cut to the snap length).
    pub frame: &'a [u8],
    /// Wall-clock arrival time (the kernel's monotonic stamp converted with [`MonoClock`]).
    pub wall: SystemTime,
    /// Ring buffer (≈ CPU) it came from.
    pub ring: usize,
}

impl CapturedPacket<'_> {
    /// The UDP payload (RTP/RTCP), possibly cut short by the snap length.
    pub fn payload(&self) -> &[u8] {
        self.frame
            .get(self.header.payload_offset as usize..)
            .unwrap_or(&[])
    }

    /// The frame was longer than the snap length.
    pub fn truncated(&self) -> bool {
        self.header.flags & recorder_ebpf::abi::RECORD_F_TRUNCATED != 0
    }
}

/// Receives captured packets. Implemented by the writers (and by tests).
pub trait PacketSink: Send + 'static {
    /// Called for every record, in ring order (per ring: kernel order, hence per flow in order
    /// when a flow's packets arrive on one CPU).
    fn packet(&mut self, packet: &CapturedPacket<'_>);
    /// Called after each drained batch: a good moment to flush buffers.
    fn batch_end(&mut self) {}
    /// False while the stages behind the sink are a bound behind: the consumer then stops
    /// taking records (they wait in the rings, which count what they cannot hold) instead of
    /// handing over packets that would have to be dropped.
    fn has_room(&self) -> bool {
        true
    }
    /// Notified when room may have come back (None: the consumer re-checks on its tick).
    fn room(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

/// Converts the kernel's CLOCK_MONOTONIC stamps (`bpf_ktime_get_ns`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct MonoClock {
    /// realtime - monotonic, in nanoseconds, sampled at construction.
    offset_ns: i128,
}

impl MonoClock {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real as i128 - mono as i128,
        }
    }

    /// Wall-clock time of a monotonic nanosecond stamp.
    pub fn to_wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    /// The current monotonic time in nanoseconds (same clock as the kernel stamps).
    pub fn monotonic_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub mod loader;
pub mod ring;
