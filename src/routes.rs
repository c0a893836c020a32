//! Where each read model lives: the route table readers and writers follow, so that a rebuilt read model can
//! replace the live one without stopping anything (see [`crate::rebuild`] and docs/REBUILDING.md).
//!
//! A read model lives in the daemon's database (`MONGODB_DATABASE`) until a rebuild switches it to the database
//! the rebuild filled. The switch is one update of one document (`read_models`, `_id: "routes"`), so readers see
//! either every collection of a rebuild in its old place or every one in its new place. The table maps
//! collections to databases (for readers: [`resolve`]) and handlers to databases (for the daemon), and lists the
//! places a switch retired (kept until `event-processor rebuild --drop-retired`).
//!
//! The live daemon re-reads the table every [`REFRESH`]. When it changes, the daemon's handlers write to the new
//! places from their next attempt on; once no attempt started under the old table is still running, the daemon
//! says so in `read_model_writers` (one document per daemon process, refreshed every [`HEARTBEAT`]). That
//! acknowledgement is the fence a rebuild waits for before it stops following the topic: from then on no event
//! can reach the old place any more.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::Error as MongoError;
use mongodb::{Client, Database};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::handler::HandlerContext;

/// The collection, in the daemon's database, that holds the route table and the rebuilds' records.
pub const READ_MODELS: &str = "read_models";
/// `_id` of the route table in [`READ_MODELS`].
pub const ROUTES_ID: &str = "routes";
/// One document per live daemon process: the route table generation it writes by, and when it last said so.
pub const WRITERS: &str = "read_model_writers";
/// How often the live daemon re-reads the route table.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How often a live daemon refreshes its `read_model_writers` document when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A `read_model_writers` document older than this belongs to a process that is gone.
pub const WRITER_STALE: Duration = Duration::from_secs(20);

/// A place a switch took a read model away from: its collections stay until removed by command.
#[derive(Clone, Debug, PartialEq)]
pub struct Retired {
    pub database: String,
    pub collections: Vec<String>,
    pub generation: i64,
}

/// The route table as stored. Handlers and collections not listed live in the daemon's database.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    /// Raised by every switch; 0 before the first.
    pub generation: i64,
    /// Handler name -> database its writes go to.
    pub handlers: HashMap<String, String>,
    /// Collection -> database readers find it in.
    pub collections: HashMap<String, String>,
    pub retired: Vec<Retired>,
    /// Every handler a live daemon has run: a handler missing here is new and starts from now.
    pub known_handlers: Vec<String>,
}

