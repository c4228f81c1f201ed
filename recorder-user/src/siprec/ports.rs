//! Local RTP port allocation with a reuse cool-down.
//!
//! Every allocation reserves an even RTP port and the odd port above it for RTCP, whether or not
//! the stream uses RTCP now: a later re-INVITE may drop `a=rtcp-mux`, and a pair that never
//! overlaps another call's keeps the XDP flow keys unambiguous. Released ports rest for
//! `cooldown` before reuse, so late packets of one call never land in another's recording; free
//! ports are reused oldest-released first, which stretches that gap further.

use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, Instant},
};

/// Hands out even RTP ports (RTCP = RTP + 1) from `lo..=hi`.
#[derive(Debug)]
pub struct PortAllocator {
    /// Ready to hand out, least recently used first.
    free: VecDeque<u16>,
    /// Released, waiting for the cool-down to pass, in release order.
    cooling: VecDeque<(Instant, u16)>,
    in_use: HashSet<u16>,
    cooldown: Duration,
    capacity: usize,
}

impl PortAllocator {
    /// A range `lo..=hi`; only pairs `(p, p + 1)` with `p` even and both inside the range count.
    /// An empty or inverted range gives an allocator with no capacity.
    pub fn new(lo: u16, hi: u16, cooldown: Duration) -> Self {
        let first = lo.saturating_add(lo % 2);
        let free: VecDeque<u16> = (first..hi)
            .step_by(2)
            .filter(|p| p.checked_add(1).is_some_and(|rtcp| rtcp <= hi))
            .collect();
        let capacity = free.len();
        Self {
            free,
            cooling: VecDeque::new(),
            in_use: HashSet::new(),
            cooldown,
            capacity,
        }
    }

    /// An even RTP port whose pair is free and has not been released within `cooldown` of `now`;
    /// `None` when the range is exhausted (caller answers 503). The RTCP port `p + 1` is always
    /// reserved with it (see the module docs), so `_need_rtcp` does not change the result.
    pub fn allocate(&mut self, now: Instant, _need_rtcp: bool) -> Option<u16> {
        while let Some(&(released, port)) = self.cooling.front() {
            if now.saturating_duration_since(released) < self.cooldown {
                break;
            }
            self.cooling.pop_front();
            self.free.push_back(port);
        }
        let port = self.free.pop_front()?;
        self.in_use.insert(port);
        Some(port)
    }

    /// Returns `port` (the RTP port given by [`allocate`](Self::allocate)); it becomes available
    /// again `cooldown` after `now`. Unknown or already released ports are ignored, so a double
    /// release cannot hand the same port to two calls.
    pub fn release(&mut self, now: Instant, port: u16) {
        if self.in_use.remove(&port) {
            self.cooling.push_back((now, port));
        }
    }

    /// Ports cooling down with how long ago each was released, oldest first (for a handover:
    /// `Instant`s do not outlive the process).
    pub fn cooling(&self, now: Instant) -> Vec<(u16, Duration)> {
        self.cooling
            .iter()
            .map(|&(released, port)| (port, now.saturating_duration_since(released)))
            .collect()
    }

    /// An allocator for a restarted daemon: `in_use` are the ports its restored sessions hold,
    /// `cooling` what [`cooling`](Self::cooling) gave the previous one. Ports outside the range
    /// (it was reconfigured) are left alone: the sessions keep them, the allocator never hands
    /// them out.
    pub fn restore(
        lo: u16,
        hi: u16,
        cooldown: Duration,
        now: Instant,
        in_use: &[u16],
        cooling: &[(u16, Duration)],
    ) -> Self {
        let mut ports = Self::new(lo, hi, cooldown);
        for &port in in_use {
            if let Some(i) = ports.free.iter().position(|&p| p == port) {
                ports.free.remove(i);
                ports.in_use.insert(port);
            }
        }
        for &(port, ago) in cooling {
            if let Some(i) = ports.free.iter().position(|&p| p == port) {
                ports.free.remove(i);
                // Too far back for this clock: count the cool-down from now (longer, safe).
                let released = now.checked_sub(ago).unwrap_or(now);
                ports.cooling.push_back((released, port));
            }
        }
        ports
    }

    /// Moves free `ports` to the cool-down queue, released at `now` (ports in use or already
    /// cooling are left as they are).
    pub fn cool_down(&mut self, now: Instant, ports: &[u16]) {
        let wanted: HashSet<u16> = ports.iter().copied().collect();
        let mut moved = Vec::new();
        self.free.retain(|p| {
            let keep = !wanted.contains(p);
            if !keep {
                moved.push(*p);
            }
            keep
        });
        self.cooling.extend(moved.into_iter().map(|p| (now, p)));
    }

