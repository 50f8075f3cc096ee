//! edgenode's own benchmark harness: starts the real daemon and measures it over HTTP, the
//! way a client sees it. `benches/compare.sh` runs it beside the baselines (sentence-
//! transformers, llama.cpp) on the same machine and prints the ratios.
//!
//!     cargo bench --bench edge -- [embed] [generate] [structured] [bandwidth] [cache] [--config FILE]
//!         [--model NAME] [--embed-model NAME] [--template chatml|zephyr] [--long-repeats N]
//!
//! `--model` is the generate model (default `smollm2`), `--template` the chat template its
//! prompts are written in (benches/prompts.json, shared with the llama.cpp baseline), and
//! `--long-repeats` the length of the prompt-processing prompt. `bandwidth` measures this
//! machine's memory read bandwidth with a streaming read (what decode at this size is bound
//! by). `structured` measures the decode cost of `response_format` (a JSON schema) against
//! the same chat unconstrained. `cache` (a config with `[cache] enabled`) measures a cache
//! hit's latency over HTTP and what the cache gains on a chat workload where half the
//! requests repeat an earlier one, against the same workload sent with `Cache-Control:
//! no-store`. Prints one `key=value` line per measurement (machine-readable).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Daemon {
    child: Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the daemon: this build's binary, or `--bin PATH` (another build, for same-run A/B).
fn start(config: Option<&str>, bin: Option<&str>) -> Daemon {
    let mut cmd = Command::new(bin.unwrap_or(env!("CARGO_BIN_EXE_edgenode")));
    cmd.current_dir(root()).args(["serve", "--addr", "127.0.0.1:0"]);
    if let Some(c) = config {
        cmd.args(["--config", c]);
    }
    cmd.env("EDGENODE_LOG__FORMAT", "json").env("RUST_LOG", "warn,edgenode=info");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn edgenode");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "listening" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(120)).expect("edgenode did not start");
    let d = Daemon { child, addr };
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while client.get(format!("http://{}/readyz", d.addr)).send().map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    d
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn short_sentences() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/public_sentences.txt")).unwrap();
    text.lines().filter(|l| !l.trim().is_empty() && l.len() < 200).map(str::to_string).collect()
}

/// What to measure, from the command line.
struct Args {
    model: String,
    /// `--embed-models a,b`: the embed models to measure, interleaved (`--embed-model a`: one).
    embed_models: Vec<String>,
    /// `--golden`: also report each model's smallest cosine to sentence-transformers' MiniLM
    /// vectors (for models that serve MiniLM's files).
    golden: bool,
    template: String,
    long_repeats: usize,
}

fn embed(addr: &str, client: &reqwest::blocking::Client, texts: &[String], model: Option<&str>) {
    let r = client.post(format!("http://{addr}/embed")).json(&json!({"inputs": texts, "model": model})).send().unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().unwrap();
}

/// Cosine similarity.
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

/// The smallest cosine between `model`'s vectors and sentence-transformers' golden MiniLM
/// vectors (tests/fixtures/minilm_public.json), one request of all 66 sentences.
fn golden_min_cosine(addr: &str, client: &reqwest::blocking::Client, model: Option<&str>) -> f64 {
    let golden: Value = serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/minilm_public.json")).unwrap()).unwrap();
    let rows = golden["rows"].as_array().unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let r = client.post(format!("http://{addr}/embed")).json(&json!({"inputs": texts, "model": model, "truncate": true})).send().unwrap();
    let got: Value = r.json().unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    rows.iter().zip(got.as_array().unwrap()).map(|(r, v)| cosine(&floats(v), &floats(&r["mean_normalized"]))).fold(1.0, f64::min)
}

