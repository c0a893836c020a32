//! Rebuilding read models from history while the live daemon runs (`event-processor rebuild`), against real
//! Kafka and a real MongoDB-wire server: 10,000 events of every shipped type applied live, a read model damaged
//! and rebuilt while 100 events/s keep flowing (the rebuild killed with SIGKILL half-way and resumed), a handler
//! added after the fact brought up from history, each result compared document by document with a from-scratch
//! run, and readers following the route table throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::process::{Proc, log_lines};
use common::*;
use event_processor::handler::guarded_upsert;
use event_processor::{EventHandler, HandlerContext, HandlerError, OutboxEvent, Registry};
use mongodb::bson::{Document, doc};
use serde_json::json;

const PARTITIONS: i32 = 3;
/// A bound on each stage, not a speed requirement (waits for committed offsets fail when they stop moving for
/// this long): the slowest stage, a live daemon applying some 30,000 events of every handler while a rebuild
/// shares the MongoDB-wire server, has taken over 240 s on a 2-core machine.
const WAIT: Duration = Duration::from_secs(480);

/// `n` events of every shipped type, in an order a real application produces them: users sign up, some organise
/// activities, others join them.
fn history(n: usize, tag: &str) -> Vec<Rec> {
    let mut out = Vec::with_capacity(n);
    let mut users: Vec<String> = Vec::new();
    let mut activities: Vec<String> = Vec::new();
    let mut i = 0usize;
    while out.len() < n {
        i += 1;
        let id = new_id();
        match i % 5 {
            0 | 1 => {
                let user = new_id();
                out.push(change_event(
                    "c",
                    &id,
                    &user,
                    "UserCreated",
                    &json!({ "email": format!("{tag}{i}@example.com"), "name": format!("User {i}") }),
                ));
                users.push(user);
            }
            2 if !users.is_empty() => {
                let activity = new_id();
                out.push(change_event(
                    "c",
                    &id,
                    &activity,
                    "ActivityCreated",
                    &json!({ "title": format!("Activity {i}"), "organizer_id": users[i % users.len()] }),
                ));
                activities.push(activity);
            }
            _ if !activities.is_empty() && !users.is_empty() => {
                out.push(change_event(
                    "c",
                    &id,
                    &activities[i % activities.len()],
                    "ParticipantJoined",
                    &json!({ "user_id": users[(i * 7) % users.len()] }),
                ));
            }
            _ => {}
        }
    }
    out
}

/// A read model added after the fact: each user's e-mail domain.
struct EmailDomainHandler;

#[async_trait]
impl EventHandler for EmailDomainHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "EmailDomainHandler"
    }
    fn collections(&self) -> Vec<String> {
        vec!["email_domains".into()]
    }
    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let email = event.payload["email"].as_str().unwrap_or_default();
        let domain = email.rsplit('@').next().unwrap_or_default();
        guarded_upsert(
            ctx,
            "email_domains",
            doc! { "_id": &event.aggregate_id },
            doc! { "$set": { "domain": domain } },
        )
        .await
    }
}

fn registry(with_new: bool) -> Registry {
    let mut r = Registry::new();
    event_processor::handlers::register_all(&mut r).unwrap();
    if with_new {
        r.register(Arc::new(EmailDomainHandler)).unwrap();
    }
    r
}

/// Every document of `collection` in `database`, sorted by `_id`.
async fn documents(client: &mongodb::Client, database: &str, collection: &str) -> Vec<Document> {
    let mut cur = client
        .database(database)
        .collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .expect("find");
    let mut out = Vec::new();
    while cur.advance().await.expect("cursor") {
        out.push(cur.deserialize_current().expect("document"));
    }
    out
}

/// The database readers find `collection` in now.
async fn routed(client: &mongodb::Client, home: &str, collection: &str) -> String {
    let table = event_processor::routes::load(&client.database(home))
        .await
        .expect("route table");
    table.database_of(collection, home).to_string()
}

