//! `docker compose up` as the README runs it, in a real engine, from the repository's docker-compose.yml
//! unchanged: the connector registers itself, the README's INSERT reaches MongoDB, the commands users of Kafka,
//! Kafka Connect and MongoDB images type work verbatim, `.env` reaches the daemon, `--scale event-processor=3`
//! shares the partitions with each record applied once and every replica scraped by Prometheus, and a replica
//! killed every 7 s and restarted at once does not stall the group, and `docker compose run event-processor rebuild`
//! rebuilds a read model while the replicas run.
//!
//! Not a default test target: it needs an engine with the images docker-compose.yml names (`scripts/docker all`
//! builds local stand-ins where no registry answers) and the host ports the compose file publishes, so
//! `scripts/test` runs it on its own (`cargo test --test compose`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mongodb::bson::{Document, doc};

const CONNECTOR: &str = "postgres-event-outbox-connector";
const DOTENV_GROUP: &str = "event-processor-from-dotenv";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command run in the repository, as a user runs it there.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        // The compose file reads nothing from the caller's environment but `.env`: keep the test's own
        // service addresses (scripts/stack env) away from it.
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .env_remove("MONGODB_URI")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn compose(args: &[&str]) -> String {
    let mut all = vec!["compose"];
    all.extend_from_slice(args);
    ok("docker", &all)
}

/// A Kafka tool run in the kafka container, as `docker compose exec kafka <tool> ...`.
fn kafka_tool(args: &[&str]) -> String {
    let mut all = vec!["exec", "-T", "kafka"];
    all.extend_from_slice(args);
    compose(&all)
}

fn sh(script: &str) -> Output {
    run("sh", &["-c", script])
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let logs = run("docker", &["compose", "logs", "--tail", "40"]);
    panic!("{what}: not within {timeout:?}\n{}", text(&logs));
}

/// The user's `.env`, if any, is put back when the test ends, however it ends.
struct DotEnv {
    path: PathBuf,
    saved: Option<Vec<u8>>,
}

impl DotEnv {
    fn from_example(extra: &str) -> DotEnv {
        let path = root().join(".env");
        let saved = std::fs::read(&path).ok();
        let example = std::fs::read_to_string(root().join(".env.example")).expect(".env.example");
        std::fs::write(&path, format!("{example}\n{extra}\n")).expect("writing .env");
        DotEnv { path, saved }
    }
}

