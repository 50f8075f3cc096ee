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
    /// The answer is a permit to settle with `success` or `failure`; a permit dropped
    /// unsettled (the caller's future was cancelled: a client that went away, the request
    /// timeout) gives the half-open slot back, so the next call probes again.
    pub fn permit(&self) -> Option<Permit<'_>> {
        let mut s = self.state.lock();
        let probe = match s.circuit {
            Circuit::Closed => false,
            Circuit::HalfOpen => return None,
            Circuit::Open if self.due(&s) => {
                s.circuit = Circuit::HalfOpen;
                true
            }
            Circuit::Open => return None,
        };
        Some(Permit { breaker: self, probe, settled: false })
    }

    /// The call succeeded: close the circuit.
    fn success(&self) {
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
    fn failure(&self) {
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

    /// An open circuit has waited `open_for`: the next call is its probe.
    fn due(&self, s: &State) -> bool {
        s.opened_at.is_some_and(|t| t.elapsed() >= self.open_for)
    }

    /// A probe that never finished must not hold the half-open slot: the circuit is open
    /// again with its old opening time, so the next call is the next probe.
    fn release_probe(&self) {
        let mut s = self.state.lock();
        if s.circuit == Circuit::HalfOpen {
            s.circuit = Circuit::Open;
        }
    }

    /// Would a call go through now (closed, or open and due for its probe)?
    pub fn accepting(&self) -> bool {
        let s = self.state.lock();
        match s.circuit {
            Circuit::Closed => true,
            Circuit::HalfOpen => false,
            Circuit::Open => self.due(&s),
        }
    }

    /// State, consecutive failures and how many times it opened.
    pub fn snapshot(&self) -> (Circuit, u32, u64) {
        let s = self.state.lock();
        let circuit = match s.circuit {
            Circuit::Open if self.due(&s) => Circuit::HalfOpen,
            c => c,
        };
        (circuit, s.consecutive_failures, s.opens)
    }
}

/// Leave to make one call through a breaker; see `Breaker::permit`.
#[must_use = "settle the permit with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    /// This call is the half-open probe.
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    /// The call succeeded.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.success();
    }

    /// The call failed.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.failure();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            tracing::info!("the upstream probe was cancelled before it finished; the next call probes again");
            self.breaker.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_probes_once_and_closes_on_success() {
        let b = Breaker::new(2, Duration::from_millis(30));
        b.permit().expect("closed").failure();
        b.permit().expect("one failure is not enough").failure();
        assert!(b.permit().is_none(), "open");
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.permit().expect("one probe after the open period");
        assert!(b.permit().is_none(), "only one probe at a time");
        probe.failure();
        assert!(b.permit().is_none(), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(40));
        b.permit().expect("the next probe").success();
        let (one, two) = (b.permit(), b.permit());
        assert!(one.is_some() && two.is_some(), "closed: every call goes through");
        assert_eq!(b.snapshot().0, Circuit::Closed);
    }

    #[test]
    fn a_probe_dropped_unsettled_gives_the_slot_back() {
        let b = Breaker::new(1, Duration::from_millis(30));
        b.permit().expect("closed").failure();
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.permit().expect("the probe");
        assert!(b.permit().is_none(), "half-open while the probe runs");
        drop(probe); // its request was cancelled
        let next = b.permit().expect("the next call probes at once");
        next.success();
        assert_eq!(b.snapshot().0, Circuit::Closed);
        assert_eq!(b.snapshot().2, 1, "a cancelled probe is not a failure");
    }

    #[test]
    fn closed_permits_dropped_unsettled_change_nothing() {
        let b = Breaker::new(1, Duration::from_secs(60));
        drop(b.permit());
        assert_eq!(b.snapshot(), (Circuit::Closed, 0, 0));
    }
}
