//! A circuit breaker for the upstream: after `failures` consecutive failures it opens and
//! refuses calls for `open_for`; then it lets exactly one probe through (half-open), which
//! closes it on success or opens it again on failure. It stops a failing cloud endpoint
//! from being hammered and from adding its timeout to every request.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::telemetry::metrics::METRICS;

/// The breaker's state, as `/stats` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct State {
    circuit: Circuit,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    opens: u64,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    open_for: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Breaker {
            failures: failures.max(1),
            open_for,
            state: Mutex::new(State { circuit: Circuit::Closed, consecutive_failures: 0, opened_at: None, opens: 0 }),
        }
    }

    /// May a call go through now? An open circuit past its time lets one probe through.
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.circuit {
            Circuit::Closed => true,
            Circuit::HalfOpen => false,
            Circuit::Open => {
                if s.opened_at.is_some_and(|t| t.elapsed() >= self.open_for) {
                    s.circuit = Circuit::HalfOpen;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// The call succeeded: close the circuit.
    pub fn success(&self) {
        let mut s = self.state.lock();
        if s.circuit != Circuit::Closed {
            tracing::info!("upstream recovered; circuit closed");
        }
        s.circuit = Circuit::Closed;
        s.consecutive_failures = 0;
        s.opened_at = None;
        METRICS.upstream_circuit_open.set(0.0);
    }

    /// The call failed: count it, and open the circuit at the threshold (or on a failed probe).
    pub fn failure(&self) {
        let mut s = self.state.lock();
        s.consecutive_failures += 1;
        if s.circuit == Circuit::HalfOpen || (s.circuit == Circuit::Closed && s.consecutive_failures >= self.failures) {
            s.circuit = Circuit::Open;
            s.opened_at = Some(Instant::now());
            s.opens += 1;
            METRICS.upstream_circuit_open.set(1.0);
            tracing::warn!(failures = s.consecutive_failures, open_s = self.open_for.as_secs_f64(), "upstream failing; circuit open");
        }
    }

    /// A probe that never happened (the request went elsewhere) must not hold the half-open slot.
    pub fn release_probe(&self) {
        let mut s = self.state.lock();
        if s.circuit == Circuit::HalfOpen {
            s.circuit = Circuit::Open;
        }
    }

    /// State, consecutive failures and how many times it opened.
    pub fn snapshot(&self) -> (Circuit, u32, u64) {
        let s = self.state.lock();
        let circuit = match s.circuit {
            Circuit::Open if s.opened_at.is_some_and(|t| t.elapsed() >= self.open_for) => Circuit::HalfOpen,
            c => c,
        };
        (circuit, s.consecutive_failures, s.opens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_probes_once_and_closes_on_success() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert!(b.allow());
        b.failure();
        assert!(b.allow(), "one failure is not enough");
        b.failure();
        assert!(!b.allow(), "open");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe after the open period");
        assert!(!b.allow(), "only one probe at a time");
        b.failure();
        assert!(!b.allow(), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert!(b.allow() && b.allow());
        assert_eq!(b.snapshot().0, Circuit::Closed);
    }
}
