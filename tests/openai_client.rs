//! The official `openai` Python package against the real daemon: models, chat (plain and
//! streaming), completions and embeddings, with no errors.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn openai_python_client_works_against_the_daemon() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    // scripts/test.sh installs `openai` into its own environment and names its interpreter here.
    let python = std::env::var("OPENAI_CLIENT_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(root().join("tests/openai_client.py"))
        .arg(d.url("/v1"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run the suite with scripts/test.sh)"));
    assert!(
        out.status.success(),
        "openai client failed (interpreter {python}; scripts/test.sh installs the package):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