/// Embedding throughput and latency of each model in `--embed-models` (default: the first
/// embed model), measured interleaved so that a noisy host treats them alike. The first
/// model's line is `edgenode embed:`, the others' `edgenode embed [NAME]:`.
fn bench_embed(d: &Daemon, args: &Args) {
    let models: Vec<Option<String>> = if args.embed_models.is_empty() { vec![None] } else { args.embed_models.iter().cloned().map(Some).collect() };
    let client = reqwest::blocking::Client::new();
    let short = short_sentences();
    let corpus: Vec<String> = short.iter().cycle().take(512).cloned().collect();
    for model in &models {
        for chunk in corpus[..64].chunks(32) {
            embed(&d.addr, &client, chunk, model.as_deref());
        }
    }
    // Batch throughput: 512 sentences, 32 per request, one client; best of 3 (as bench_st.py).
    let mut best = vec![f64::MAX; models.len()];
    for _ in 0..3 {
        for (m, model) in models.iter().enumerate() {
            let t = Instant::now();
            for chunk in corpus.chunks(32) {
                embed(&d.addr, &client, chunk, model.as_deref());
            }
            best[m] = best[m].min(t.elapsed().as_secs_f64());
        }
    }
    let corpus = Arc::new(corpus);
    for (m, model) in models.iter().enumerate() {
        let batch = corpus.len() as f64 / best[m];
        // Single-sentence latency, one client, 200 calls.
        let mut lat: Vec<f64> = (0..200)
            .map(|i| {
                let t = Instant::now();
                embed(&d.addr, &client, &short[i % short.len()..i % short.len() + 1], model.as_deref());
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        // 16 concurrent single-sentence clients over the 512 sentences.
        let t = Instant::now();
        let handles: Vec<_> = (0..16)
            .map(|c| {
                let corpus = corpus.clone();
                let addr = d.addr.clone();
                let model = model.clone();
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    for i in (c..corpus.len()).step_by(16) {
                        embed(&addr, &client, &corpus[i..i + 1], model.as_deref());
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        let concurrent = corpus.len() as f64 / t.elapsed().as_secs_f64();
        let one_client = 1000.0 / percentile(&lat, 0.5);
        let label = match (m, model) {
            (0, _) | (_, None) => String::new(),
            (_, Some(name)) => format!(" [{name}]"),
        };
        let golden =
            if args.golden { format!(" golden_min_cosine={:.4}", golden_min_cosine(&d.addr, &client, model.as_deref())) } else { String::new() };
        println!(
            "edgenode embed{label}: batch32_throughput_sent_per_s={batch:.1} single_p50_ms={:.2} single_p99_ms={:.2} concurrent16_sent_per_s={concurrent:.1} concurrent16_vs_one_client={:.2}{golden}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            concurrent / one_client
        );
    }
}

/// Streams one completion (`/v1/completions`, the same raw prompts the llama.cpp baseline
/// evaluates); returns (time to first token, decode tokens/s after it, tokens).
fn stream_completion(addr: &str, body: &Value) -> (f64, f64, usize) {
    stream_answer(addr, "/v1/completions", body)
}

/// `stream_completion` for a route: `/v1/completions` (text chunks) or
/// `/v1/chat/completions` (delta chunks).
fn stream_answer(addr: &str, route: &str, body: &Value) -> (f64, f64, usize) {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build().unwrap();
    let t0 = Instant::now();
    let r = client.post(format!("http://{addr}{route}")).json(body).send().unwrap();
    assert_eq!(r.status(), 200);
    let mut first = None;
    let mut last = t0;
    let mut usage = 0;
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let choice = &v["choices"][0];
        if choice["text"].as_str().or(choice["delta"]["content"].as_str()).is_some_and(|c| !c.is_empty()) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage = u as usize;
        }
    }
    let first = first.unwrap_or(last);
    let decode = (usage.saturating_sub(1)) as f64 / last.duration_since(first).as_secs_f64().max(1e-9);
    (first.duration_since(t0).as_secs_f64(), decode, usage)
}

fn bench_generate(d: &Daemon, args: &Args) {
    let prompts: Value = serde_json::from_str(&std::fs::read_to_string(root().join("benches/prompts.json")).unwrap()).unwrap();
    let template = &prompts["templates"][args.template.as_str()];
    assert!(template.is_object(), "no template {:?} in benches/prompts.json", args.template);
    let model = args.model.as_str();
    let story = json!({
        "model": model, "stream": true, "stream_options": {"include_usage": true},
        "prompt": template["story"], "temperature": 0, "max_tokens": 128, "ignore_eos": true,
    });
    stream_completion(&d.addr, &story);
    let decode = (0..3).map(|_| stream_completion(&d.addr, &story).1).fold(0.0, f64::max);
    // Prompt processing: the long prompt, one token generated.
    let long_prompt = vec![prompts["long_sentence"].as_str().unwrap(); args.long_repeats].join(" ");
    let client = reqwest::blocking::Client::new();
    let (mut pp, mut pp_tokens) = (0.0f64, 0.0);
    for _ in 0..3 {
        let t = Instant::now();
        let r: Value = client
            .post(format!("http://{}/v1/completions", d.addr))
            .json(&json!({"model": model, "prompt": long_prompt, "max_tokens": 1, "temperature": 0}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        pp_tokens = r["usage"]["prompt_tokens"].as_f64().unwrap();
        pp = pp.max(pp_tokens / t.elapsed().as_secs_f64());
    }
    // Time to first token for a short chat prompt: median of 5.
    let short = json!({"model": model, "stream": true, "prompt": template["short"], "temperature": 0, "max_tokens": 1});
    let mut ttft: Vec<f64> = (0..5).map(|_| stream_completion(&d.addr, &short).0 * 1000.0).collect();
    ttft.sort_by(f64::total_cmp);
    // Eight concurrent streams against one, measured the same way (tokens over the wall
    // time of the whole request, prompt included), alternating, best of three each: the
    // host drifts within seconds, so a lone eight-stream run against a best-of-three decode
    // figure measured at another moment says more about the host than about batching.
    let wall = |streams: usize| {
        let t = Instant::now();
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                let addr = d.addr.clone();
                let body = story.clone();
                std::thread::spawn(move || stream_completion(&addr, &body).2)
            })
            .collect();
        let tokens: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        tokens as f64 / t.elapsed().as_secs_f64()
    };
    let (mut one, mut eight) = (0f64, 0f64);
    for _ in 0..3 {
        one = one.max(wall(1));
        eight = eight.max(wall(8));
    }
    // Bytes of weights one decode step reads, as the engine reports them.
    let info: Value = client.get(format!("http://{}/info", d.addr)).send().unwrap().json().unwrap();
    let per_token = info["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == model))
        .and_then(|m| m["details"]["model"]["weight_bytes_per_token"].as_u64())
        .unwrap_or(0);
    println!(
        "edgenode generate: decode_tok_per_s={decode:.2} prompt_tok_per_s={pp:.1} prompt_tokens={pp_tokens} ttft_ms_p50={:.1} one_stream_tok_per_s={one:.1} streams8_tok_per_s={eight:.1} streams8_vs_one={:.2} weight_bytes_per_token={per_token}",
        ttft[2],
        eight / one
    );
}

/// What constrained decoding costs per token: decode tokens/s of a chat answer held to a
/// JSON schema (40 short words, so the answer is long) against the same chat unconstrained,
/// alternating, best of three each. Twice: greedy, where the grammar's full mask is only
/// computed when the model's choice is not allowed, and top-p sampling, where the mask is
/// computed every step (the nucleus depends on it).
fn bench_structured(d: &Daemon, args: &Args) {
    let model = args.model.as_str();
    let messages = json!([{"role": "user", "content": "List forty short English words as a JSON object with a words array."}]);
    let schema = json!({"type": "object", "properties": {"words": {"type": "array", "minItems": 40, "maxItems": 40,
                        "items": {"type": "string", "minLength": 2, "maxLength": 8}}}, "required": ["words"], "additionalProperties": false});
    let measure = |sampling: Value| {
        let mut plain = json!({"model": model, "messages": messages, "stream": true, "stream_options": {"include_usage": true},
                               "max_tokens": 200, "ignore_eos": true, "seed": 1});
        let mut constrained = json!({"model": model, "messages": messages, "stream": true, "stream_options": {"include_usage": true},
                                     "max_tokens": 600, "seed": 1,
                                     "response_format": {"type": "json_schema", "json_schema": {"name": "words", "schema": schema}}});
        for (k, v) in sampling.as_object().unwrap() {
            plain[k] = v.clone();
            constrained[k] = v.clone();
        }
        stream_answer(&d.addr, "/v1/chat/completions", &constrained);
        let (mut free, mut held, mut tokens) = (0f64, 0f64, 0);
        for _ in 0..3 {
            free = free.max(stream_answer(&d.addr, "/v1/chat/completions", &plain).1);
            let (_, rate, n) = stream_answer(&d.addr, "/v1/chat/completions", &constrained);
            held = held.max(rate);
            tokens = n;
        }
        (free, held, tokens)
    };
    let (free, held, tokens) = measure(json!({"temperature": 0}));
    let (free_p, held_p, _) = measure(json!({"temperature": 1, "top_p": 0.9}));
    println!(
        "edgenode structured: decode_tok_per_s={free:.2} json_schema_decode_tok_per_s={held:.2} json_schema_tokens={tokens} \
         slowdown_pct={:.1} top_p_decode_tok_per_s={free_p:.2} top_p_json_schema_decode_tok_per_s={held_p:.2} top_p_slowdown_pct={:.1}",
        (1.0 - held / free) * 100.0,
        (1.0 - held_p / free_p) * 100.0
    );
}

/// Sends one non-streamed chat request; returns (seconds, x-edgenode-cache).
fn chat_once(client: &reqwest::blocking::Client, addr: &str, body: &Value, store: bool) -> (f64, String) {
    let t = Instant::now();
    let mut r = client.post(format!("http://{addr}/v1/chat/completions")).json(body);
    if !store {
        r = r.header("cache-control", "no-store");
    }
    let r = r.send().expect("chat request");
    assert_eq!(r.status(), 200);
    let outcome = r.headers().get("x-edgenode-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    r.bytes().expect("chat answer");
    (t.elapsed().as_secs_f64(), outcome)
}

fn bench_cache(d: &Daemon, args: &Args) {
    let client = reqwest::blocking::Client::new();
    let chat = |content: String| json!({"model": args.model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0});
    // A hit's latency, chat and embeddings, over HTTP.
    let first = chat("What is the capital of France?".into());
    assert_eq!(chat_once(&client, &d.addr, &first, true).1, "miss", "the benchmark needs [cache] enabled");
    let mut hits: Vec<f64> = (0..300).map(|_| chat_once(&client, &d.addr, &first, true).0 * 1000.0).collect();
    hits.sort_by(f64::total_cmp);
    let body = json!({"input": "a sentence that is embedded once and then served from the cache"});
    let embed_hit = |c: &reqwest::blocking::Client| {
        let t = Instant::now();
        let r = c.post(format!("http://{}/v1/embeddings", d.addr)).json(&body).send().unwrap();
        r.bytes().unwrap();
        t.elapsed().as_secs_f64() * 1000.0
    };
    embed_hit(&client);
    let mut embed_hits: Vec<f64> = (0..300).map(|_| embed_hit(&client)).collect();
    embed_hits.sort_by(f64::total_cmp);
    // Half the requests repeat an earlier prompt (one answered at least eight requests
    // before), from four concurrent clients; the same workload with no-store runs the model
    // every time. Each run gets its own prompts so neither starts warm.
    let workload = |run: &str| -> Vec<Value> {
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut fresh = 0usize;
        (0..64)
            .map(|i| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let content = if i < 8 || i % 2 == 0 {
                    fresh += 1;
                    format!("{run}: write one sentence about the number {fresh}.")
                } else {
                    format!("{run}: write one sentence about the number {}.", 1 + (rng as usize) % (fresh - 4).max(1))
                };
                chat(content)
            })
            .collect()
    };
    let run = |requests: Vec<Value>, store: bool| -> (f64, usize) {
        let queue = Arc::new(std::sync::Mutex::new(requests.into_iter()));
        let t = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (queue, addr) = (queue.clone(), d.addr.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut hits = 0;
                    loop {
                        let next = queue.lock().unwrap().next();
                        let Some(body) = next else { return hits };
                        hits += (chat_once(&client, &addr, &body, store).1 == "hit") as usize;
                    }
                })
            })
            .collect();
        let hits = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (64.0 / t.elapsed().as_secs_f64(), hits)
    };
    let (without, _) = run(workload("no-store"), false);
    let (with, hit_count) = run(workload("cached"), true);
    println!(
        "edgenode cache: hit_p50_ms={:.2} hit_p99_ms={:.2} embed_hit_p50_ms={:.2} embed_hit_p99_ms={:.2} \
         repeat50_req_per_s={with:.2} repeat50_no_cache_req_per_s={without:.2} repeat50_gain={:.2} repeat50_hits={hit_count}",
        percentile(&hits, 0.5),
        percentile(&hits, 0.99),
        percentile(&embed_hits, 0.5),
        percentile(&embed_hits, 0.99),
        with / without
    );
}

/// This machine's memory read bandwidth: every core summing its share of a 2 GiB buffer
/// (far larger than any cache), best of 5. Decode at TinyLlama's size reads every weight
/// once per token, so tokens/s × bytes per token against this says how close to the
/// memory it runs.
fn bench_bandwidth() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let words = (2usize << 30) / 8;
    let buffer: Arc<Vec<u64>> = Arc::new((0..words as u64).collect());
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let b = buffer.clone();
                std::thread::spawn(move || {
                    let part = &b[i * words / threads..(i + 1) * words / threads];
                    // Eight independent sums so the adds never wait on each other.
                    let mut acc = [0u64; 8];
                    for chunk in part.chunks_exact(8) {
                        for (a, v) in acc.iter_mut().zip(chunk) {
                            *a = a.wrapping_add(*v);
                        }
                    }
                    std::hint::black_box(acc)
                })
            })
            .collect();
        handles.into_iter().for_each(|h| {
            h.join().unwrap();
        });
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!("edgenode bandwidth: read_gb_per_s={best:.2} threads={threads}");
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let flag = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let config = flag("--config");
    let args = Args {
        model: flag("--model").unwrap_or_else(|| "smollm2".into()),
        embed_models: flag("--embed-models").or(flag("--embed-model")).map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default(),
        golden: argv.iter().any(|a| a == "--golden"),
        template: flag("--template").unwrap_or_else(|| "chatml".into()),
        long_repeats: flag("--long-repeats").map(|n| n.parse().expect("--long-repeats N")).unwrap_or(60),
    };
    let wanted: Vec<&str> =
        argv.iter().map(String::as_str).filter(|a| ["embed", "generate", "structured", "bandwidth", "cache"].contains(a)).collect();
    let all = wanted.is_empty();
    if wanted.contains(&"bandwidth") {
        bench_bandwidth();
        if wanted.len() == 1 {
            return;
        }
    }
    let d = start(config.as_deref(), flag("--bin").as_deref());
    if all || wanted.contains(&"embed") {
        bench_embed(&d, &args);
    }
    if all || wanted.contains(&"generate") {
        bench_generate(&d, &args);
    }
    if all || wanted.contains(&"structured") {
        bench_structured(&d, &args);
    }
    if wanted.contains(&"cache") {
        bench_cache(&d, &args);
    }
    // The daemon's peak resident memory over the whole run (Linux).
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())) {
        if let Some(kb) =
            status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        {
            println!("edgenode memory: peak_rss_mb={:.0}", kb as f64 / 1024.0);
        }
    }
}