    /// Pairs currently allocated.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Total pairs in the range.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pairs [`allocate`](Self::allocate) could hand out at `now` (free, or cooled down).
    pub fn available(&self, now: Instant) -> usize {
        // Cooling is in release order: the cooled-down ones are a prefix.
        let cooled = self
            .cooling
            .iter()
            .take_while(|(released, _)| now.saturating_duration_since(*released) >= self.cooldown)
            .count();
        self.free.len() + cooled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn available_counts_free_and_cooled_down_pairs() {
        let t0 = Instant::now();
        let mut ports = PortAllocator::new(20000, 20007, COOL);
        assert_eq!(ports.available(t0), 4);
        let a = ports.allocate(t0, true).unwrap();
        let _b = ports.allocate(t0, true).unwrap();
        assert_eq!(ports.available(t0), 2);
        ports.release(t0, a);
        assert_eq!(ports.available(t0), 2, "cooling");
        assert_eq!(ports.available(t0 + COOL), 3, "cooled down");
    }

    #[test]
    fn allocates_even_pairs_inside_range() {
        let now = Instant::now();
        let mut ports = PortAllocator::new(40001, 40008, COOL);
        // 40001 is odd: pairs are 40002/3, 40004/5, 40006/7; 40008 has no room for RTCP.
        assert_eq!(ports.capacity(), 3);
        let got: Vec<u16> = std::iter::from_fn(|| ports.allocate(now, true)).collect();
        assert_eq!(got, vec![40002, 40004, 40006]);
        assert_eq!(ports.in_use(), 3);
        assert_eq!(ports.allocate(now, false), None);
    }

    #[test]
    fn ports_of_crashed_calls_cool_down_before_reuse() {
        let t0 = Instant::now();
        let mut ports = PortAllocator::new(40000, 40005, COOL);
        // The crashed daemon's calls held 40000 and 40004; 40002 was free.
        ports.cool_down(t0, &[40000, 40004, 41000]);
        assert_eq!(ports.allocate(t0, true), Some(40002));
        assert_eq!(ports.allocate(t0 + COOL / 2, true), None);
        assert_eq!(ports.allocate(t0 + COOL, true), Some(40000));
        assert_eq!(ports.allocate(t0 + COOL, true), Some(40004));
    }

    #[test]
    fn released_port_rests_for_cooldown() {
        let t0 = Instant::now();
        let mut ports = PortAllocator::new(40000, 40003, COOL);
        let a = ports.allocate(t0, true).unwrap();
        let b = ports.allocate(t0, true).unwrap();
        assert_ne!(a, b);
        ports.release(t0, a);
        assert_eq!(ports.in_use(), 1);
        assert_eq!(
            ports.allocate(t0 + COOL - Duration::from_millis(1), true),
            None
        );
        assert_eq!(ports.allocate(t0 + COOL, true), Some(a));
    }

    #[test]
    fn oldest_released_port_is_reused_first() {
        let t0 = Instant::now();
        let mut ports = PortAllocator::new(40000, 40005, Duration::ZERO);
        let a = ports.allocate(t0, true).unwrap();
        let b = ports.allocate(t0, true).unwrap();
        let c = ports.allocate(t0, true).unwrap();
        ports.release(t0, b);
        ports.release(t0 + Duration::from_secs(1), a);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(ports.allocate(later, true), Some(b));
        assert_eq!(ports.allocate(later, true), Some(a));
        assert_eq!(ports.allocate(later, true), None);
        assert_eq!(ports.in_use(), 3);
        let _ = c;
    }

    #[test]
    fn double_and_unknown_release_are_ignored() {
        let t0 = Instant::now();
        let mut ports = PortAllocator::new(40000, 40003, Duration::ZERO);
        let a = ports.allocate(t0, true).unwrap();
        ports.release(t0, a);
        ports.release(t0, a);
        ports.release(t0, 12345);
        let x = ports.allocate(t0, true).unwrap();
        let y = ports.allocate(t0, true).unwrap();
        assert_ne!(x, y);
        assert_eq!(ports.allocate(t0, true), None);
    }

    #[test]
    fn restored_allocator_keeps_ports_in_use_and_cooling() {
        let t0 = Instant::now();
        let mut old = PortAllocator::new(40000, 40007, COOL);
        let a = old.allocate(t0, true).unwrap();
        let b = old.allocate(t0, true).unwrap();
        old.release(t0, b);
        let later = t0 + Duration::from_secs(10);
        let cooling = old.cooling(later);
        assert_eq!(cooling, vec![(b, Duration::from_secs(10))]);

        let t1 = later + Duration::from_secs(1);
        let mut new = PortAllocator::restore(40000, 40007, COOL, t1, &[a, 60000], &cooling);
        assert_eq!(new.in_use(), 1, "out-of-range port ignored");
        let got: Vec<u16> = std::iter::from_fn(|| new.allocate(t1, true)).collect();
        assert!(!got.contains(&a) && !got.contains(&b), "{got:?}");
        assert_eq!(got.len(), 2);
        // b was released 10 s before the handover: 20 s of cool-down are left.
        assert_eq!(new.allocate(t1 + Duration::from_secs(19), true), None);
        assert_eq!(new.allocate(t1 + Duration::from_secs(20), true), Some(b));
    }

    #[test]
    fn empty_and_inverted_ranges() {
        let now = Instant::now();
        assert_eq!(PortAllocator::new(5000, 4000, COOL).capacity(), 0);
        assert_eq!(PortAllocator::new(5000, 5000, COOL).capacity(), 0);
        let mut top = PortAllocator::new(65534, 65535, COOL);
        assert_eq!(top.capacity(), 1);
        assert_eq!(top.allocate(now, true), Some(65534));
    }
}