fn string_map(d: &Document, key: &str) -> HashMap<String, String> {
    d.get_document(key)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn strings(v: Option<&Bson>) -> Vec<String> {
    match v {
        Some(Bson::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

impl RouteTable {
    pub fn from_doc(d: &Document) -> Self {
        let retired = match d.get("retired") {
            Some(Bson::Array(items)) => items
                .iter()
                .filter_map(Bson::as_document)
                .filter_map(|r| {
                    Some(Retired {
                        database: r.get_str("database").ok()?.to_string(),
                        collections: strings(r.get("collections")),
                        generation: crate::writer::bson_int(r.get("generation")).unwrap_or(0),
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        RouteTable {
            generation: crate::writer::bson_int(d.get("generation")).unwrap_or(0),
            handlers: string_map(d, "handlers"),
            collections: string_map(d, "collections"),
            retired,
            known_handlers: strings(d.get("known_handlers")),
        }
    }

    /// The database a collection is read from, given the daemon's database.
    pub fn database_of<'a>(&'a self, collection: &str, default: &'a str) -> &'a str {
        self.collections
            .get(collection)
            .map_or(default, String::as_str)
    }
}

/// Reads the route table (empty when no rebuild ever switched).
pub async fn load(db: &Database) -> Result<RouteTable, MongoError> {
    let found = db
        .collection::<Document>(READ_MODELS)
        .find_one(doc! { "_id": ROUTES_ID })
        .await?;
    Ok(found.as_ref().map(RouteTable::from_doc).unwrap_or_default())
}

/// The collection a reader should query for `collection`, following the route table: how an application reads a
/// read model that may have been rebuilt.
pub async fn resolve(
    client: &Client,
    database: &str,
    collection: &str,
) -> Result<mongodb::Collection<Document>, MongoError> {
    let table = load(&client.database(database)).await?;
    Ok(client
        .database(table.database_of(collection, database))
        .collection(collection))
}

/// The contexts handlers write through, by the route table the daemon last adopted.
#[derive(Default)]
pub struct Active {
    generation: i64,
    contexts: HashMap<String, HandlerContext>,
}

impl Active {
    /// The context of a handler routed elsewhere than the daemon's database.
    pub fn context(&self, handler: &str) -> Option<&HandlerContext> {
        self.contexts.get(handler)
    }
}

/// The live daemon's routes. Each handler attempt holds the table it started with ([`Routes::lease`]); a switch
/// waits until none holds the old one before it is acknowledged.
#[derive(Default)]
pub struct Routes {
    active: RwLock<Arc<Active>>,
}

impl Routes {
    /// The table to run one handler attempt by.
    pub fn lease(&self) -> Arc<Active> {
        self.active
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn generation(&self) -> i64 {
        self.lease().generation
    }

    /// Adopts `table`: later attempts write where it says. Returns once no attempt under the old table runs.
    pub async fn adopt(&self, table: &RouteTable, client: &Client, home: &str) {
        let mut by_db: HashMap<&str, HandlerContext> = HashMap::new();
        let mut contexts = HashMap::new();
        for (handler, database) in &table.handlers {
            if database == home {
                continue;
            }
            let ctx = by_db
                .entry(database)
                .or_insert_with(|| HandlerContext::new(client.database(database)))
                .clone();
            contexts.insert(handler.clone(), ctx);
        }
        let new = Arc::new(Active {
            generation: table.generation,
            contexts,
        });
        let old = {
            let mut guard = self
                .active
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::replace(&mut *guard, new)
        };
        let started = Instant::now();
        let mut warned = false;
        // Leases are held for one handler attempt (bounded by HANDLER_TIMEOUT_MS).
        while Arc::strong_count(&old) > 1 {
            if !warned && started.elapsed() > Duration::from_secs(30) {
                warn!(
                    generation = table.generation,
                    "Handler attempts begun under the previous read-model routes are still running"
                );
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// This process's name in `read_model_writers`.
pub fn instance_id() -> String {
    format!(
        "{}-{}-{}",
        crate::kafka::hostname(),
        std::process::id(),
        crate::now_ms()
    )
}

/// Says which route generation this process writes by (see the module docs).
pub async fn acknowledge(
    db: &Database,
    instance: &str,
    group: &str,
    generation: i64,
) -> Result<(), MongoError> {
    db.collection::<Document>(WRITERS)
        .update_one(
            doc! { "_id": instance },
            doc! { "$set": { "generation": generation, "group": group, "at": DateTime::now() } },
        )
        .upsert(true)
        .await
        .map(|_| ())
}

/// Loads the table once before the daemon consumes, records the handlers this daemon runs, and names the new
/// ones (they start from now; a rebuild brings them up from history).
pub async fn start(
    routes: &Routes,
    client: &Client,
    home: &str,
    handlers: &[&str],
) -> Result<(), MongoError> {
    let db = client.database(home);
    let table = load(&db).await?;
    let new: Vec<&str> = handlers
        .iter()
        .copied()
        .filter(|h| !table.known_handlers.iter().any(|k| k == h))
        .collect();
    if !table.known_handlers.is_empty() && !new.is_empty() {
        warn!(
            handlers = ?new,
            "New handlers: their read models hold the events from now on; `event-processor rebuild --handler NAME` fills them from history"
        );
    }
    if !new.is_empty() {
        db.collection::<Document>(READ_MODELS)
            .update_one(
                doc! { "_id": ROUTES_ID },
                doc! { "$addToSet": { "known_handlers": { "$each": new } } },
            )
            .upsert(true)
            .await?;
    }
    if table.generation > 0 {
        info!(
            generation = table.generation,
            routed = ?table.handlers,
            "Read-model routes"
        );
    }
    routes.adopt(&table, client, home).await;
    Ok(())
}

/// Follows the route table until `stop`: adopts each new generation, then acknowledges it.
pub async fn follow(
    routes: Arc<Routes>,
    client: Client,
    home: String,
    group: String,
    stop: CancellationToken,
) {
    let db = client.database(&home);
    let instance = instance_id();
    let mut last_ack: Option<Instant> = None;
    loop {
        match load(&db).await {
            Ok(table) => {
                let changed = table.generation != routes.generation();
                if changed {
                    info!(
                        generation = table.generation,
                        routed = ?table.handlers,
                        "Read-model routes changed; switching writes"
                    );
                    routes.adopt(&table, &client, &home).await;
                }
                if changed || last_ack.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                    match acknowledge(&db, &instance, &group, routes.generation()).await {
                        Ok(()) => last_ack = Some(Instant::now()),
                        Err(e) => warn!(error = %e, "Cannot record the read-model routes in use"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "Cannot read the read-model routes"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
    // A process that stops writes nowhere: say so, so that a rebuild does not wait for it.
    let _ = db
        .collection::<Document>(WRITERS)
        .delete_one(doc! { "_id": &instance })
        .await;
}
