//! A small team of threads for the many short parallel regions of token generation.
//!
//! A decode step runs ~120 parallel regions (four matmuls per layer), each tens of
//! microseconds long. Handing each to a general-purpose pool costs a wake-up per region and
//! the helpers drift off to sleep in the serial gaps between them; measured, the second
//! core did a fraction of the work. Here helpers spin on a ticket counter for a short while
//! between regions (so the next region starts within nanoseconds) and park only when the
//! engine has been idle for a while. The caller works too, so `threads` counts it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long helpers spin for the next region before parking.
const SPIN: Duration = Duration::from_micros(200);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// `epoch << 40 | tasks << 20 | next index`: one atomic, so a late helper can never take
    /// a task index of one region and run it with another region's job.
    ticket: AtomicU64,
    /// The current region's job (valid while its tasks are not all done).
    job: Mutex<Option<JobPtr>>,
    done: AtomicUsize,
    /// A task panicked in this region (the caller re-raises it once every task is done).
    panicked: AtomicBool,
    stop: AtomicBool,
    parked: Mutex<u64>,
    wake: Condvar,
}

#[derive(Clone, Copy)]
struct JobPtr(Job);
// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every task has finished.
unsafe impl Send for JobPtr {}

const INDEX_BITS: u64 = 20;
const TASKS_BITS: u64 = 20;
const MASK: u64 = (1 << INDEX_BITS) - 1;

fn unpack(t: u64) -> (u64, u64, u64) {
    (t >> (INDEX_BITS + TASKS_BITS), (t >> INDEX_BITS) & MASK, t & MASK)
}

/// A team of `threads` (the caller plus `threads - 1` helpers).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// The last region's epoch. Held for the whole of a region, so regions never overlap
    /// even when several threads share the team; uncontended it costs ~20 ns against
    /// regions tens of microseconds long.
    region: Mutex<u64>,
}

impl Team {
    /// Starts `threads - 1` helper threads named `name-N`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        let mut helpers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            helpers.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || helper(s))?);
        }
        Ok(Team { shared, helpers, region: Mutex::new(0) })
    }

    /// Threads working on each region, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(0..tasks)` across the team and returns when every task has finished. A
    /// caller that finds the team busy (another thread's region, or a region started from
    /// inside a task) runs its tasks itself, in order.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        let mut region = match self.region.try_lock() {
            Ok(guard) if !self.helpers.is_empty() && tasks > 1 => guard,
            Err(std::sync::TryLockError::Poisoned(p)) if !self.helpers.is_empty() && tasks > 1 => p.into_inner(),
            _ => {
                (0..tasks).for_each(f);
                return;
            }
        };
        assert!((tasks as u64) < (1 << TASKS_BITS), "too many tasks in one region");
        let s = &*self.shared;
        let epoch = region.wrapping_add(1) & ((1 << (64 - INDEX_BITS - TASKS_BITS)) - 1);
        *region = epoch;
        // SAFETY (lifetime): the pointer is only dereferenced for task indices of this region,
        // and this function does not return before all of them are done.
        let ptr: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(JobPtr(ptr));
        s.done.store(0, Ordering::SeqCst);
        s.panicked.store(false, Ordering::SeqCst);
        s.ticket.store(epoch << (INDEX_BITS + TASKS_BITS) | (tasks as u64) << INDEX_BITS, Ordering::SeqCst);
        if *s.parked.lock().unwrap_or_else(|p| p.into_inner()) > 0 {
            s.wake.notify_all();
        }
        // Work alongside the helpers.
        loop {
            let (_, n, i) = unpack(s.ticket.fetch_add(1, Ordering::SeqCst));
            if i >= n {
                break;
            }
            // A panic must not unwind out of here while helpers still run tasks that borrow
            // `f`: catch it, finish the region, then re-raise.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i as usize))).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
            s.done.fetch_add(1, Ordering::SeqCst);
        }
        while s.done.load(Ordering::SeqCst) < tasks {
            std::hint::spin_loop();
        }
        if s.panicked.load(Ordering::SeqCst) {
            panic!("a parallel task panicked");
        }
    }
}

