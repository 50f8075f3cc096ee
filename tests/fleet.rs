//! Budgets that hold: spend and limits survive a restart (and a `kill -9`, less the last
//! `state.flush_ms`), and with `[fleet] store` they bind every node sharing a real Redis —
//! within the bounds the README states — also while Redis is down, and after it lost its data.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const EMBED_ONLY: &str = "[[models]]\nname = \"minilm\"\nkind = \"embed\"\n";

/// Keys every node of these tests knows: `app` limited per minute, `metered` by a daily
/// budget, `batch` and `idle` for load that only tier budgets and leases see.
fn keys_config() -> String {
    [
        "[[auth.keys]]\nname = \"app\"\nkey_env = \"FLEET_KEY_APP\"\nrequests_per_minute = 30\n",
        "[[auth.keys]]\nname = \"metered\"\nkey_env = \"FLEET_KEY_METERED\"\ndaily_budget_usd = 3.0\n",
        "[[auth.keys]]\nname = \"batch\"\nkey_env = \"FLEET_KEY_BATCH\"\n",
        "[[auth.keys]]\nname = \"idle\"\nkey_env = \"FLEET_KEY_IDLE\"\nrequests_per_minute = 1000\n",
    ]
    .join("\n")
}

fn key_env() -> Vec<(String, String)> {
    ["APP", "METERED", "BATCH", "IDLE"].iter().map(|k| (format!("FLEET_KEY_{k}"), format!("sk-fleet-{}", k.to_lowercase()))).collect()
}

fn bearer(key: &str) -> String {
    format!("Bearer sk-fleet-{key}")
}

/// POSTs with a key; (status, body).
fn post(d_url: &str, key: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
    let r = client().post(d_url).header("authorization", bearer(key)).json(body).send()?;
    let status = r.status().as_u16();
    Ok((status, r.json().unwrap_or(Value::Null)))
}

fn stats(d: &Daemon) -> Value {
    let r = client().get(d.url("/stats")).header("authorization", bearer("batch")).send().unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

/// Seconds into the current minute.
fn second_of_minute() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() % 60
}

/// Waits until a minute has at least `needed` seconds left, so per-minute counts stay in one.
fn wait_for_minute_room(needed: u64) {
    while 60 - second_of_minute() < needed {
        std::thread::sleep(Duration::from_millis(200));
    }
}

const EDGE_PRICE: f64 = 1000.0; // USD per 1M tokens: $0.001 per token
const CLOUD_PRICE: f64 = 1_000_000.0; // $1 per token
const CLOUD_BUDGET: f64 = 10_000.0;
const METERED_BUDGET: f64 = 3.0;
const LEASE_SHARE: f64 = 0.1;
const OFFLINE_SHARE: f64 = 0.1;

