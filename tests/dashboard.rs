//! `/dashboard` in a real browser (Debian's headless Chromium) and the Grafana dashboard's
//! queries in a real Prometheus (Debian's `prometheus`), against live nodes that served
//! embed, chat and routed traffic. Where the test set-up could not install them, the browser
//! and Prometheus checks say so and skip; the rest runs everywhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Stops a helper process (Chromium, Prometheus) when the test ends, however it ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where tests leave what people look at (screenshots).
fn output_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium on `url`: the DOM after scripts ran, and the page's console messages.
fn chromium(browser: &Path, url: &str, width: u32, screenshot: Option<&Path>) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(browser);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},1800"))
        .arg("--virtual-time-budget=6000");
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).stdin(Stdio::null()).output().expect("run chromium");
    (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Loads `url` in headless Chromium with a 360 px viewport set over the DevTools protocol;
/// returns the page's layout check (`content width/window width`) once its script has run,
/// and leaves a screenshot at `shot`.
fn narrow_layout(browser: &Path, url: &str, shot: &Path) -> String {
    use std::io::BufRead;
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-port=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _browser = Kill(child);
    let port = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("ws://127.0.0.1:").nth(1).and_then(|rest| rest.split('/').next()).map(str::to_string))
        .expect("chromium printed its DevTools address");
    let targets: Value = client().get(format!("http://127.0.0.1:{port}/json/list")).send().unwrap().json().unwrap();
    let ws = targets.as_array().unwrap().iter().find(|t| t["type"] == "page").unwrap()["webSocketDebuggerUrl"].as_str().unwrap().to_string();
    let (mut socket, _) = tungstenite::connect(ws.as_str()).unwrap();
    let mut next_id = 0;
    let mut call = |method: &str, params: Value| -> Value {
        next_id += 1;
        socket.send(tungstenite::Message::text(json!({"id": next_id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            let text = socket.read().unwrap().into_text().unwrap_or_default();
            let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if reply["id"] == next_id {
                return reply["result"].clone();
            }
        }
    };
    call("Emulation.setDeviceMetricsOverride", json!({"width": 360, "height": 1800, "deviceScaleFactor": 1, "mobile": true}));
    call("Page.navigate", json!({"url": url}));
    let deadline = Instant::now() + Duration::from_secs(30);
    let layout = loop {
        let r = call("Runtime.evaluate", json!({"expression": "document.body && document.body.dataset.layout || ''", "returnByValue": true}));
        let v = r["result"]["value"].as_str().unwrap_or("").to_string();
        if !v.is_empty() {
            break v;
        }
        assert!(Instant::now() < deadline, "the dashboard's script never finished a poll at 360 px");
        std::thread::sleep(Duration::from_millis(300));
    };
    std::thread::sleep(Duration::from_millis(2500)); // a redraw at the final width
    let png = call("Page.captureScreenshot", json!({"format": "png"}));
    use base64::Engine as _;
    std::fs::write(shot, base64::engine::general_purpose::STANDARD.decode(png["data"].as_str().unwrap()).unwrap()).unwrap();
    layout
}

/// A node with an upstream (a second node), so every panel has something to show: embed,
/// chat, edge and cloud routed requests, the cache on.
fn busy_pair() -> (Daemon, Daemon) {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "shadow_rate = 0.0", "");
    for text in ["edge nodes", "small models", "a third sentence"] {
        assert_eq!(post_json(&edge, "/embed", &json!({"inputs": text})).0, 200);
    }
    let chat =
        |model: &str, content: &str| json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0});
    assert_eq!(post_json(&edge, "/v1/chat/completions", &chat("smollm2", "Hi")).0, 200);
    assert_eq!(post_json(&edge, "/v1/chat/completions", &chat("auto", "What's the capital of Italy?")).0, 200);
    let long = "Write a detailed analysis of the economic causes of the Great Depression, comparing monetary and fiscal explanations.";
    assert_eq!(post_json(&edge, "/v1/chat/completions", &chat("auto", long)).0, 200);
    (cloud, edge)
}

