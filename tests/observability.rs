//! What an operator sees of the daemon as deployed (the binary, as a process of its own, so its metrics are its
//! own): Prometheus metrics, liveness and readiness over HTTP, and the `healthcheck` subcommand the image's
//! `HEALTHCHECK` runs. Against real Kafka and a real MongoDB-wire server.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::process::{self, Proc};
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// The sum of every sample of `name` whose labels contain all of `labels` (`key="value"` pairs).
fn total(samples: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            let (n, l) = k.split_once('{').unwrap_or((k, ""));
            n == name && labels.iter().all(|want| l.contains(want))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Runs `event-processor healthcheck`: whether it passed, and what it printed.
fn healthcheck(port: u16) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_event-processor"))
        .arg("healthcheck")
        .env_clear()
        .env("HTTP_PORT", port.to_string())
        .output()
        .expect("running event-processor healthcheck");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_report_what_the_daemon_did() {
    let env = TestEnv::new("observe", 2).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let name = format!("observe-{}", env.topic);
    let daemon = Proc::start_with(&env, &name, &[("HTTP_PORT", &port.to_string())]);
    env.produce(&new_users(40, "metrics")).await;
    wait_committed(&env, 2, 40, WAIT).await;

    let (code, body) = http_request(&base, "GET", "/health/ready", None).await;
    assert_eq!(code, 200, "ready once partitions are assigned: {body}");
    let ready: Value = serde_json::from_str(&body).expect("readiness is JSON");
    assert_eq!(ready["assigned_partitions"], 2, "{ready}");
    assert_eq!(ready["mongo_reachable"], true, "{ready}");
    assert_eq!(ready["commits_stalled"], false, "{ready}");
    assert_eq!(
        http_request(&base, "GET", "/health/live", None).await.0,
        200
    );
    assert!(healthcheck(port).0, "the healthcheck subcommand passes");

    // The commits' answers come back: the loop's own commits are timed (the last one, at shutdown, has not run).
    let topic = format!("topic=\"{}\"", env.topic);
    let page = samples(&http_request(&base, "GET", "/metrics", None).await.1);
    assert_eq!(
        total(&page, "event_processor_records_consumed_total", &[&topic]),
        40.0
    );
    assert_eq!(
        total(
            &page,
            "event_processor_records_total",
            &[&topic, "outcome=\"processed\""]
        ),
        40.0
    );
    assert!(
        total(&page, "event_processor_commit_duration_seconds_count", &[]) >= 1.0,
        "commit durations recorded"
    );
    assert_eq!(
        total(&page, "event_processor_commit_failures_total", &[]),
        0.0
    );
    assert!(
        total(
            &page,
            "event_processor_handler_duration_seconds_count",
            &["handler=\"UserCreatedHandler\""]
        ) >= 40.0,
        "handler durations recorded: {:?}",
        page.keys()
            .filter(|k| k.contains("handler_duration"))
            .collect::<Vec<_>>()
    );
    // What went to MongoDB, from the driver's command monitoring: 40 sign-ups are several statements each (user,
    // statistics bucket, ledger), in fewer commands than statements (the writer coalesces), and bytes with them.
    let commands = total(&page, "event_processor_mongodb_commands_total", &[]);
    let updates = total(
        &page,
        "event_processor_mongodb_statements_total",
        &["command=\"update\""],
    );
    let update_commands = total(
        &page,
        "event_processor_mongodb_commands_total",
        &["command=\"update\""],
    );
    assert!(updates >= 80.0, "update statements: {updates}");
    assert!(
        update_commands >= 1.0 && update_commands < updates,
        "update commands {update_commands} for {updates} statements"
    );
    assert!(commands >= update_commands);
    // Each command's round trip, from the same monitoring: one sample per answered command (those still in
    // flight when the page was rendered, one per writer of the tests running at once, have started but not ended).
    let timed = total(
        &page,
        "event_processor_mongodb_command_duration_seconds_count",
        &["command=\"update\""],
    );
    assert!(
        timed >= 1.0 && timed <= update_commands && timed >= update_commands - 5.0,
        "{timed} update round trips timed for {update_commands} update commands"
    );
    let busy = total(
        &page,
        "event_processor_mongodb_command_duration_seconds_sum",
        &["command=\"update\""],
    );
    assert!(
        busy > 0.0 && busy < 60.0,
        "update round trips took {busy} s"
    );
    let statements = total(&page, "event_processor_mongodb_statements_total", &[]);
    let bytes = total(&page, "event_processor_mongodb_command_bytes_total", &[]);
    println!(
        "MongoDB work per 1,000 sign-ups (40 sent, start-up commands included): {:.0} commands, {:.0} statements, \
         {:.0} KiB",
        commands * 25.0,
        statements * 25.0,
        bytes * 25.0 / 1024.0
    );
    assert!(total(&page, "event_processor_mongodb_command_bytes_total", &[]) > updates * 50.0);
    // Lag per partition, in records and in seconds, comes with librdkafka's statistics (every 5 s): both
    // partitions, caught up.
    let lag = |page: &HashMap<String, f64>, name: &str| {
        (0..2)
            .map(|p| {
                page.iter()
                    .find(|(k, _)| {
                        k.starts_with(&format!("{name}{{"))
                            && k.contains(&topic)
                            && k.contains(&format!("partition=\"{p}\""))
                    })
                    .map(|(_, v)| *v)
            })
            .collect::<Vec<_>>()
    };
    wait_until("lag of both partitions reported as 0", WAIT, || {
        let base = base.clone();
        async move {
            let page = samples(&http_request(&base, "GET", "/metrics", None).await.1);
            lag(&page, "event_processor_consumer_lag_records") == [Some(0.0), Some(0.0)]
                && lag(&page, "event_processor_consumer_lag_seconds") == [Some(0.0), Some(0.0)]
        }
    })
    .await;

    assert!(daemon.terminate().success());
    let (passed, said) = healthcheck(port);
    assert!(
        !passed && said.contains("Connection refused"),
        "the healthcheck fails once the daemon is gone, and says why: {said}"
    );
}

/// A consumer that cannot get into its group says so and exits, so that its supervisor starts a new one
/// (librdkafka can stay out of its group for good after a broker restart). Made here without a broken librdkafka: another member of the group holds every partition and stops polling, so it
/// never gives them up and the rebalance the daemon's arrival starts waits for it (up to its own
/// `max.poll.interval.ms`, 120 s); the daemon's `KAFKA_REJOIN_TIMEOUT_MS` is 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_kept_out_of_its_group_exits_after_the_rejoin_timeout() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let env = TestEnv::new("outofgroup", 2).await;
    env.produce(&new_users(4, "outofgroup")).await;
    let holder: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("group.id", &env.group)
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "120000")
        .set("enable.auto.commit", "false")
        .create()
        .expect("the holding consumer");
    holder.subscribe(&[&env.topic]).unwrap();
    let started = std::time::Instant::now();
    while holder.assignment().map_or(0, |a| a.count()) < 2 {
        assert!(
            started.elapsed() < WAIT,
            "the holding consumer got no partitions"
        );
        let _ = holder.poll(Duration::from_millis(100));
    }
    // From here on `holder` is not polled: its heartbeats go on, its revoke never happens.
    let name = format!("outofgroup-{}", env.topic);
    let mut daemon = Proc::start_with(
        &env,
        &name,
        &[
            ("KAFKA_PROPERTY_PARTITION_ASSIGNMENT_STRATEGY", "range"),
            ("KAFKA_MAX_POLL_INTERVAL_MS", "15000"),
            ("KAFKA_REJOIN_TIMEOUT_MS", "20000"),
        ],
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = daemon.exited() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the daemon kept out of its group did not exit"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "exits with an error");
    assert!(
        took >= Duration::from_secs(20),
        "gave up only after KAFKA_REJOIN_TIMEOUT_MS: {took:?}"
    );
    let lines = process::log_lines(&name);
    let gave_up = process::gave_up_on_group(&name).expect("the give-up is logged");
    assert_eq!(gave_up["level"], "ERROR");
    assert!(gave_up["out_of_group_s"].as_i64() >= Some(20), "{gave_up}");
    assert_ne!(gave_up["join_state"], "steady", "{gave_up}");
    assert!(gave_up["brokers_up"].as_u64() >= Some(1), "{gave_up}");
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "event-processor failed"),
        "the exit says why"
    );
    drop(holder);
}

/// `LOG_FORMAT=pretty` is for people: colour codes only on a terminal, never in a redirected file.
#[test]
fn pretty_logs_written_to_a_file_carry_no_colour_codes() {
    let child = Command::new(env!("CARGO_BIN_EXE_event-processor"))
        .env_clear()
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .env("MONGODB_URI", "mongodb://127.0.0.1:1")
        .env("HTTP_PORT", "0")
        .env("LOG_FORMAT", "pretty")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the binary");
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("the binary's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Starting event-processor"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text}");
}