impl Drop for DotEnv {
    fn drop(&mut self) {
        match &self.saved {
            Some(bytes) => {
                let _ = std::fs::write(&self.path, bytes);
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The project is taken down (volumes included) when the test ends, however it ends.
struct Project;

impl Drop for Project {
    fn drop(&mut self) {
        let _ = run("docker", &["compose", "down", "-v", "--timeout", "30"]);
    }
}

async fn mongo() -> mongodb::Database {
    mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?serverSelectionTimeoutMS=2000")
        .await
        .expect("MongoDB client")
        .database("event_processor")
}

async fn count(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap_or(0)
}

async fn total_users(db: &mongodb::Database) -> Option<i64> {
    let totals = db
        .collection::<Document>("user_statistics")
        .find_one(doc! { "_id": "totals" })
        .await
        .ok()??;
    totals
        .get_i64("total_users")
        .ok()
        .or_else(|| totals.get_i32("total_users").ok().map(i64::from))
}

async fn postgres() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=app password=app dbname=app",
        tokio_postgres::NoTls,
    )
    .await
    .expect("PostgreSQL on localhost:5432");
    tokio::spawn(conn);
    client
}

async fn insert_sign_ups(pg: &tokio_postgres::Client, tag: &str, n: usize) {
    for i in 0..n {
        let payload = format!(
            r#"{{"email": "{tag}{i}@example.com", "username": "{tag}{i}", "first_name": "A", "last_name": "B"}}"#
        );
        pg.execute(
            "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
             VALUES (gen_random_uuid(), gen_random_uuid(), 'user', 'UserCreated', $1::text::jsonb)",
            &[&payload],
        )
        .await
        .expect("insert");
    }
}

fn replicas() -> Vec<String> {
    compose(&["ps", "-q", "event-processor"])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// A Prometheus instant query's result vector.
fn prometheus(query: &str) -> Vec<serde_json::Value> {
    let out = run(
        "curl",
        &[
            "-fsS",
            "--get",
            "--data-urlencode",
            &format!("query={query}"),
            "http://localhost:9091/api/v1/query",
        ],
    );
    if !out.status.success() {
        return Vec::new();
    }
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The partition count of one line of `kafka-consumer-groups --describe --members` (its last column).
fn partitions_of_member(line: &str) -> u32 {
    line.split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn connector_running() -> bool {
    let out = run(
        "curl",
        &[
            "-fsS",
            &format!("http://localhost:8083/connectors/{CONNECTOR}/status"),
        ],
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["connector"]["state"] == "RUNNING"
        && status["tasks"]
            .as_array()
            .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t["state"] == "RUNNING"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_up_runs_the_pipeline_as_the_readme_says() {
    let version = run("docker", &["compose", "version"]);
    assert!(
        version.status.success(),
        "no `docker compose` (scripts/docker all installs the engine, the plugin and the images): {}",
        text(&version)
    );
    assert!(Path::new(&root().join("docker-compose.yml")).exists());
    compose(&["config", "--quiet"]);
    let _ = run("docker", &["compose", "down", "-v", "--timeout", "30"]);
    let _dotenv = DotEnv::from_example(&format!("KAFKA_GROUP_ID={DOTENV_GROUP}"));
    let _project = Project;

    // `docker compose up -d` to the README's first event in MongoDB.
    let started = Instant::now();
    compose(&["up", "-d"]);
    let up = started.elapsed();
    wait_for(
        "the connector RUNNING",
        Duration::from_secs(180),
        || async { connector_running() },
    )
    .await;
    let logs = sh(r#"docker compose logs debezium | grep "Kafka Connect started""#);
    assert!(
        logs.status.success(),
        "`docker compose logs debezium | grep \"Kafka Connect started\"` found nothing"
    );

    // The README's INSERT, typed into psql in the postgres container.
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let insert = readme
        .split("```sql")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the README's SQL block")
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(insert.contains("INSERT INTO activity.event_outbox"));
    let inserted = Instant::now();
    compose(&[
        "exec", "-T", "postgres", "psql", "-U", "app", "-d", "app", "-c", &insert,
    ]);
    let db = mongo().await;
    wait_for(
        "the README's user in MongoDB",
        Duration::from_secs(120),
        || async { count(&db, "users", doc! { "email": "test@example.com" }).await == 1 },
    )
    .await;
    let first_event = started.elapsed();
    println!(
        "docker compose up -d returned after {:.1} s; the README's INSERT was applied {:.2} s after it was typed, \
         {:.1} s after `docker compose up -d` started",
        up.as_secs_f64(),
        inserted.elapsed().as_secs_f64(),
        first_event.as_secs_f64()
    );
    // The same through mongosh in the mongodb container, as the README shows.
    let shell = compose(&[
        "exec",
        "-T",
        "mongodb",
        "mongosh",
        "event_processor",
        "--quiet",
        "--eval",
        r#"db.users.findOne({email: "test@example.com"}).username"#,
    ]);
    assert_eq!(shell.trim(), "testuser");

    // The Kafka tools, verbatim.
    let topics = kafka_tool(&[
        "kafka-topics",
        "--list",
        "--bootstrap-server",
        "localhost:9092",
    ]);
    assert!(
        topics
            .lines()
            .any(|t| t == "postgres.activity.event_outbox"),
        "{topics}"
    );
    let record = kafka_tool(&[
        "kafka-console-consumer",
        "--bootstrap-server",
        "localhost:9092",
        "--topic",
        "postgres.activity.event_outbox",
        "--from-beginning",
        "--max-messages",
        "1",
    ]);
    assert!(record.contains("test@example.com"), "{record}");
    // `.env` is what compose passes to the daemon: its group id is the one in Kafka.
    let groups = kafka_tool(&[
        "kafka-consumer-groups",
        "--bootstrap-server",
        "localhost:9092",
        "--list",
    ]);
    assert!(
        groups.lines().any(|g| g == DOTENV_GROUP),
        "the group id from .env is not in Kafka: {groups}"
    );

    // A manual registration after the automatic one: a clear conflict, still exactly one connector.
    let manual = ok(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "http://localhost:8083/connectors",
            "-H",
            "Content-Type: application/json",
            "-d",
            "@debezium/postgres-connector.json",
        ],
    );
    assert!(manual.trim_end().ends_with("409"), "{manual}");
    assert!(manual.contains("already exists"), "{manual}");
    let connectors = ok("curl", &["-fsS", "http://localhost:8083/connectors"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&connectors).unwrap(),
        serde_json::json!([CONNECTOR])
    );
    assert!(connector_running());

    // Three replicas share the six partitions; each record is applied once; Prometheus scrapes all three.
    compose(&["up", "-d", "--scale", "event-processor=3"]);
    assert_eq!(replicas().len(), 3);
    let describe = || {
        kafka_tool(&[
            "kafka-consumer-groups",
            "--bootstrap-server",
            "localhost:9092",
            "--describe",
            "--group",
            DOTENV_GROUP,
            "--members",
        ])
    };
    wait_for(
        "three members with partitions",
        Duration::from_secs(120),
        || async {
            let members = describe();
            members
                .lines()
                .filter(|l| l.starts_with(DOTENV_GROUP))
                .filter(|l| partitions_of_member(l) > 0)
                .count()
                == 3
        },
    )
    .await;
    let pg = postgres().await;
    let n = 300;
    insert_sign_ups(&pg, "scaled", n).await;
    wait_for("300 more users", Duration::from_secs(180), || async {
        count(&db, "users", doc! {}).await == n as u64 + 1
    })
    .await;
    wait_for(
        "the statistics caught up",
        Duration::from_secs(60),
        || async { total_users(&db).await == Some(n as i64 + 1) },
    )
    .await;
    wait_for(
        "Prometheus scraping three replicas",
        Duration::from_secs(90),
        || async { prometheus(r#"up{job="event-processor"} == 1"#).len() == 3 },
    )
    .await;
    // Prometheus scrapes every 5 s, so what it holds lags what the replicas did: wait until its samples account
    // for every sign-up (a replica's series appears with its first record).
    let consumed = |rows: &[serde_json::Value]| -> f64 {
        rows.iter()
            .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    };
    wait_for(
        "Prometheus holding every replica's records",
        Duration::from_secs(60),
        || async {
            let rows = prometheus("event_processor_records_consumed_total");
            rows.len() == 3 && consumed(&rows) >= n as f64
        },
    )
    .await;
    let per_replica = prometheus("event_processor_records_consumed_total");
    assert_eq!(per_replica.len(), 3, "{per_replica:?}");
    let busy = per_replica
        .iter()
        .filter(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
        .count();
    assert!(
        busy >= 2,
        "records reached fewer than two replicas: {per_replica:?}"
    );

    // Scaling down to two: the removed replica leaves as it stops, and its partitions move at once.
    let (sent, worst) = while_signing_up(&db, "scaledown", Duration::from_secs(30), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        compose(&["up", "-d", "--scale", "event-processor=2"]);
    })
    .await;
    assert_eq!(replicas().len(), 2);
    println!(
        "scaled from 3 replicas to 2: {sent} sign-ups; the longest any waited to be applied: {:.1} s",
        worst.as_secs_f64()
    );
    // The removed replica left the group as it stopped (the binary's default membership): nothing waited for its
    // session to time out.
    assert!(
        worst <= Duration::from_secs(5),
        "a sign-up waited {worst:?} after a scale-down"
    );

    // A crash loop: two replicas, one killed every 7 s for a minute and started again at once, while sign-ups
    // keep coming at about 20 a second. Reported: the longest any sign-up waited to be applied.
    let victim = replicas()[0].clone();
    let (sent, worst) = while_signing_up(&db, "loop", Duration::from_secs(60), async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(7)).await;
            ok("docker", &["kill", "-s", "KILL", &victim]);
            // Docker's restart policy may already be starting it: either way it runs again at once.
            let _ = run("docker", &["start", &victim]);
        }
    })
    .await;
    println!(
        "crash loop: {sent} sign-ups while one of two replicas was killed 8 times, 7 s apart; the longest any \
         waited to be applied: {:.1} s",
        worst.as_secs_f64()
    );
    assert!(
        worst <= Duration::from_secs(5),
        "a sign-up waited {worst:?} during the crash loop: the group stalled"
    );

    // A redeploy: both replicas recreated (new containers, new host names) while sign-ups keep coming.
    let (sent, worst) = while_signing_up(&db, "redeploy", Duration::from_secs(40), async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        compose(&[
            "up",
            "-d",
            "--force-recreate",
            "--scale",
            "event-processor=2",
            "event-processor",
        ]);
    })
    .await;
    println!(
        "redeploy (docker compose up -d --force-recreate): {sent} sign-ups; the longest any waited to be applied: \
         {:.1} s",
        worst.as_secs_f64()
    );

    // A rebuild of `users` in a container of the image (`docker compose run`, as docs/REBUILDING.md says) while
    // two replicas run and sign-ups keep coming: readers switch to the rebuilt collection, the replicas write there
    // (the rebuild waited for both at its fence), and every sign-up is in it once.
    let users_before = count(&db, "users", doc! {}).await;
    let total_before = total_users(&db).await.unwrap_or(0);
    let rebuild = tokio::task::spawn_blocking(|| {
        compose(&[
            "run",
            "--rm",
            "--no-deps",
            "-T",
            "event-processor",
            "rebuild",
            "--handler",
            "UserCreatedHandler",
        ])
    });
    let pg = postgres().await;
    let mut sent = 0usize;
    while !rebuild.is_finished() {
        insert_sign_ups(&pg, &format!("rebuild{sent}-"), 1).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = rebuild.await.unwrap();
    assert!(
        output.contains("finished") && output.contains("\"phase\":\"finishing\""),
        "{output}"
    );
    insert_sign_ups(&pg, "afterswitch", 20).await;
    sent += 20;
    let client =
        mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?serverSelectionTimeoutMS=2000")
            .await
            .unwrap();
    let routed = event_processor::routes::resolve(&client, "event_processor", "users")
        .await
        .unwrap();
    assert_ne!(
        routed.namespace().db,
        "event_processor",
        "readers follow the rebuilt users"
    );
    wait_for(
        "every sign-up in the rebuilt users, once",
        Duration::from_secs(180),
        || async {
            routed.count_documents(doc! {}).await.unwrap_or(0) == users_before + sent as u64
        },
    )
    .await;
    wait_for(
        "the statistics (not rebuilt) counted each once",
        Duration::from_secs(60),
        || async { total_users(&db).await == Some(total_before + sent as i64) },
    )
    .await;
    println!(
        "rebuild of users in a container while 2 replicas ran: {sent} sign-ups meanwhile, all applied once"
    );
}

/// Inserts a sign-up about every 50 ms for `duration` while `during` runs, waits until every one is in MongoDB
/// and the statistics counted each once, and returns how many were sent and the longest any of them took from
/// its INSERT to its document.
async fn while_signing_up(
    db: &mongodb::Database,
    tag: &str,
    duration: Duration,
    during: impl std::future::Future<Output = ()>,
) -> (usize, Duration) {
    let before = count(db, "users", doc! {}).await;
    let total_before = total_users(db).await.unwrap_or(0);
    let pg = postgres().await;
    let prefix = format!("{tag}-");
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let prefix = prefix.clone();
        let (produced, finished) = (produced.clone(), finished.clone());
        async move {
            let mut inserted = Vec::new();
            let deadline = Instant::now() + duration;
            while Instant::now() < deadline {
                insert_sign_ups(&pg, &format!("{prefix}{}-", inserted.len()), 1).await;
                inserted.push(Instant::now());
                produced.store(inserted.len(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            finished.store(true, Ordering::SeqCst);
            inserted
        }
    };
    let watcher_db = db.clone();
    let watcher = async move {
        // When each sign-up's document was first seen, by its index.
        let mut seen: HashMap<usize, Instant> = HashMap::new();
        let give_up = Instant::now() + duration + Duration::from_secs(180);
        while Instant::now() < give_up {
            let done = finished.load(Ordering::SeqCst);
            if let Ok(mut cursor) = watcher_db
                .collection::<Document>("users")
                .find(doc! { "username": { "$regex": format!("^{prefix}") } })
                .projection(doc! { "username": 1, "_id": 0 })
                .await
            {
                let now = Instant::now();
                while let Some(Ok(d)) = cursor.next().await {
                    let index = d
                        .get_str("username")
                        .ok()
                        .and_then(|u| u.strip_prefix(&prefix))
                        .and_then(|u| u.split('-').next())
                        .and_then(|i| i.parse::<usize>().ok());
                    if let Some(i) = index {
                        seen.entry(i).or_insert(now);
                    }
                }
            }
            if done && seen.len() >= produced.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    };
    let (inserted, (), seen) = tokio::join!(producer, during, watcher);
    let sent = inserted.len();
    wait_for(
        "every sign-up applied",
        Duration::from_secs(180),
        || async { count(db, "users", doc! {}).await == before + sent as u64 },
    )
    .await;
    wait_for(
        "the statistics counted each once",
        Duration::from_secs(60),
        || async { total_users(db).await == Some(total_before + sent as i64) },
    )
    .await;
    let worst = inserted
        .iter()
        .enumerate()
        .map(|(i, at)| match seen.get(&i) {
            Some(applied) => applied.saturating_duration_since(*at),
            // Applied after the watcher stopped looking: at least until then.
            None => Instant::now().saturating_duration_since(*at),
        })
        .max()
        .unwrap_or_default();
    (sent, worst)
}
