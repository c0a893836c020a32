//! The image built from the committed Dockerfile, run in a real engine against the local stack (containers on
//! the host's network): the README's INSERT reaches MongoDB, Docker's health check goes `healthy`, readiness
//! says not ready while MongoDB is stopped, `docker stop` ends it cleanly with its final commit, three
//! containers of one group share six partitions and apply each record once, and a bad variable exits 78 with
//! one message.
//!
//! Not a default test target: it needs the engine and the image (`scripts/docker up`) and stops a service of the
//! local stack, so `scripts/test` runs it on its own (`cargo test --test container`).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::doc;

const WAIT: Duration = Duration::from_secs(120);

fn image() -> String {
    std::env::var("IMAGE").unwrap_or_else(|_| "event-processor:latest".to_string())
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The engine answers and the image is there; otherwise the test fails saying how to get them.
fn require_engine_and_image() {
    let engine = docker(&["info"]).status.success();
    assert!(
        engine,
        "no Docker engine answers: `scripts/docker up` installs and starts one, and builds the image"
    );
    let present = docker(&["image", "inspect", &image()]).status.success();
    assert!(
        present,
        "image {} not built: `scripts/docker build`",
        image()
    );
}

/// A container of the image on the host's network, with the test's settings and `vars`; removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn run(env: &TestEnv, name: &str, vars: &[(&str, &str)]) -> Container {
        let name = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut args: Vec<String> = ["run", "-d", "--name", &name, "--network", "host"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let base = [
            ("KAFKA_BOOTSTRAP_SERVERS", env.kafka.as_str()),
            ("MONGODB_URI", env.mongo_uri.as_str()),
            ("MONGODB_DATABASE", env.db_name.as_str()),
            ("KAFKA_TOPICS", env.topic.as_str()),
            ("KAFKA_GROUP_ID", env.group.as_str()),
            ("DLQ_TOPIC", env.dlq.as_str()),
            ("KAFKA_SESSION_TIMEOUT_MS", "10000"),
            ("SHUTDOWN_TIMEOUT_MS", "5000"),
        ];
        for (k, v) in base.iter().chain(vars.iter()) {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(image());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        Container { name }
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!("--- last lines of container {}:", self.name);
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{}", l.chars().take(400).collect::<String>());
            }
        }
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

fn stack(args: &[&str]) {
    let ok = Command::new(format!("{}/scripts/stack", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "scripts/stack {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_daemon_as_the_readme_says() {
    require_engine_and_image();
    let (pg_url, _) = e2e_services();
    let mut env = TestEnv::new("image", 1).await;
    // The stack's shipped connector writes the outbox to this topic.
    env.topic = "postgres.activity.event_outbox".to_string();
    let port = free_port().to_string();
    let c = Container::run(&env, "ep-image", &[("HTTP_PORT", &port)]);
    assert_eq!(c.inspect("{{.Config.User}}"), "10001", "runs as non-root");

    // The README's INSERT, with an email of this test's own.
    let email = format!("{}@example.com", env.db_name);
    let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL (POSTGRES_URL)");
    tokio::spawn(conn);
    pg.execute(
        "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
         VALUES (gen_random_uuid(), gen_random_uuid(), 'user', 'UserCreated', $1::text::jsonb)",
        &[&format!(
            r#"{{"email": "{email}", "username": "testuser", "first_name": "Test", "last_name": "User"}}"#
        )],
    )
    .await
    .expect("the README's INSERT");
    wait_until("the user in MongoDB", WAIT, || async {
        env.find_one("users", doc! { "email": &email })
            .await
            .is_some()
    })
    .await;

    // Docker's own health check (the image's HEALTHCHECK, every 15 s) goes healthy.
    wait_until(
        "Docker health `healthy`",
        Duration::from_secs(90),
        || async { c.inspect("{{.State.Health.Status}}") == "healthy" },
    )
    .await;

    // Readiness tells the truth while MongoDB is away, and comes back with it.
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        http_request(&base, "GET", "/health/ready", None).await.0,
        200
    );
    stack(&["stop", "mongo"]);
    let unready = async {
        wait_until(
            "not ready while MongoDB is stopped",
            Duration::from_secs(30),
            || async { http_request(&base, "GET", "/health/ready", None).await.0 == 503 },
        )
        .await;
    };
    let result = tokio::time::timeout(Duration::from_secs(40), unready).await;
    stack(&["start", "mongo"]);
    result.expect("readiness did not turn");
    wait_until("ready again", Duration::from_secs(60), || async {
        http_request(&base, "GET", "/health/ready", None).await.0 == 200
    })
    .await;

    // `docker stop` (SIGTERM, then SIGKILL after the compose file's 30 s stop_grace_period): a clean exit, with the
    // final commit of everything it finished.
    let started = Instant::now();
    docker_ok(&["stop", "-t", "30", &c.name]);
    let took = started.elapsed();
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "exit code after docker stop"
    );
    assert!(took < Duration::from_secs(30), "docker stop took {took:?}");
    let ends = env.end_offsets(6);
    let committed = env.committed(6);
    assert_eq!(
        committed
            .iter()
            .zip(&ends)
            .map(|(c, e)| (c.unwrap_or(0), e.unwrap_or(0)))
            .filter(|(c, e)| c < e)
            .count(),
        0,
        "committed {committed:?} below the ends {ends:?} after the final commit"
    );
    assert!(c.logs().contains("Final commit done"), "{}", c.logs());
    eprintln!("[container] docker stop took {:.1} s", took.as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_containers_share_six_partitions_and_apply_each_record_once() {
    require_engine_and_image();
    let env = TestEnv::new("image3", 6).await;
    let n = 600;
    let containers: Vec<Container> = (0..3)
        .map(|i| Container::run(&env, &format!("ep-scale{i}"), &[("HTTP_PORT", "0")]))
        .collect();
    // The group settles with partitions on every member, then the records come.
    let assigned = |c: &Container| {
        c.logs()
            .lines()
            .any(|l| l.contains("Partitions assigned") && l.contains(&env.topic))
    };
    wait_until("every container assigned partitions", WAIT, || async {
        containers.iter().all(assigned)
    })
    .await;
    env.produce(&new_users(n, "img")).await;
    wait_committed(&env, 6, n as i64, WAIT).await;
    assert_eq!(env.count("users", doc! {}).await, n as u64);
    assert_eq!(
        env.total_users().await,
        Some(n as i64),
        "each sign-up counted once"
    );
    // Every container took part: each logged an assignment with partitions.
    for c in &containers {
        let logs = c.logs();
        assert!(
            logs.lines()
                .any(|l| l.contains("Partitions assigned") && l.contains(&env.topic)),
            "container {} was assigned nothing",
            c.name
        );
    }
    for c in &containers {
        docker_ok(&["stop", "-t", "30", &c.name]);
        assert_eq!(c.inspect("{{.State.ExitCode}}"), "0");
    }
}

#[test]
fn a_bad_variable_exits_78_with_one_message() {
    require_engine_and_image();
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "KAFKA_BOOTSTRAP_SERVERS=kafka:9092",
        "-e",
        "MONGODB_URI=mongodb://mongodb:27017",
        "-e",
        "PROCESSING_BATCH_SIZE=many",
        &image(),
    ]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("PROCESSING_BATCH_SIZE"), "{stderr}");
}

#[test]
fn the_image_answers_help_version_and_config() {
    require_engine_and_image();
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--rm", "--network", "none", &image()[..]]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        docker(&refs)
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("rebuild"));
    let sub = run(&["rebuild", "--help"]);
    assert_eq!(sub.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&sub.stdout).contains("--handler"));
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    let text = String::from_utf8_lossy(&version.stdout);
    // scripts/docker builds the image with the checkout's commit (`--build-arg GIT_COMMIT`).
    assert!(text.contains("(commit "), "{text}");
    let usage = run(&["no-such-command"]);
    assert_eq!(usage.status.code(), Some(2));
    let config = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "KAFKA_BOOTSTRAP_SERVERS=kafka:9092",
        "-e",
        "MONGODB_URI=mongodb://app:pa55@mongodb:27017",
        &image(),
        "config",
    ]);
    assert_eq!(config.status.code(), Some(0));
    let shown = String::from_utf8_lossy(&config.stdout);
    assert!(
        shown.contains("\"KAFKA_BOOTSTRAP_SERVERS\": \"kafka:9092\"") && !shown.contains("pa55"),
        "{shown}"
    );
}