fn helper(s: Arc<Shared>) {
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let (e, n, i) = unpack(s.ticket.load(Ordering::SeqCst));
        if e != seen && i < n {
            // Tasks left: take them one by one. A ticket taken here can belong to a newer
            // region than the one seen above (the caller may have finished that one and
            // published the next meanwhile): it is then that region's task and must run, with
            // that region's job, or the caller would wait for it forever.
            let mut job: Option<(u64, JobPtr)> = None;
            loop {
                let (e2, n2, i2) = unpack(s.ticket.fetch_add(1, Ordering::SeqCst));
                if i2 >= n2 {
                    break;
                }
                if job.map(|(je, _)| je) != Some(e2) {
                    job = s.job.lock().unwrap_or_else(|p| p.into_inner()).map(|j| (e2, j));
                }
                if let Some((_, JobPtr(f))) = job {
                    // SAFETY: a valid task index of region `e2` means `run` for that region is
                    // still waiting for this task, so its job (the one published now) is alive.
                    let run = std::panic::AssertUnwindSafe(|| unsafe { (*f)(i2 as usize) });
                    if std::panic::catch_unwind(run).is_err() {
                        s.panicked.store(true, Ordering::SeqCst);
                    }
                }
                s.done.fetch_add(1, Ordering::SeqCst);
                seen = e2;
            }
            idle_since = Instant::now();
            continue;
        }
        // Reading the clock on every spin would cost more than the spin itself.
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(256) || idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        // Idle for a while: park until the next region (or stop).
        let mut parked = s.parked.lock().unwrap_or_else(|p| p.into_inner());
        *parked += 1;
        let current = s.ticket.load(Ordering::SeqCst);
        let (e, n, i) = unpack(current);
        let work_waiting = e != seen && i < n;
        if !work_waiting && !s.stop.load(Ordering::SeqCst) {
            parked = s.wake.wait_timeout(parked, Duration::from_millis(50)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        *parked -= 1;
        drop(parked);
        idle_since = Instant::now();
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_task_is_reraised_after_the_region() {
        let team = Team::new(2, "test").unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(16, &|i| {
                if i == 5 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        team.run(16, &|_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 16, "the team still works");
    }

    #[test]
    fn threads_sharing_a_team_and_nested_regions_each_run_every_task_once() {
        let team = Team::new(3, "test").unwrap();
        std::thread::scope(|scope| {
            for t in 0..4usize {
                let team = &team;
                scope.spawn(move || {
                    for round in 0..2_000usize {
                        let tasks = 2 + (round + t) % 9;
                        let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                        team.run(tasks, &|i| {
                            hits[i].fetch_add(1, Ordering::SeqCst);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
                    }
                });
            }
        });
        let count = AtomicUsize::new(0);
        team.run(4, &|_| {
            team.run(3, &|_| {
                count.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(count.load(Ordering::SeqCst), 12, "a region inside a task runs inline");
    }

    #[test]
    fn back_to_back_regions_never_lose_a_task() {
        // Regions short enough that helpers straddle them (the bug this guards against:
        // a helper taking the next region's first ticket and dropping it).
        let team = Team::new(2, "test").unwrap();
        for round in 0..20_000usize {
            let tasks = 2 + round % 5;
            let count = AtomicUsize::new(0);
            team.run(tasks, &|_| {
                count.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(count.load(Ordering::SeqCst), tasks);
        }
    }

    #[test]
    fn every_task_runs_exactly_once_across_many_regions() {
        let team = Team::new(3, "test").unwrap();
        for tasks in [1usize, 2, 7, 100, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                team.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
            }
        }
        // After parking, the next region still runs.
        std::thread::sleep(Duration::from_millis(20));
        let count = AtomicUsize::new(0);
        team.run(64, &|_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 64);
    }
}
