//! Records the git commit the binary was built from, for `/info`.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=BUILD_GIT_SHA");
    let sha = std::env::var("BUILD_GIT_SHA").ok().filter(|s| !s.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    if let Some(sha) = sha {
        println!("cargo:rustc-env=BUILD_GIT_SHA={sha}");
    }
}
