//! The commit the binary is built from, for `event-processor --version`: `GIT_COMMIT` when set (the image's build
//! passes it: its context has no `.git`), else what `git` says of the checkout, else nothing.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_default();
    println!("cargo:rustc-env=EVENT_PROCESSOR_COMMIT={}", commit.trim());
}