#[test]
fn the_dashboard_shows_the_nodes_real_figures_in_a_browser_and_without_javascript() {
    let (_cloud, d) = busy_pair();
    let (_, stats) = get_json(&d, "/stats");
    let (_, info) = get_json(&d, "/info");
    let digest = info["models"][0]["digest"].as_str().unwrap()[..12].to_string();
    let verdict = stats["routing"]["viability"]["verdict"].as_str().unwrap().to_string();

    // Without JavaScript: the server put the numbers in the page.
    let r = client().get(d.url("/dashboard")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().unwrap();
    for needle in [digest.as_str(), "minilm", "smollm2", verdict.as_str(), "embed · minilm"] {
        assert!(html.contains(needle), "{needle} not in the server-rendered page");
    }
    assert!(!html.contains("{{"), "a placeholder was left in the page");
    for (path, kind) in [("/dashboard/app.js", "javascript"), ("/dashboard/uplot.js", "javascript"), ("/dashboard/app.css", "css")] {
        let r = client().get(d.url(path)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().contains(kind), "{path}");
    }

    let Some(browser) = tool("chromium") else {
        eprintln!("SKIPPED the browser checks: chromium is not installed (scripts/test.sh installs Debian's package where it can)");
        return;
    };
    let (dom, console) = chromium(&browser, &d.url("/dashboard"), 1280, None);
    assert!(dom.contains("data-ready=\"true\""), "the script did not finish a poll:\n{dom}\n{console}");
    let edge_requests = stats["routing"]["ledger"]["rolling_day"]["edge"]["requests"].to_string();
    let cloud_requests = stats["routing"]["ledger"]["rolling_day"]["cloud"]["requests"].to_string();
    for needle in [
        format!("data-verdict=\"{verdict}\""),
        format!("<span data-field=\"edge_requests\">{edge_requests}</span>"),
        format!("<span data-field=\"cloud_requests\">{cloud_requests}</span>"),
        format!("<code>{digest}</code>"),
        "embed · minilm".to_string(),
        "generate · smollm2".to_string(),
        "first token p50 / p95 ms".to_string(),
        "<span data-field=\"circuit\">closed".to_string(),
        "class=\"u-wrap\"".to_string(),
    ] {
        assert!(dom.contains(&needle), "{needle} not in the DOM after scripts ran:\n{dom}");
    }
    let errors: Vec<&str> = console.lines().filter(|l| l.contains("CONSOLE") || l.contains("Uncaught")).collect();
    assert!(errors.is_empty(), "console messages: {errors:?}");

    // 360 px wide (a phone; Chromium's command line cannot make a window that narrow, so the
    // DevTools protocol sets the viewport): nothing is wider than the window.
    let layout = narrow_layout(&browser, &d.url("/dashboard"), &output_dir().join("dashboard-360.png"));
    let (content, window) = layout.split_once('/').unwrap();
    assert_eq!(window, "360", "the viewport was not set");
    assert!(content.parse::<u32>().unwrap() <= 360, "the page is {content} px wide in a 360 px window");

    let shot = output_dir().join("dashboard.png");
    chromium(&browser, &d.url("/dashboard"), 1280, Some(&shot));
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
    eprintln!("screenshots in {}", output_dir().display());
}

#[test]
fn on_a_node_with_keys_the_page_carries_no_figures_and_asks_for_a_key() {
    let d = Daemon::start(Options {
        config: Some("[auth]\napi_keys = [\"sk-dashboard-0001\"]\n\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n".into()),
        ..Default::default()
    });
    d.wait_ready(Duration::from_secs(120));
    let html = client().get(d.url("/dashboard")).send().unwrap().text().unwrap();
    assert!(html.contains("enter one above"), "{html}");
    assert!(!html.contains("minilm"), "no figures (not even the models) without a key");
    let Some(browser) = tool("chromium") else {
        eprintln!("SKIPPED the browser check: chromium is not installed");
        return;
    };
    let (dom, _) = chromium(&browser, &d.url("/dashboard"), 1280, None);
    assert!(dom.contains("this node needs an API key"), "{dom}");
    assert!(dom.contains("<form id=\"key-form\">"), "the key form is shown: {dom}");
}

#[test]
fn a_real_prometheus_scrapes_the_node_and_every_grafana_query_returns_data() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        eprintln!("SKIPPED: prometheus and promtool are not installed (scripts/test.sh installs Debian's package where it can)");
        return;
    };
    // A node where every panel's metric exists: a named key, the cache, model sync, routed traffic.
    let key = "sk-prometheus-0001";
    let sha = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(key.as_bytes()))
    };
    let cloud = start_cloud(None);
    let config = format!(
        "[cache]\nenabled = true\n\n[sync]\nexpected_manifest = {:?}\n\n[[auth.keys]]\nname = \"prom\"\nsha256 = \"{sha}\"\n\n\
         [upstream]\nbase_url = \"http://{}/v1\"\nmodel = \"smollm2\"\n\n\
         [[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n",
        root().join("models/manifest.toml").display().to_string(),
        cloud.addr
    );
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let send = |path: &str, body: Value| client().post(d.url(path)).bearer_auth(key).json(&body).send().unwrap().status().as_u16();
    assert_eq!(send("/v1/embeddings", json!({"input": "hello"})), 200);
    let chat = json!({"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0});
    assert_eq!(send("/v1/chat/completions", chat.clone()), 200);
    assert_eq!(send("/v1/chat/completions", chat), 200);

    // promtool's lint of the exposition.
    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    let mut check =
        Command::new(&promtool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool check metrics:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Prometheus scrapes it every second for a few seconds.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: edgenode\n    static_configs:\n      - targets: [\"{}\"]\n", d.addr),
    )
    .unwrap();
    let _prometheus = Kill(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    // Percent-encoding every byte but letters and digits is always a valid query string.
    let encode =
        |q: &str| q.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect::<String>();
    let query = |q: &str| -> Value {
        client().get(format!("{api}?query={}", encode(q))).send().map(|r| r.json().unwrap_or(Value::Null)).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while query("count(up{job=\"edgenode\"} == 1) >= 1")["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
        assert!(Instant::now() < deadline, "prometheus never scraped the node");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(4)); // enough samples for rate()

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/edgenode.json")).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().replace("$instance", ".*");
            let answer = query(&expr);
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            let result = answer["data"]["result"].as_array().map(Vec::len).unwrap_or(0);
            assert!(result > 0, "no data for `{expr}` (panel {:?})", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 20);
}