fn start_node(redis: &RedisServer, cloud: &Daemon, state: Option<std::path::PathBuf>) -> Daemon {
    let config = format!(
        "[upstream]\nbase_url = \"http://{}/v1\"\nmodel = \"smollm2\"\nfirst_byte_timeout_ms = 30000\n\n\
         [costs]\nedge_usd_per_1m_tokens = {EDGE_PRICE:?}\ncloud_usd_per_1m_tokens = {CLOUD_PRICE:?}\ncloud_daily_budget_usd = {CLOUD_BUDGET:?}\n\n\
         [fleet]\nstore = \"{}\"\nlease_share = {LEASE_SHARE}\noffline_share = {OFFLINE_SHARE}\nlease_ttl_s = 3\nsync_ms = 500\n\n{}\n{EMBED_ONLY}",
        cloud.addr,
        redis.url(),
        keys_config()
    );
    let d = Daemon::start(Options { config: Some(config), env: key_env(), state_dir: state, ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

/// What the client saw answered: cost per node, and the time of each answer.
#[derive(Default)]
struct Seen {
    cost: Vec<f64>,
    answered_at: Vec<Vec<Instant>>,
    max_cost: f64,
    refusals: Vec<String>,
}

/// Loads `nodes` with `per_node` threads each until every thread was refused three times
/// in a row, sent `most` requests, or `stop` is set; `body` per request; the answer's usage
/// priced at `price`.
fn load(urls: &[String], per_node: usize, most: usize, key: &str, body: Value, price: f64, stop: Arc<AtomicBool>) -> Seen {
    let seen = Arc::new(Mutex::new(Seen { cost: vec![0.0; urls.len()], answered_at: vec![Vec::new(); urls.len()], ..Default::default() }));
    let threads: Vec<_> = (0..urls.len() * per_node)
        .map(|t| {
            let (url, seen, stop, body, key) = (urls[t % urls.len()].clone(), seen.clone(), stop.clone(), body.clone(), key.to_string());
            let node = t % urls.len();
            std::thread::spawn(move || {
                let mut refused = 0;
                let mut sent = 0;
                while refused < 3 && sent < most && !stop.load(Ordering::SeqCst) {
                    sent += 1;
                    match post(&url, &key, &body) {
                        Ok((200, answer)) => {
                            refused = 0;
                            let tokens = answer["usage"]["total_tokens"].as_u64().expect("usage.total_tokens") as f64;
                            let mut s = seen.lock().unwrap();
                            let cost = tokens * price / 1e6;
                            s.cost[node] += cost;
                            s.max_cost = s.max_cost.max(cost);
                            s.answered_at[node].push(Instant::now());
                        }
                        Ok((429, answer)) => {
                            refused += 1;
                            seen.lock().unwrap().refusals.push(answer["error"]["code"].as_str().unwrap_or("").to_string());
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Ok((status, answer)) => panic!("unexpected {status}: {answer}"),
                        // The node was killed under this thread.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap()
}

fn chat() -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3, "temperature": 0})
}

fn embed() -> Value {
    json!({"model": "minilm", "input": "how far is the nearest edge region"})
}

fn fleet_scope(d: &Daemon, scope: &str) -> Value {
    stats(d)["fleet"]["scopes"][scope].clone()
}

/// Waits until every node's view of `scope` has the fleet total equal to the sum of each
/// node's own (a sync after the last request); returns that total.
fn settled_total(nodes: &[&Daemon], scope: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<Value> = nodes.iter().map(|d| fleet_scope(d, scope)).collect();
        let own: f64 = views.iter().map(|v| v["this_node"].as_f64().unwrap_or(0.0)).sum();
        let totals: Vec<f64> = views.iter().map(|v| v["fleet_total"].as_f64().unwrap_or(-1.0)).collect();
        if totals.iter().all(|t| (t - own).abs() < 1e-6) {
            return own;
        }
        assert!(Instant::now() < deadline, "the fleet's totals {totals:?} never matched the nodes' own sum {own}: {views:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every node reports the same fleet total for `scope` (each synced after the
/// last request); returns it.
fn agreed_total(nodes: &[&Daemon], scope: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let totals: Vec<f64> = nodes.iter().map(|d| fleet_scope(d, scope)["fleet_total"].as_f64().unwrap_or(-1.0)).collect();
        if totals.iter().all(|t| (t - totals[0]).abs() < 1e-6) {
            return totals[0];
        }
        assert!(Instant::now() < deadline, "the nodes never agreed on the fleet's total: {totals:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three nodes share one Redis: a key's per-minute limit and the cloud's daily budget hold
/// across all three under load at once; `kill -9` of one loses at most its lease, and its
/// restart restores and reports its spend; with Redis killed the nodes keep answering
/// within the offline bound, and after Redis comes back empty they reconcile exactly;
/// a graceful stop gives the node's leases back.
#[test]
fn three_nodes_share_budgets_and_limits_through_redis() {
    let mut redis = RedisServer::start();
    let cloud = start_cloud(None);
    let state3 = tempfile::tempdir().unwrap();
    let n1 = start_node(&redis, &cloud, None);
    let mut n2 = start_node(&redis, &cloud, None);
    let mut n3 = start_node(&redis, &cloud, Some(state3.path().to_path_buf()));
    let urls = |path: &str, nodes: &[&Daemon]| -> Vec<String> { nodes.iter().map(|d| d.url(path)).collect() };

    // 1. requests_per_minute = 30 for key `app`, 3 nodes × 20 requests at once.
    wait_for_minute_room(25);
    let accepted = Arc::new(Mutex::new(0u64));
    let handles: Vec<_> = urls("/v1/embeddings", &[&n1, &n2, &n3])
        .into_iter()
        .map(|url| {
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (status, body) = post(&url, "app", &embed()).unwrap();
                    match status {
                        200 => *accepted.lock().unwrap() += 1,
                        429 => assert_eq!(body["error"]["code"], "rate_limited", "{body}"),
                        other => panic!("{other}: {body}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let accepted = *accepted.lock().unwrap();
    // Leases are reserved in the store, so the fleet admits no more than the limit; unused
    // leases (at most ceil(0.1 × 30) = 3 per node) may leave some of it unused.
    println!("requests_per_minute = 30 over 3 nodes: {accepted} of 60 accepted");
    assert!((21..=30).contains(&accepted), "accepted {accepted} of a fleet-wide limit of 30");

    // 2. The cloud's daily budget, 3 nodes × 2 threads, and node 3 killed -9 halfway.
    let stop3 = Arc::new(AtomicBool::new(false));
    let cloud_urls = urls("/v1/chat/completions", &[&n1, &n2, &n3]);
    let loader = {
        let stop = stop3.clone();
        std::thread::spawn(move || load(&cloud_urls, 2, usize::MAX, "batch", chat(), CLOUD_PRICE, stop))
    };
    // Halfway: node 3's own spend (its ledger) passes a third of the budget's share.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let spent = stats(&n3)["routing"]["ledger"]["rolling_day"]["cloud"]["cost_usd"].as_f64().unwrap();
        if spent >= CLOUD_BUDGET / 6.0 {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 spent only {spent} in two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = Instant::now();
    n3.kill9();
    let seen = loader.join().unwrap();
    let spent: f64 = seen.cost.iter().sum();
    let lease = LEASE_SHARE * CLOUD_BUDGET;
    // In flight: six requests admitted within the limit may each finish over it.
    let in_flight = 6.0 * seen.max_cost;
    println!(
        "cloud budget ${CLOUD_BUDGET} over 3 nodes, node 3 killed -9 halfway: spent ${spent} (bound: budget + lease ${lease} + in flight ${in_flight}); refusals {:?}",
        seen.refusals.iter().take(3).collect::<Vec<_>>()
    );
    assert!(spent <= CLOUD_BUDGET + lease + in_flight, "spent {spent}");
    assert!(spent >= CLOUD_BUDGET - 3.0 * lease - in_flight, "the fleet stopped early: {spent}");
    assert!(seen.refusals.iter().all(|c| c == "budget_exceeded"), "{:?}", seen.refusals);

    // Node 3 restarts on its state: it restores its spend (less at most the last flush) and
    // the fleet's total becomes exactly the nodes' own.
    let n3_seen = seen.cost[2];
    n3 = start_node(&redis, &cloud, Some(state3.path().to_path_buf()));
    let restored = stats(&n3)["routing"]["ledger"]["rolling_day"]["cloud"]["cost_usd"].as_f64().unwrap();
    let late = seen.answered_at[2].iter().filter(|t| killed_at.duration_since(**t) < Duration::from_millis(250 + 250)).count();
    println!("node 3: answered ${n3_seen} before kill -9, restored ${restored} ({late} answers in the last 0.5 s before the kill)");
    // Two requests may have been counted whose answers the kill cut off.
    assert!(restored <= n3_seen + 2.0 * seen.max_cost + 1e-6, "restored {restored} of {n3_seen}");
    assert!(restored >= n3_seen - late as f64 * seen.max_cost - 1e-6, "restored {restored} of {n3_seen}");
    // The store keeps the most any report of a minute said, so what node 3 reported before
    // the kill and lost from its last flush stays counted: the fleet's total is at least the
    // nodes' own and at most what the clients saw (plus two answers the kill cut off).
    let total = agreed_total(&[&n1, &n2, &n3], "cost:tier:cloud");
    let own = seen.cost[0] + seen.cost[1] + restored;
    println!("fleet total after node 3's restart: ${total} (nodes' own ${own}, clients saw ${spent})");
    assert!(total >= own - 1e-6 && total <= spent + 2.0 * seen.max_cost + 1e-6, "fleet total {total}, nodes' own {own}, seen {spent}");
    let (status, body) = post(&n1.url("/v1/chat/completions"), "batch", &chat()).unwrap();
    assert_error(status, &body, 429, "budget_exceeded");

    // 3. Redis killed: the nodes serve on their leases plus offline_share, say so, and stay ready.
    let metered = |nodes: &[&Daemon]| urls("/v1/embeddings", nodes);
    let first = load(&metered(&[&n1, &n2, &n3]), 1, 30, "metered", embed(), EDGE_PRICE, Arc::new(AtomicBool::new(false)));
    let before: f64 = first.cost.iter().sum();
    assert!(before > 0.0 && before < METERED_BUDGET * 0.6, "spent {before} of the key's budget before Redis went down");
    redis.kill();
    let offline = load(&metered(&[&n1, &n2, &n3]), 2, usize::MAX, "metered", embed(), EDGE_PRICE, Arc::new(AtomicBool::new(false)));
    let offline_spent: f64 = offline.cost.iter().sum();
    let bound = 3.0 * (LEASE_SHARE * METERED_BUDGET + OFFLINE_SHARE * METERED_BUDGET) + 6.0 * offline.max_cost;
    println!("Redis down: the key spent ${offline_spent} more (bound ${bound}) after ${before}");
    assert!(offline_spent <= bound, "offline spend {offline_spent} over the bound {bound}");
    assert!(offline_spent > 0.0, "the nodes stopped serving when Redis went down");
    assert!(offline.refusals.iter().all(|c| c == "budget_exceeded"), "{:?}", offline.refusals);
    for d in [&n1, &n2, &n3] {
        assert_eq!(get_json(d, "/readyz").0, 200);
        let s = stats(d);
        assert_eq!(s["fleet"]["reachable"], false, "{}", s["fleet"]);
        let info: Value = client().get(d.url("/info")).header("authorization", bearer("batch")).send().unwrap().json().unwrap();
        assert_eq!(info["fleet"]["reachable"], false, "{}", info["fleet"]);
        let metrics = client().get(d.url("/metrics")).header("authorization", bearer("batch")).send().unwrap().text().unwrap();
        assert!(metrics.contains("edgenode_fleet_store_up 0"), "{metrics}");
    }

    // Redis is back, empty (a new epoch): every node reports its window again; the fleet's
    // total is exactly what the nodes spent, offline spend included, nothing counted twice.
    let redis = RedisServer::start_on(redis.port);
    let total = settled_total(&[&n1, &n2, &n3], "cost:key:metered");
    let client_total = before + offline_spent;
    println!("after Redis came back: fleet total ${total}, client saw ${client_total}");
    assert!((total - client_total).abs() < 1e-6, "reconciled {total}, spent {client_total}");
    for d in [&n1, &n2, &n3] {
        assert_eq!(stats(d)["fleet"]["reachable"], true);
    }

    // 4. A graceful stop gives the node's leases back.
    let node2 = stats(&n2)["fleet"]["node"].as_str().unwrap().to_string();
    let (status, _) = post(&n2.url("/v1/embeddings"), "idle", &embed()).unwrap();
    assert_eq!(status, 200);
    let leases = "{edgenode}:requests:key:idle:leases";
    assert_eq!(redis.cli(&["HGET", leases, &node2]).trim(), "100", "node 2 holds a lease of ceil(0.1 × 1000)");
    assert!(n2.stop(Duration::from_secs(30)).success());
    assert_eq!(redis.cli(&["HGET", leases, &node2]).trim(), "", "the stopped node's lease is back");
}

/// One node, no Redis: a key's daily budget, the users' spend and the ledger survive a
/// graceful restart exactly, and a `kill -9` under load loses at most the last
/// `state.flush_ms` of accounting (and one commit).
#[test]
fn a_single_node_keeps_its_budget_across_restarts_and_kill_9() {
    let state = tempfile::tempdir().unwrap();
    let config = format!("[costs]\nedge_usd_per_1m_tokens = {EDGE_PRICE:?}\n\n[state]\nflush_ms = 250\n\n{}\n{EMBED_ONLY}", keys_config());
    let start = || {
        let d = Daemon::start(Options {
            config: Some(config.clone()),
            env: key_env(),
            state_dir: Some(state.path().to_path_buf()),
            ..Default::default()
        });
        d.wait_ready(Duration::from_secs(120));
        d
    };
    let mut d = start();
    let spent = load(
        &[d.url("/v1/embeddings")],
        2,
        usize::MAX,
        "metered",
        json!({"model": "minilm", "input": "a budget that holds", "user": "ann"}),
        EDGE_PRICE,
        Arc::new(AtomicBool::new(false)),
    );
    let total: f64 = spent.cost.iter().sum();
    assert!(total >= METERED_BUDGET && total <= METERED_BUDGET + 2.0 * spent.max_cost, "spent {total}");
    let before = stats(&d)["accounts"].clone();
    assert!(d.stop(Duration::from_secs(30)).success());

    let mut d = start();
    let after = stats(&d)["accounts"].clone();
    assert_eq!(after["keys"]["metered"]["rolling_day_cost_usd"], before["keys"]["metered"]["rolling_day_cost_usd"]);
    assert_eq!(after["keys"]["metered"]["since_start"], before["keys"]["metered"]["since_start"]);
    assert_eq!(after["users"]["ann"], before["users"]["ann"]);
    let (status, body) = post(&d.url("/v1/embeddings"), "metered", &embed()).unwrap();
    assert_error(status, &body, 429, "budget_exceeded");

    // kill -9 under load: what was answered more than flush_ms (+ one commit) before the
    // kill is restored.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (url, stop) = (d.url("/v1/embeddings"), stop.clone());
        std::thread::spawn(move || load(&[url], 2, usize::MAX, "batch", embed(), EDGE_PRICE, stop))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    d.kill9();
    stop.store(true, Ordering::SeqCst);
    let seen = loader.join().unwrap();
    let answered = seen.answered_at[0].len() as u64;
    let d = start();
    let restored = stats(&d)["accounts"]["keys"]["batch"]["since_start"]["requests"].as_u64().unwrap();
    let lost = answered.saturating_sub(restored);
    // A kill during a commit loses that commit too: flush_ms plus two commits' time, which a
    // busy disk can stretch; half a second of slack.
    let in_window = seen.answered_at[0].iter().filter(|t| killed_at.duration_since(**t) < Duration::from_millis(250 + 500)).count() as u64;
    let rate = answered as f64 / 1.5;
    println!(
        "kill -9 under load: {answered} answered, {restored} restored, {lost} lost ≈ {:.0} ms of accounting at {rate:.0} req/s",
        lost as f64 / rate * 1000.0
    );
    assert!(restored <= answered, "restored more than was answered");
    assert!(lost <= in_window, "lost {lost} answers; only {in_window} came within flush_ms + 500 ms of the kill");
}
