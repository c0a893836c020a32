//! The daemon as a process (the binary `main` builds), for tests that stop, kill or scrape it.

use std::process::{Child, Command, Stdio};

use super::TestEnv;

pub struct Proc {
    child: Child,
    name: String,
}

/// A test that fails with the daemon still running stops it, and prints what the daemon did last (its log without
/// the per-batch lines), so a failure far from the machine it ran on can be read from the test's output.
impl Drop for Proc {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(log_path(&self.name)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains(r#""message":"Batch done""#))
            .collect();
        eprintln!(
            "--- the last lines of daemon {} (of {} without 'Batch done'):",
            self.name,
            lines.len()
        );
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{}", l.chars().take(400).collect::<String>());
        }
    }
}

impl Proc {
    pub fn start(env: &TestEnv, name: &str) -> Proc {
        Self::start_with(env, name, &[])
    }

    /// With extra (or overriding) environment variables.
    pub fn start_with(env: &TestEnv, name: &str, vars: &[(&str, &str)]) -> Proc {
        Self::command(env, name, &["run"], vars)
    }

    /// Any subcommand (`run`, `replay-dlq`, `healthcheck`) with the test's settings and `vars`; its output goes
    /// to its log like the daemon's.
    pub fn command(env: &TestEnv, name: &str, args: &[&str], vars: &[(&str, &str)]) -> Proc {
        std::fs::create_dir_all(log_path(name).parent().unwrap()).unwrap();
        let log = std::fs::File::create(log_path(name)).unwrap();
        let child =
            Command::new(env!("CARGO_BIN_EXE_event-processor"))
                .args(args)
                .env_clear()
                .env("KAFKA_BOOTSTRAP_SERVERS", &env.kafka)
                .env("MONGODB_URI", &env.mongo_uri)
                .env("MONGODB_DATABASE", &env.db_name)
                .env("KAFKA_TOPICS", &env.topic)
                .env("KAFKA_GROUP_ID", &env.group)
                .env("DLQ_TOPIC", &env.dlq)
                .env("HTTP_PORT", "0")
                .env("LOG_LEVEL", "info")
                .env("LOG_FORMAT", "json")
                .env("KAFKA_SESSION_TIMEOUT_MS", "10000")
                .env("KAFKA_MAX_POLL_INTERVAL_MS", "30000")
                .env("KAFKA_REJOIN_TIMEOUT_MS", "60000")
                .env("SHUTDOWN_TIMEOUT_MS", "5000")
                .env("RETRY_INITIAL_BACKOFF_MS", "50")
                .env("RETRY_MAX_BACKOFF_MS", "2000")
                .envs(vars.iter().copied())
                // `FAULTS_DAEMON_<VARIABLE>` of the test's environment goes to every daemon as `<VARIABLE>`, e.g.
                // `FAULTS_DAEMON_KAFKA_PROPERTY_DEBUG=cgrp` with `FAULTS_DAEMON_LOG_LEVEL=info,librdkafka=debug`.
                .envs(std::env::vars().filter_map(|(k, v)| {
                    k.strip_prefix("FAULTS_DAEMON_").map(|k| (k.to_string(), v))
                }))
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("starting the event-processor binary");
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// Waits for the process to end by itself, at most `timeout`; its exit status, `None` if still running.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        None
    }

    /// The exit status, once the process has ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().unwrap()
    }

    /// Sends a signal (`STOP`, `CONT`, ...) by name; false if it could not be sent (the process is gone).
    pub fn signal(&self, name: &str) -> bool {
        Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Where the daemon started as `name` writes its log.
pub fn log_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/daemons/{name}.log"))
}

/// The lines of a daemon's log (`LOG_FORMAT=json`).
pub fn log_lines(name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log_path(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The line in which the daemon started as `name` gave up on its consumer group (`KAFKA_REJOIN_TIMEOUT_MS`), if
/// it wrote one.
pub fn gave_up_on_group(name: &str) -> Option<serde_json::Value> {
    log_lines(name).into_iter().find(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("The consumer has not got back into its group"))
    })
}
