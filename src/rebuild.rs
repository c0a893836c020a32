//! Rebuilding read models from history while the live daemon keeps running: `event-processor rebuild`.
//!
//! A rebuild runs only the named handlers, under a consumer group of its own, from the earliest retained offset
//! of the subscribed topics into a database of its own (`<MONGODB_DATABASE>_rebuild_<n>`): the same pipeline,
//! ledger and writes as the live daemon, so the result is what a from-scratch run produces. Then:
//!
//! 1. **Catching up**: until its committed offsets reach the live group's (or, on a partition the live group
//!    never committed, the end the topic had when the rebuild started).
//! 2. **Switch**: one update of the route table ([`crate::routes`]) sends readers, and the live daemon's
//!    handlers, to the rebuilt collections; the old ones are listed as retired and kept.
//! 3. **Fence**: it keeps following the topics until every live daemon process of the group says it writes by
//!    the new table (no event can reach the old collections any more).
//! 4. **Finishing**: it follows on to the end the topics had at the fence, so that every event a live daemon
//!    may have written to the old place is in the new one too, then commits and stops. From there on the live
//!    daemon alone keeps the rebuilt model. Events both write are applied once: every handler write is an
//!    idempotent, guarded upsert.
//!
//! Progress is recorded in MongoDB (`read_models`, `_id: "rebuild:<n>"`) and in the rebuild's consumer group, so
//! a rebuild that is killed resumes where it was when started again with the same handlers.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mongodb::Database;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::options::ReturnDocument;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::{self, Target};
use crate::config::Config;
use crate::kafka::client_config;
use crate::registry::Registry;
use crate::routes::{self, READ_MODELS, ROUTES_ID, RouteTable, WRITERS};
use crate::store;

/// The environment variable holding the outbox database's URL (`postgres://user:password@host:port/db`), read
/// by `event-processor snapshot-outbox` only; a secret, hidden from every output.
pub use crate::names::OUTBOX_DATABASE_URL;
/// `_id` of the record of the last snapshot requested through the signal table, in [`READ_MODELS`].
pub const SNAPSHOT_ID: &str = "snapshot";
const TICK: Duration = Duration::from_secs(1);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// What to rebuild.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Handler names; every handler that writes one of their collections must be among them.
    pub handlers: Vec<String>,
    /// Start even though the topics no longer hold the whole history (the missing offsets are named).
    pub allow_incomplete_history: bool,
}

/// What a finished rebuild did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub number: i64,
    pub database: String,
    /// The route table generation the switch made.
    pub generation: i64,
    pub collections: Vec<String>,
    /// Records the rebuild's group moved past, over every partition, in this run.
    pub records: i64,
    pub elapsed: Duration,
}

/// A topic partition: (topic, partition).
type Tp = (String, i32);

/// The rebuild's record in MongoDB.
#[derive(Clone, Debug)]
struct Record {
    number: i64,
    handlers: Vec<String>,
    database: String,
    group: String,
    state: State,
    /// The generation its switch made, once switched.
    generation: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    CatchingUp,
    Switched,
    Done,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::CatchingUp => "catching_up",
            State::Switched => "switched",
            State::Done => "done",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "switched" => State::Switched,
            "done" => State::Done,
            _ => State::CatchingUp,
        }
    }
}

impl Record {
    fn id(&self) -> String {
        format!("rebuild:{}", self.number)
    }

    fn from_doc(d: &Document) -> Option<Record> {
        Some(Record {
            number: crate::writer::bson_int(d.get("number"))?,
            handlers: match d.get("handlers") {
                Some(Bson::Array(a)) => a
                    .iter()
                    .filter_map(|h| h.as_str().map(str::to_string))
                    .collect(),
                _ => return None,
            },
            database: d.get_str("database").ok()?.to_string(),
            group: d.get_str("group").ok()?.to_string(),
            state: State::parse(d.get_str("state").unwrap_or_default()),
            generation: crate::writer::bson_int(d.get("generation")).unwrap_or(0),
        })
    }
}

