//! The hub-shaped test server (`tests/fixtures/hub_server.py`) as the Rust tests drive it:
//! started over a set of repositories, told which faults to inject, asked what it served.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{client, copy_dir, fixture, test_python};

/// A running hub-shaped server. Killed when dropped.
pub struct HubServer {
    child: Child,
    /// The Hub's base URL (`HF_ENDPOINT`); the CDN's address is only ever learnt from redirects.
    pub hub: String,
    root: tempfile::TempDir,
}

impl HubServer {
    /// Serves each (`ORG/REPO`, folder) as a repository at one commit; `gated` ones need
    /// `token`.
    pub fn start(repos: &[(&str, &Path)], gated: &[&str], token: &str) -> HubServer {
        let root = tempfile::tempdir().unwrap();
        for (repo, folder) in repos {
            copy_dir(folder, &root.path().join(repo));
        }
        let mut cmd = Command::new(test_python());
        cmd.arg(fixture("hub_server.py")).arg("--root").arg(root.path()).args(["--token", token]);
        for g in gated {
            cmd.args(["--gated", g]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start tests/fixtures/hub_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("hub_server.py prints its addresses");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("hub_server.py said {line:?}: {e}"));
        HubServer { child, hub: v["hub"].as_str().unwrap().to_string(), root }
    }

    /// Adds (or replaces) a repository while the server runs.
    pub fn put_repo(&self, repo: &str, folder: &Path) {
        let dest = self.root.path().join(repo);
        let _ = std::fs::remove_dir_all(&dest);
        copy_dir(folder, &dest);
    }

    /// Sets faults (`cut_after`, `corrupt`, `fail`, `throttle`) or clears them (`reset`).
    pub fn control(&self, body: Value) {
        let r = client().post(format!("{}/_control", self.hub)).json(&body).send().unwrap();
        assert!(r.status().is_success(), "control {body}: {}", r.status());
    }

    /// Every request either port served, in order.
    pub fn log(&self) -> Vec<Value> {
        client().get(format!("{}/_log", self.hub)).send().unwrap().json::<Vec<Value>>().unwrap()
    }

    /// The requests that carried file bytes (CDN bodies, and direct small files).
    pub fn downloads(&self) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|r| r["method"] == "GET" && (r["port"] == "cdn" || r["path"].as_str().unwrap_or("").contains("/resolve/")))
            .collect()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