/// Produces `per_second` mixed events each second until `stop`; counts what it produced.
fn keep_producing(
    env: &TestEnv,
    per_second: usize,
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let (kafka, topic) = (env.kafka.clone(), env.topic.clone());
    tokio::spawn(async move {
        let mut round = 0;
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            round += 1;
            let batch = history(per_second, &format!("live{round}x"));
            produce(&kafka, &topic, &batch).await;
            produced.fetch_add(batch.len() as u64, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
        }
    })
}

/// Reads `users` through the route table until `stop`, pausing 300 ms between reads; the fewest documents any read
/// saw, and the number of reads that failed or found the collection gone. The pause is there because a count
/// scans the collection: on the test stack's MongoDB-wire server, counting some 14,000 documents takes about
/// 0.35 s of its one interpreter thread, and counts back to back would leave the daemons under test a small
/// share of the server.
fn keep_reading(
    client: mongodb::Client,
    home: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, u64)> {
    tokio::spawn(async move {
        let (mut fewest, mut failures, mut reads) = (u64::MAX, 0u64, 0u64);
        while !stop.load(Ordering::SeqCst) {
            let read = async {
                let coll = event_processor::routes::resolve(&client, &home, "users").await?;
                coll.count_documents(doc! {}).await
            };
            match read.await {
                Ok(n) => fewest = fewest.min(n),
                Err(_) => failures += 1,
            }
            reads += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (fewest, failures, reads)
    })
}

/// The progress lines a rebuild process printed.
fn progress(name: &str) -> Vec<serde_json::Value> {
    log_lines(name)
        .into_iter()
        .filter(|l| l.get("phase").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilt_read_models_equal_a_from_scratch_run_while_the_live_daemon_runs() {
    init_log();
    let env = TestEnv::new("rebuild", PARTITIONS).await;
    let client = mongodb::Client::with_uri_str(&env.mongo_uri).await.unwrap();

    // 10,000 events of every type, applied live.
    let first = history(10_000, "u");
    env.produce(&first).await;
    let mut produced_total = first.len() as i64;
    let live = Proc::start(&env, "rebuild-live");
    wait_committed(&env, PARTITIONS, produced_total, WAIT).await;
    let users_live = env.count("users", doc! {}).await;
    assert_eq!(users_live, 4_000, "every sign-up applied live");

    // The `users` read model damaged: half of its documents deleted (a handler bug, an operator's mistake).
    env.db
        .collection::<Document>("users")
        .delete_many(doc! { "_id": { "$lt": "8" } })
        .await
        .unwrap();
    let damaged = env.count("users", doc! {}).await;
    assert!(damaged < users_live, "documents were deleted");

    // Rebuilt while 100 events/s keep flowing and readers keep reading.
    let stop_producing = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = keep_producing(&env, 100, stop_producing.clone(), produced.clone());
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = keep_reading(client.clone(), env.db_name.clone(), stop_reading.clone());

    let rebuild_vars = [("HTTP_PORT", "0"), ("LOG_LEVEL", "warn")];
    let mut first_run = Proc::command(
        &env,
        "rebuild-first",
        &["rebuild", "--handler", "UserCreatedHandler"],
        &rebuild_vars,
    );
    // Killed half-way through its history (SIGKILL: no shutdown, no final commit).
    let deadline = Instant::now() + WAIT;
    let at_kill = loop {
        let lines = progress("rebuild-first");
        if let Some(l) = lines.last()
            && l["phase"] == "catching_up"
            && l["records_done"].as_i64().unwrap_or(0) >= 3_000
        {
            break l.clone();
        }
        assert!(
            first_run.exited().is_none(),
            "the rebuild ended before it could be killed half-way"
        );
        assert!(
            Instant::now() < deadline,
            "the rebuild made no progress: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first_run.kill9();
    let done_at_kill = at_kill["records_done"].as_i64().unwrap();
    assert!(
        done_at_kill < at_kill["records_total"].as_i64().unwrap(),
        "killed before the end: {at_kill}"
    );
    assert_eq!(
        routed(&client, &env.db_name, "users").await,
        env.db_name,
        "nothing switched before the rebuild caught up"
    );

    // Started again with the same handler: it resumes (the same rebuild, not from its start) and finishes.
    let started = Instant::now();
    let mut second_run = Proc::command(
        &env,
        "rebuild-second",
        &["rebuild", "--handler", "UserCreatedHandler"],
        &rebuild_vars,
    );
    let status = second_run
        .wait_exit(WAIT)
        .expect("the resumed rebuild did not finish");
    assert!(status.success(), "the resumed rebuild failed: {status:?}");
    let resumed = progress("rebuild-second");
    let first_line = resumed.first().expect("progress lines").clone();
    assert_eq!(
        first_line["rebuild"], at_kill["rebuild"],
        "the same rebuild resumed"
    );
    assert!(
        first_line["records_done"].as_i64().unwrap() > 0,
        "resumed from its committed progress, not from offset 0: {first_line}"
    );
    eprintln!("resumed rebuild finished in {:?}", started.elapsed());

    // Readers were never without the model, and the switch made the whole model visible.
    stop_producing.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    produced_total += produced.load(Ordering::SeqCst) as i64;
    wait_committed(&env, PARTITIONS, produced_total, WAIT).await;
    stop_reading.store(true, Ordering::SeqCst);
    let (fewest, failures, reads) = reader.await.unwrap();
    assert!(reads > 50, "the reader kept reading ({reads} reads)");
    assert_eq!(failures, 0, "every read of the routed model succeeded");
    assert!(
        fewest >= damaged,
        "no read saw fewer documents than before the rebuild ({fewest} < {damaged})"
    );
    let rebuilt_db = routed(&client, &env.db_name, "users").await;
    assert_ne!(
        rebuilt_db, env.db_name,
        "readers follow the rebuilt collection"
    );
    assert_eq!(
        routed(&client, &env.db_name, "activities").await,
        env.db_name,
        "read models that were not rebuilt stay where they were"
    );
    // Past the fence no live process writes the old collection; it is kept until --drop-retired.
    let old_at_switch = env.count("users", doc! {}).await;
    assert!(old_at_switch >= damaged);

    // A handler added after the fact: the live daemon runs it from now, a rebuild brings it up from history.
    live.terminate();
    let live_new = env.start_with(registry(true), &[]);
    let more = history(500, "late");
    env.produce(&more).await;
    produced_total += more.len() as i64;
    wait_committed(&env, PARTITIONS, produced_total, WAIT).await;
    let from_now = env.count("email_domains", doc! {}).await;
    assert!(
        from_now > 0 && from_now < 4_000,
        "the new handler alone saw only the events from its start ({from_now})"
    );
    let outcome = event_processor::rebuild::run(
        env.config(&[]),
        registry(true),
        event_processor::rebuild::Options {
            handlers: vec!["EmailDomainHandler".into()],
            allow_incomplete_history: false,
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rebuild of the new handler")
    .expect("finished");
    assert_eq!(outcome.collections, vec!["email_domains".to_string()]);

    // Both rebuilt models equal what a from-scratch run of every handler produces, document by document, and
    // the rebuilt `users` model is still kept by the live daemon after the switch.
    let after_switch = history(200, "after");
    env.produce(&after_switch).await;
    produced_total += after_switch.len() as i64;
    wait_committed(&env, PARTITIONS, produced_total, WAIT).await;
    live_new.stop().await;
    assert_eq!(
        env.count("users", doc! {}).await,
        old_at_switch,
        "the retired collection received nothing after the switch"
    );

    let mut scratch = env.clone_with_new_group();
    scratch.db_name = unique("scratch");
    scratch.db = client.database(&scratch.db_name);
    let from_scratch = scratch.start_with(registry(true), &[]);
    wait_committed(&scratch, PARTITIONS, produced_total, WAIT).await;
    from_scratch.stop().await;
    for collection in ["users", "email_domains"] {
        let rebuilt = documents(
            &client,
            &routed(&client, &env.db_name, collection).await,
            collection,
        )
        .await;
        let expected = documents(&client, &scratch.db_name, collection).await;
        assert!(!expected.is_empty());
        assert_eq!(
            rebuilt.len(),
            expected.len(),
            "{collection}: as many documents as a from-scratch run"
        );
        assert!(
            rebuilt == expected,
            "{collection}: every document equals the from-scratch run's"
        );
    }
    let live_activities = documents(&client, &env.db_name, "activities").await;
    assert!(
        live_activities == documents(&client, &scratch.db_name, "activities").await,
        "activities: untouched by the rebuilds and still kept live"
    );
    // The statistics' buckets list event ids in the order they were applied, which differs between runs; the
    // counts must not.
    let counts = |docs: Vec<Document>| -> Vec<(String, i64)> {
        docs.iter()
            .filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_string();
                let n = ["total_users", "signups", "count"].iter().find_map(|k| {
                    d.get(k)
                        .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
                })?;
                Some((id, n))
            })
            .collect()
    };
    let live_counts = counts(documents(&client, &env.db_name, "user_statistics").await);
    assert!(live_counts.iter().any(|(id, _)| id == "totals"));
    assert_eq!(
        live_counts,
        counts(documents(&client, &scratch.db_name, "user_statistics").await),
        "user_statistics: the same counts as a from-scratch run"
    );

    // The retired collections go only when asked to.
    let mut drop = Proc::command(&env, "rebuild-drop", &["rebuild", "--drop-retired"], &[]);
    assert!(
        drop.wait_exit(Duration::from_secs(60))
            .expect("drop-retired ended")
            .success()
    );
    let names = env.db.list_collection_names().await.unwrap();
    assert!(
        !names.contains(&"users".to_string()),
        "the retired `users` was dropped: {names:?}"
    );
    assert_eq!(
        documents(
            &client,
            &routed(&client, &env.db_name, "users").await,
            "users"
        )
        .await
        .len() as u64,
        documents(&client, &scratch.db_name, "users").await.len() as u64,
        "the live model is untouched by --drop-retired"
    );
}

/// A rebuild refuses to start when the topics no longer hold the oldest records and no snapshot re-emitted them,
/// and names the offsets it cannot reach.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_over_an_incomplete_history_says_so_before_it_starts() {
    init_log();
    let env = TestEnv::new("rebuild_trimmed", 1).await;
    env.produce(&history(20, "t")).await;
    // Retention removed the first 5 records.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.kafka)
            .create()
            .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&env.topic, 0, rdkafka::Offset::Offset(5))
        .unwrap();
    admin
        .delete_records(&tpl, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete_records");
    let mut run = Proc::command(
        &env,
        "rebuild-trimmed",
        &["rebuild", "--handler", "UserCreatedHandler"],
        &[],
    );
    let status = run
        .wait_exit(Duration::from_secs(60))
        .expect("the rebuild ended");
    assert!(
        !status.success(),
        "a rebuild over a trimmed topic must not start"
    );
    let text = std::fs::read_to_string(common::process::log_path("rebuild-trimmed")).unwrap();
    assert!(
        text.contains(&format!("{}/0 offsets 0..5", env.topic))
            && text.contains("history is incomplete"),
        "the refusal names the offsets it cannot reach: {text}"
    );
    let client = mongodb::Client::with_uri_str(&env.mongo_uri).await.unwrap();
    assert!(
        client
            .list_database_names()
            .await
            .unwrap()
            .iter()
            .all(|d| !d.starts_with(&format!("{}_rebuild", env.db_name))),
        "nothing was started"
    );

    // Allowed explicitly, it rebuilds from what is left.
    let mut allowed = Proc::command(
        &env,
        "rebuild-trimmed-allowed",
        &[
            "rebuild",
            "--handler",
            "UserCreatedHandler",
            "--allow-incomplete-history",
        ],
        &[],
    );
    let status = allowed
        .wait_exit(Duration::from_secs(120))
        .expect("the rebuild ended");
    assert!(status.success());
    let rebuilt = routed(&client, &env.db_name, "users").await;
    assert_ne!(rebuilt, env.db_name);
}
