//! A load generator for a running edgenode: a mixed workload (embed, classify, generate)
//! at a fixed concurrency (closed loop) or a fixed arrival rate (open loop) for a bounded
//! time, against 127.0.0.1 only. Prints status counts and latency percentiles per route.
//!
//! ```sh
//! cargo bench --bench load -- --url http://127.0.0.1:8080 --concurrency 32 --duration 20 \
//!     --mix embed=70,classify=10,generate=20
//! cargo bench --bench load -- --rate 50 --duration 30     # open loop: 50 requests/s
//! cargo bench --bench load -- --rate 20 --duration 1800 --interval 60 --pid 1234 \
//!     --mix embed=60,classify=10,generate=15,route=15      # a soak (benches/soak.sh)
//! ```
//!
//! `route` sends `model: "auto"` chat requests (the routing tier). With `--interval`, a
//! JSON line per interval reports its requests, 5xx, p50/p99 and (with `--pid`) the
//! daemon's resident memory, so a soak shows drift over time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;

struct Args {
    url: String,
    concurrency: usize,
    rate: f64,
    duration: Duration,
    mix: Vec<(String, u32)>,
    max_tokens: u32,
    interval: Option<Duration>,
    pid: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        concurrency: 16,
        rate: 0.0,
        duration: Duration::from_secs(20),
        mix: vec![("embed".into(), 70), ("classify".into(), 10), ("generate".into(), 20)],
        max_tokens: 16,
        interval: None,
        pid: None,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value()?,
            "--concurrency" => a.concurrency = value()?.parse().map_err(|e| format!("--concurrency: {e}"))?,
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => a.duration = Duration::from_secs_f64(value()?.parse().map_err(|e| format!("--duration: {e}"))?),
            "--max-tokens" => a.max_tokens = value()?.parse().map_err(|e| format!("--max-tokens: {e}"))?,
            "--interval" => a.interval = Some(Duration::from_secs_f64(value()?.parse().map_err(|e| format!("--interval: {e}"))?)),
            "--pid" => a.pid = Some(value()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "--mix" => {
                a.mix = value()?
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').ok_or(format!("--mix: {kv:?} is not route=weight"))?;
                        if !["embed", "classify", "generate", "route"].contains(&k) {
                            return Err(format!("--mix: unknown workload {k:?}"));
                        }
                        Ok((k.to_string(), v.parse::<u32>().map_err(|e| format!("--mix {k}: {e}"))?))
                    })
                    .collect::<Result<_, String>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let host = a.url.trim_start_matches("http://").split(['/', ':']).next().unwrap_or("");
    if !["127.0.0.1", "localhost", "[::1]"].contains(&host) || !a.url.starts_with("http://") {
        return Err(format!("refusing {}: this load generator only targets 127.0.0.1", a.url));
    }
    if a.mix.iter().all(|(_, w)| *w == 0) || a.concurrency == 0 {
        return Err("the mix needs a positive weight and concurrency must be at least 1".into());
    }
    Ok(a)
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<(String, String), u64>,
    latencies: BTreeMap<String, Vec<f64>>,
    /// This interval's latencies and statuses (all workloads), taken by the reporter.
    window: Vec<(f64, String)>,
}

/// A process's resident memory in MiB, from `/proc`.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

const SENTENCES: &[&str] = &[
    "What is the capital of France?",
    "Edge inference keeps small models close to users.",
    "Summarize the quarterly report and list every risk it names.",
    "A quick brown fox jumps over the lazy dog.",
    "Translate good morning into Spanish.",
];

