//! Accept loops that outlive a shortage of file descriptors (EMFILE, ENFILE, ENOBUFS) without
//! spinning or flooding the log: the listener stays, each failure waits a little longer (up to
//! one second), and the log says so at the first failure, then at the 2nd, 4th, 8th ...

use std::time::Duration;

use tracing::{info, warn};

/// Back-off state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: &'static str,
    failures: u32,
}

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            failures: 0,
        }
    }

    /// An accept succeeded: the next failure starts from the shortest wait again.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                listener = self.listener,
                failures = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }

    /// How long to wait after the `failures`-th failure in a row.
    pub fn delay(failures: u32) -> Duration {
        FIRST_DELAY
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(MAX_DELAY)
    }

    /// An accept failed: logs (sparingly) and waits before the next attempt.
    pub async fn failed(&mut self, error: &std::io::Error) {
        self.failures = self.failures.saturating_add(1);
        if self.failures.is_power_of_two() {
            warn!(
                listener = self.listener,
                %error,
                failures = self.failures,
                "accept failed; retrying with back-off"
            );
        }
        tokio::time::sleep(Self::delay(self.failures)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_up_to_a_second() {
        assert_eq!(AcceptBackoff::delay(1), Duration::from_millis(10));
        assert_eq!(AcceptBackoff::delay(2), Duration::from_millis(20));
        assert_eq!(AcceptBackoff::delay(7), Duration::from_millis(640));
        assert_eq!(AcceptBackoff::delay(8), MAX_DELAY);
        assert_eq!(AcceptBackoff::delay(u32::MAX), MAX_DELAY);
    }
}