/// The collections the handlers write, checked: each handler declares some, and no handler left out writes one.
pub fn collections_of(registry: &Registry, handlers: &[String]) -> anyhow::Result<Vec<String>> {
    if handlers.is_empty() {
        bail!("name at least one handler to rebuild (--handler NAME)");
    }
    let mut collections = Vec::new();
    for name in handlers {
        let Some(h) = registry.by_name(name) else {
            bail!(
                "no handler is named `{name}`; the handlers are {}",
                registry.names().join(", ")
            );
        };
        let own = h.collections();
        if own.is_empty() {
            bail!(
                "handler `{name}` declares no collections (EventHandler::collections): there is nothing to rebuild"
            );
        }
        collections.extend(own);
    }
    collections.sort();
    collections.dedup();
    for other in registry.handlers() {
        if handlers.iter().any(|n| n == other.name()) {
            continue;
        }
        if let Some(shared) = other
            .collections()
            .into_iter()
            .find(|c| collections.contains(c))
        {
            bail!(
                "collection `{shared}` is also written by `{}`: rebuild it together (add --handler {})",
                other.name(),
                other.name()
            );
        }
    }
    Ok(collections)
}

/// Runs a rebuild to its end (or until `shutdown`: then it stops where it is, and resumes when started again).
pub async fn run(
    config: Config,
    registry: Registry,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Outcome>> {
    let started = Instant::now();
    let mut handlers = options.handlers.clone();
    handlers.sort();
    handlers.dedup();
    let collections = collections_of(&registry, &handlers)?;
    let client = connect(&config).await?;
    let home = client.database(&config.mongodb_database);
    // The live group's client, never subscribed: it reads the topics' metadata and offsets and the live group's
    // progress, and does not join the group.
    let live = Group::new(&config, &config.kafka_group_id)?;
    let partitions = partitions(&live.consumer, &config.topics())?;
    if partitions.is_empty() {
        bail!(
            "the subscribed topics ({}) have no partitions: nothing to rebuild from",
            config.kafka_topics
        );
    }
    let low = watermarks(&live.consumer, &partitions, true)?;
    check_history(&home, &low, options.allow_incomplete_history).await?;

    let record = find_or_create(&home, &config, &handlers).await?;
    info!(
        rebuild = record.number,
        handlers = ?record.handlers,
        database = %record.database,
        group = %record.group,
        state = record.state.as_str(),
        "Rebuild"
    );
    crate::http::set_global_labels(vec![("rebuild".into(), record.number.to_string())]);

    let mut rebuild_config = config.clone();
    rebuild_config.kafka_group_id = record.group.clone();
    rebuild_config.kafka_group_instance_id = "none".into();
    rebuild_config.kafka_auto_offset_reset = "earliest".into();
    let pipeline_stop = CancellationToken::new();
    let pipeline = tokio::spawn(app::serve(
        rebuild_config,
        registry.only(&handlers),
        Target::Rebuild {
            database: record.database.clone(),
        },
        pipeline_stop.clone(),
    ));

    let own = Group::new(&config, &record.group)?;
    let at_start = own.committed(&partitions, &low)?;
    let mut watch = Watch {
        home: &home,
        live,
        own,
        partitions,
        low,
        record,
        collections,
        progress: Progress::new(),
    };
    let result = tokio::select! {
        r = watch.drive() => r.map(Some),
        _ = shutdown.cancelled() => Ok(None),
        r = pipeline_ended(&pipeline) => Err(r),
    };
    pipeline_stop.cancel();
    match pipeline.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("the rebuild's pipeline failed")),
        Err(e) => bail!("the rebuild's pipeline panicked: {e}"),
    }
    let Some(generation) = result? else {
        info!(
            rebuild = watch.record.number,
            "Rebuild stopped; start it again with the same handlers to resume"
        );
        return Ok(None);
    };
    let end = watch.own.committed(&watch.partitions, &watch.low)?;
    let records = watch
        .partitions
        .iter()
        .map(|tp| end[tp] - at_start[tp])
        .sum();
    set_state(&home, &watch.record, State::Done, None).await?;
    let outcome = Outcome {
        number: watch.record.number,
        database: watch.record.database.clone(),
        generation,
        collections: watch.collections.clone(),
        records,
        elapsed: started.elapsed(),
    };
    info!(?outcome, "Rebuild finished");
    Ok(Some(outcome))
}