async fn one(client: &reqwest::Client, a: &Args, n: u64, tally: &Mutex<Tally>) {
    let total: u32 = a.mix.iter().map(|(_, w)| w).sum();
    let mut pick = (n.wrapping_mul(2654435761) % total as u64) as u32;
    let kind = a
        .mix
        .iter()
        .find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .map(|(k, _)| k.as_str())
        .unwrap_or("embed");
    let text = SENTENCES[(n as usize) % SENTENCES.len()];
    let (path, body) = match kind {
        "classify" => ("/classify", json!({"inputs": text})),
        "generate" => ("/generate", json!({"prompt": text, "max_tokens": a.max_tokens, "temperature": 0})),
        "route" => (
            "/v1/chat/completions",
            json!({"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": a.max_tokens, "temperature": 0}),
        ),
        _ => ("/embed", json!({"inputs": text})),
    };
    let started = Instant::now();
    let status = match client.post(format!("{}{path}", a.url)).json(&body).send().await {
        Ok(r) => {
            let s = r.status().as_u16().to_string();
            let _ = r.bytes().await;
            s
        }
        Err(e) if e.is_timeout() => "timeout".into(),
        Err(_) => "connection_error".into(),
    };
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut t = tally.lock();
    if a.interval.is_some() {
        t.window.push((ms, status.clone()));
    }
    *t.statuses.entry((kind.to_string(), status)).or_default() += 1;
    t.latencies.entry(kind.to_string()).or_default().push(ms);
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("HTTP client");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + a.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    if let Some(every) = a.interval {
        let (tally, pid) = (tally.clone(), a.pid);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            while Instant::now() < deadline {
                tick.tick().await;
                let window = std::mem::take(&mut tally.lock().window);
                let mut ms: Vec<f64> = window.iter().map(|(m, _)| *m).collect();
                ms.sort_by(|a, b| a.total_cmp(b));
                let fivexx = window.iter().filter(|(_, s)| s.starts_with('5')).count();
                let failed = window.iter().filter(|(_, s)| s.as_str() != "200").count();
                let line = json!({
                    "t_s": started.elapsed().as_secs(),
                    "requests": window.len(),
                    "status_5xx": fivexx,
                    "not_200": failed,
                    "p50_ms": (pct(&ms, 0.5) * 10.0).round() / 10.0,
                    "p99_ms": (pct(&ms, 0.99) * 10.0).round() / 10.0,
                    "rss_mib": pid.and_then(rss_mib).map(|m| (m * 10.0).round() / 10.0),
                });
                println!("interval {line}");
            }
        }));
    }
    if a.rate > 0.0 {
        // Open loop: arrivals at a fixed rate, however long answers take.
        let gap = Duration::from_secs_f64(1.0 / a.rate);
        let mut next = tokio::time::Instant::now();
        let mut n = 0u64;
        while Instant::now() < deadline {
            tokio::time::sleep_until(next).await;
            next += gap;
            let (client, a, tally) = (client.clone(), a.clone(), tally.clone());
            tasks.push(tokio::spawn(async move { one(&client, &a, n, &tally).await }));
            n += 1;
        }
    } else {
        for _ in 0..a.concurrency {
            let (client, a, tally, counter) = (client.clone(), a.clone(), tally.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    one(&client, &a, n, &tally).await;
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = tally.lock();
    let total: u64 = t.statuses.values().sum();
    println!(
        "load: {} requests in {elapsed:.1} s ({:.1}/s), {}",
        total,
        total as f64 / elapsed,
        if a.rate > 0.0 { format!("open loop at {}/s", a.rate) } else { format!("{} concurrent clients", a.concurrency) }
    );
    println!("{:<10} {:<16} {:>8}", "workload", "status", "count");
    for ((kind, status), n) in &t.statuses {
        println!("{kind:<10} {status:<16} {n:>8}");
    }
    println!("{:<10} {:>9} {:>9} {:>9} {:>9}", "workload", "p50 ms", "p95 ms", "p99 ms", "max ms");
    for (kind, v) in &t.latencies {
        let mut v = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        println!("{kind:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", pct(&v, 0.5), pct(&v, 0.95), pct(&v, 0.99), v.last().copied().unwrap_or(0.0));
    }
}