/// The MongoDB client of the rebuild's commands.
async fn connect(config: &Config) -> anyhow::Result<mongodb::Client> {
    store::connect(config.mongodb_uri.expose(), "event-processor-rebuild")
        .await
        .with_context(|| format!("parsing MONGODB_URI {}", config.mongodb_uri))
}

/// Waits for a pipeline task that ends on its own (it should not before it is stopped): its error.
async fn pipeline_ended(pipeline: &tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Error {
    loop {
        if pipeline.is_finished() {
            return anyhow::anyhow!("the rebuild's pipeline stopped before the rebuild finished");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A consumer group whose committed offsets are read.
struct Group {
    name: String,
    consumer: BaseConsumer,
}

impl Group {
    fn new(config: &Config, name: &str) -> anyhow::Result<Group> {
        let consumer = client_config(config)
            .set("group.id", name)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the Kafka client")?;
        Ok(Group {
            name: name.to_string(),
            consumer,
        })
    }

    /// The group's committed offset of each partition; `default[tp]` where it has none.
    fn committed(
        &self,
        partitions: &[Tp],
        default: &BTreeMap<Tp, i64>,
    ) -> anyhow::Result<BTreeMap<Tp, i64>> {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, KAFKA_TIMEOUT)
            .with_context(|| format!("reading the committed offsets of group {}", self.name))?;
        Ok(partitions
            .iter()
            .map(|tp| {
                let offset = match got.find_partition(&tp.0, tp.1).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => default[tp],
                };
                (tp.clone(), offset)
            })
            .collect())
    }

    /// How many consumers are members of the group now.
    fn members(&self) -> anyhow::Result<usize> {
        let list = self
            .consumer
            .fetch_group_list(Some(&self.name), KAFKA_TIMEOUT)
            .with_context(|| format!("describing group {}", self.name))?;
        Ok(list
            .groups()
            .iter()
            .filter(|g| g.name() == self.name)
            .map(|g| g.members().len())
            .sum())
    }
}

/// The partitions of the subscribed topics (an entry starting with `^` is a pattern, as in `KAFKA_TOPICS`).
fn partitions(kafka: &BaseConsumer, topics: &[String]) -> anyhow::Result<Vec<Tp>> {
    let metadata = kafka
        .fetch_metadata(None, KAFKA_TIMEOUT)
        .context("reading the topics' metadata")?;
    let mut out = Vec::new();
    for entry in topics {
        let pattern = entry
            .starts_with('^')
            .then(|| regex::Regex::new(entry))
            .transpose()
            .with_context(|| format!("KAFKA_TOPICS pattern {entry}"))?;
        for t in metadata.topics() {
            let matches = match &pattern {
                Some(re) => re.is_match(t.name()),
                None => t.name() == entry,
            };
            if matches {
                out.extend(
                    t.partitions()
                        .iter()
                        .map(|p| (t.name().to_string(), p.id())),
                );
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The low (`low == true`) or high watermark of each partition.
fn watermarks(
    kafka: &BaseConsumer,
    partitions: &[Tp],
    low: bool,
) -> anyhow::Result<BTreeMap<Tp, i64>> {
    partitions
        .iter()
        .map(|(t, p)| {
            let (lo, hi) = kafka
                .fetch_watermarks(t, *p, KAFKA_TIMEOUT)
                .with_context(|| format!("reading the offsets of {t}/{p}"))?;
            Ok(((t.clone(), *p), if low { lo } else { hi }))
        })
        .collect()
}

/// The offsets of each partition a snapshot's records start at, as `snapshot-outbox` recorded them.
async fn snapshot_offsets(home: &Database) -> anyhow::Result<Option<BTreeMap<Tp, i64>>> {
    let found = home
        .collection::<Document>(READ_MODELS)
        .find_one(doc! { "_id": SNAPSHOT_ID })
        .await?;
    Ok(found.map(|d| {
        d.get_array("offsets")
            .map(|a| {
                a.iter()
                    .filter_map(Bson::as_document)
                    .filter_map(|o| {
                        let tp = (
                            o.get_str("topic").ok()?.to_string(),
                            crate::writer::bson_int(o.get("partition"))? as i32,
                        );
                        Some((tp, crate::writer::bson_int(o.get("offset"))?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }))
}

/// Refuses to start when the topics no longer hold the whole history and no snapshot re-emitted it, naming the
/// offsets that cannot be read.
async fn check_history(
    home: &Database,
    low: &BTreeMap<Tp, i64>,
    allow_incomplete: bool,
) -> anyhow::Result<()> {
    let trimmed: Vec<(&Tp, i64)> = low
        .iter()
        .filter(|(_, l)| **l > 0)
        .map(|(tp, l)| (tp, *l))
        .collect();
    if trimmed.is_empty() {
        return Ok(());
    }
    let snapshot = snapshot_offsets(home).await?;
    let covered = |tp: &Tp, l: i64| {
        snapshot
            .as_ref()
            .and_then(|s| s.get(tp))
            .is_some_and(|s| l <= *s)
    };
    let missing: Vec<String> = trimmed
        .iter()
        .filter(|(tp, l)| !covered(tp, *l))
        .map(|(tp, l)| format!("{}/{} offsets 0..{}", tp.0, tp.1, l))
        .collect();
    if missing.is_empty() {
        info!(
            "The topics' oldest records are gone, but a snapshot re-emitted the outbox after them"
        );
        return Ok(());
    }
    let message = format!(
        "the history is incomplete: the topics no longer hold {} (retention), and no outbox snapshot re-emitted \
         it; request one with `event-processor snapshot-outbox` and rebuild once it has run, or pass \
         --allow-incomplete-history to rebuild from what is left",
        missing.join(", ")
    );
    if allow_incomplete {
        warn!(missing = ?missing, "Rebuilding from an incomplete history");
        Ok(())
    } else {
        bail!(message)
    }
}

/// The unfinished rebuild of exactly these handlers, or a new one. Refuses while another unfinished rebuild
/// shares a handler.
async fn find_or_create(
    home: &Database,
    config: &Config,
    handlers: &[String],
) -> anyhow::Result<Record> {
    use futures::TryStreamExt;
    let coll = home.collection::<Document>(READ_MODELS);
    let open: Vec<Document> = coll
        .find(doc! { "kind": "rebuild", "state": { "$ne": State::Done.as_str() } })
        .await?
        .try_collect()
        .await?;
    for r in open.iter().filter_map(Record::from_doc) {
        if r.handlers == handlers {
            info!(
                rebuild = r.number,
                "Resuming the unfinished rebuild of these handlers"
            );
            return Ok(r);
        }
        if let Some(h) = r.handlers.iter().find(|h| handlers.contains(h)) {
            bail!(
                "rebuild {} of {:?} is unfinished and also rebuilds `{h}`: run it to its end first (event-processor rebuild{})",
                r.number,
                r.handlers,
                r.handlers
                    .iter()
                    .map(|h| format!(" --handler {h}"))
                    .collect::<String>()
            );
        }
    }
    let counter = coll
        .find_one_and_update(
            doc! { "_id": ROUTES_ID },
            doc! { "$inc": { "rebuilds": 1_i64 } },
        )
        .upsert(true)
        .return_document(ReturnDocument::After)
        .await?
        .context("the route table vanished")?;
    let number = crate::writer::bson_int(counter.get("rebuilds")).unwrap_or(1);
    let database = format!("{}_rebuild_{number}", config.mongodb_database);
    if database.len() > 63 {
        bail!("MONGODB_DATABASE is too long to name a rebuild's database after it ({database})");
    }
    let record = Record {
        number,
        handlers: handlers.to_vec(),
        database,
        group: format!("{}.rebuild.{number}", config.kafka_group_id),
        state: State::CatchingUp,
        generation: 0,
    };
    coll.insert_one(doc! {
        "_id": record.id(),
        "kind": "rebuild",
        "number": number,
        "handlers": handlers,
        "database": &record.database,
        "group": &record.group,
        "state": record.state.as_str(),
        "started_at": DateTime::now(),
    })
    .await?;
    Ok(record)
}

async fn set_state(
    home: &Database,
    record: &Record,
    state: State,
    generation: Option<i64>,
) -> anyhow::Result<()> {
    let mut set =
        doc! { "state": state.as_str(), format!("{}_at", state.as_str()): DateTime::now() };
    if let Some(g) = generation {
        set.insert("generation", g);
    }
    home.collection::<Document>(READ_MODELS)
        .update_one(doc! { "_id": record.id() }, doc! { "$set": set })
        .await?;
    Ok(())
}

/// The rebuild's supervisor: watches both groups' progress and moves the rebuild through its phases.
struct Watch<'a> {
    home: &'a Database,
    live: Group,
    own: Group,
    partitions: Vec<Tp>,
    low: BTreeMap<Tp, i64>,
    record: Record,
    collections: Vec<String>,
    progress: Progress,
}

impl Watch<'_> {
    /// Runs the phases to the end; the generation of the switch.
    async fn drive(&mut self) -> anyhow::Result<i64> {
        let high_at_start = watermarks(&self.live.consumer, &self.partitions, false)?;
        if self.record.state == State::CatchingUp {
            loop {
                let target = self.live.committed(&self.partitions, &high_at_start)?;
                let own = self.own.committed(&self.partitions, &self.low)?;
                self.progress
                    .show(self.record.number, "catching_up", &self.low, &own, &target);
                if reached(&own, &target) {
                    break;
                }
                tokio::time::sleep(TICK).await;
            }
            let generation = switch(self.home, &self.record, &self.collections).await?;
            set_state(self.home, &self.record, State::Switched, Some(generation)).await?;
            self.record.state = State::Switched;
            self.record.generation = generation;
            info!(
                rebuild = self.record.number,
                generation,
                collections = ?self.collections,
                database = %self.record.database,
                "Switched: readers and the live daemon now use the rebuilt collections"
            );
        }
        // The fence: until every live process writes by the new table, the rebuild keeps following.
        let mut waited = Instant::now();
        loop {
            let own = self.own.committed(&self.partitions, &self.low)?;
            let high = watermarks(&self.live.consumer, &self.partitions, false)?;
            self.progress
                .show(self.record.number, "switched", &self.low, &own, &high);
            let (ready, lagging) = self.live_writers_switched().await?;
            if ready {
                break;
            }
            if waited.elapsed() > Duration::from_secs(30) {
                warn!(
                    rebuild = self.record.number,
                    lagging = ?lagging,
                    "Waiting for the live daemon's processes to write by the new routes"
                );
                waited = Instant::now();
            }
            tokio::time::sleep(TICK).await;
        }
        // Every event a live process may have written to the old place lies before these offsets.
        let fence = watermarks(&self.live.consumer, &self.partitions, false)?;
        loop {
            let own = self.own.committed(&self.partitions, &self.low)?;
            self.progress
                .show(self.record.number, "finishing", &self.low, &own, &fence);
            if reached(&own, &fence) {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        self.progress.finish();
        Ok(self.record.generation)
    }

    /// Whether every live process of the group writes by the rebuild's generation or a later one; the ones that
    /// do not yet, when not.
    async fn live_writers_switched(&self) -> anyhow::Result<(bool, Vec<String>)> {
        use futures::TryStreamExt;
        let since =
            DateTime::from_millis(crate::now_ms() - routes::WRITER_STALE.as_millis() as i64);
        let writers: Vec<Document> = self
            .home
            .collection::<Document>(WRITERS)
            .find(doc! { "group": &self.live.name, "at": { "$gte": since } })
            .await?
            .try_collect()
            .await?;
        let generation = self.record.generation;
        let (done, lagging): (Vec<&Document>, Vec<&Document>) = writers
            .iter()
            .partition(|w| crate::writer::bson_int(w.get("generation")).unwrap_or(0) >= generation);
        let members = self.live.members()?;
        let lagging: Vec<String> = lagging
            .iter()
            .filter_map(|w| w.get_str("_id").ok().map(str::to_string))
            .collect();
        Ok((lagging.is_empty() && done.len() >= members, lagging))
    }
}

fn reached(own: &BTreeMap<Tp, i64>, target: &BTreeMap<Tp, i64>) -> bool {
    target
        .iter()
        .all(|(tp, t)| own.get(tp).is_some_and(|o| o >= t))
}

/// The switch: one update of the route table, made only if no other switch came between.
async fn switch(home: &Database, record: &Record, collections: &[String]) -> anyhow::Result<i64> {
    let coll = home.collection::<Document>(READ_MODELS);
    loop {
        let table: RouteTable = routes::load(home).await?;
        let generation = table.generation + 1;
        let mut set = doc! { "generation": generation };
        for h in &record.handlers {
            set.insert(format!("handlers.{h}"), &record.database);
        }
        let mut retired: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for c in collections {
            set.insert(format!("collections.{c}"), &record.database);
            retired
                .entry(table.database_of(c, home.name()))
                .or_default()
                .push(c);
        }
        let retired: Vec<Document> = retired
            .into_iter()
            .map(|(database, collections)| {
                doc! {
                    "database": database,
                    "collections": collections,
                    "generation": generation,
                    "retired_at": DateTime::now(),
                }
            })
            .collect();
        let unchanged = if table.generation == 0 {
            doc! { "_id": ROUTES_ID, "generation": { "$in": [0, Bson::Null] } }
        } else {
            doc! { "_id": ROUTES_ID, "generation": table.generation }
        };
        let result = coll
            .update_one(
                unchanged,
                doc! { "$set": set, "$push": { "retired": { "$each": retired } } },
            )
            .await?;
        if result.modified_count == 1 {
            return Ok(generation);
        }
        // Another rebuild switched in between: read the table again.
    }
}

/// Drops the collections that switches retired, except any a later switch routes readers to again.
pub async fn drop_retired(config: &Config) -> anyhow::Result<Vec<String>> {
    let client = connect(config).await?;
    let home = client.database(&config.mongodb_database);
    let table = routes::load(&home).await?;
    let mut dropped = Vec::new();
    for r in &table.retired {
        for c in &r.collections {
            if table.database_of(c, home.name()) == r.database {
                continue;
            }
            client
                .database(&r.database)
                .collection::<Document>(c)
                .drop()
                .await
                .with_context(|| format!("dropping {}.{c}", r.database))?;
            dropped.push(format!("{}.{c}", r.database));
        }
        home.collection::<Document>(READ_MODELS)
            .update_one(
                doc! { "_id": ROUTES_ID },
                doc! { "$pull": { "retired": { "database": &r.database, "generation": r.generation } } },
            )
            .await?;
    }
    Ok(dropped)
}

/// Requests an incremental snapshot of the outbox table through Debezium's signal table, so that the rows the
/// application keeps are emitted again (as `op: r` records) after the offsets the topics end at now; records
/// those offsets so that a rebuild knows the history is whole again from there.
pub async fn snapshot_outbox(
    config: &Config,
    outbox_url: &str,
    signal_table: &str,
    outbox_table: &str,
) -> anyhow::Result<String> {
    let kafka = Group::new(config, &config.kafka_group_id)?.consumer;
    let partitions = partitions(&kafka, &config.topics())?;
    let high = watermarks(&kafka, &partitions, false)?;
    let (pg, connection) = tokio_postgres::connect(outbox_url, tokio_postgres::NoTls)
        .await
        .context("connecting to OUTBOX_DATABASE_URL")?;
    let connection = tokio::spawn(connection);
    let id = uuid::Uuid::new_v4().to_string();
    let data = json!({ "data-collections": [outbox_table], "type": "incremental" }).to_string();
    let statement = format!(
        "INSERT INTO {} (id, type, data) VALUES ($1, 'execute-snapshot', $2)",
        quote_table(signal_table)?
    );
    pg.execute(&statement, &[&id, &data])
        .await
        .with_context(|| format!("writing the snapshot signal into {signal_table}"))?;
    drop(pg);
    let _ = connection.await;
    let client = connect(config).await?;
    let offsets: Vec<Document> = high
        .iter()
        .map(|((t, p), o)| doc! { "topic": t, "partition": p, "offset": o })
        .collect();
    client
        .database(&config.mongodb_database)
        .collection::<Document>(READ_MODELS)
        .update_one(
            doc! { "_id": SNAPSHOT_ID },
            doc! { "$set": { "signal_id": &id, "table": outbox_table, "requested_at": DateTime::now(), "offsets": offsets } },
        )
        .upsert(true)
        .await?;
    Ok(id)
}

/// `schema.table` as a quoted SQL identifier; refuses anything else.
fn quote_table(name: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let plain =
        |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(plain) {
        bail!("`{name}` is not a table name of the form schema.table");
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// Progress on a terminal (indicatif's bar with an ETA, on stderr) or as JSON lines (on stdout).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: Option<(Instant, i64)>,
    rate: f64,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {msg:<11} [{bar:30}] {pos}/{len} records {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#> "),
            );
            bar
        });
        Progress {
            bar,
            last: None,
            rate: 0.0,
        }
    }

    fn show(
        &mut self,
        rebuild: i64,
        phase: &str,
        low: &BTreeMap<Tp, i64>,
        own: &BTreeMap<Tp, i64>,
        target: &BTreeMap<Tp, i64>,
    ) {
        let done: i64 = own.iter().map(|(tp, o)| (o - low[tp]).max(0)).sum();
        let total: i64 = target
            .iter()
            .map(|(tp, t)| (t - low[tp]).max(0))
            .sum::<i64>()
            .max(done);
        metrics::gauge!(crate::catalogue::REBUILD_RECORDS, "phase" => phase.to_string())
            .set(done as f64);
        if let Some(bar) = &self.bar {
            // indicatif keeps its own rate and ETA.
            bar.set_prefix(format!("rebuild {rebuild}"));
            bar.set_message(phase.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            return;
        }
        let now = Instant::now();
        if let Some((at, before)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let rate = (done - before).max(0) as f64 / secs;
                self.rate = if self.rate == 0.0 {
                    rate
                } else {
                    0.7 * self.rate + 0.3 * rate
                };
            }
        }
        self.last = Some((now, done));
        let eta = (self.rate > 0.0).then(|| (total - done) as f64 / self.rate);
        println!(
            "{}",
            json!({
                "rebuild": rebuild, "phase": phase, "records_done": done, "records_total": total,
                "records_per_second": (self.rate * 10.0).round() / 10.0,
                "eta_seconds": eta.map(|s| s.round()),
            })
        );
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
