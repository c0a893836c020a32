//! Write coalescing: the update statements that concurrent handlers issue are gathered and sent as one
//! unordered `update` command per collection, so a batch costs a few round trips instead of one per write.
//! Handlers still await their own statement and get its own result (its write error, if any), so per-key order,
//! per-handler isolation and idempotency are unchanged. Owns the flusher task; never decides what a result means
//! (the caller classifies it).
//!
//! Batching needs no timer: while one command is in flight, new statements queue up and go together in the next
//! ("group commit"). At low load a statement is sent at once.

use std::collections::HashMap;
use std::time::Instant;

use mongodb::Database;
use mongodb::bson::{Bson, Document, RawArrayBuf, RawDocumentBuf, doc};
use tokio::sync::{mpsc, oneshot};

/// Statements per command at most.
const MAX_STATEMENTS: usize = 500;
/// Bytes of statements per command at most (a command is one BSON document, limited to 16 MiB).
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;

/// Why a statement failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The command failed as a whole (network, server selection, not primary, ...).
    #[error(transparent)]
    Command(#[from] mongodb::error::Error),
    /// The server rejected this statement (`writeErrors`).
    #[error("write error {code}: {message}")]
    Statement { code: i32, message: String },
    /// The server applied the command but could not confirm its write concern (`writeConcernError`): the write
    /// may not survive a crash, so it does not count; the world, not the event, is at fault.
    #[error("write concern not satisfied ({code}): {message}")]
    Concern { code: i32, message: String },
    /// The writer is shutting down.
    #[error("the MongoDB writer stopped")]
    Closed,
}

struct Op {
    collection: String,
    /// Serialized once, when queued: its size bounds the command, and a command is built from these bytes.
    statement: RawDocumentBuf,
    bytes: usize,
    reply: oneshot::Sender<Result<(), WriteError>>,
}

/// A handle for queueing update statements. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    mode: Mode,
}

#[derive(Clone, Debug)]
enum Mode {
    Coalescing(mpsc::UnboundedSender<Op>),
    Direct(Database),
}

impl Writer {
    /// Starts the flusher task for `db`. It ends when every `Writer` handle is dropped.
    pub fn start(db: Database) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db, rx));
        Writer {
            mode: Mode::Coalescing(tx),
        }
    }

    /// A writer that sends every statement as its own command, for running handlers outside the daemon's loop
    /// where there is nothing to coalesce with: a handler's own test, a one-off backfill, or the per-event
    /// design the benchmark measures the daemon against.
    pub fn direct(db: Database) -> Self {
        Writer {
            mode: Mode::Direct(db),
        }
    }

    /// Queues `updateOne(filter, update, {upsert})` on `collection` and waits for the server's answer. `update`
    /// is an update document or an aggregation pipeline (a `Vec<Document>`).
    pub async fn update_one(
        &self,
        collection: &str,
        filter: Document,
        update: impl Into<Bson>,
        upsert: bool,
    ) -> Result<(), WriteError> {
        let statement = doc! { "q": filter, "u": update.into(), "upsert": upsert, "multi": false };
        let statement = RawDocumentBuf::from_document(&statement).map_err(|e| {
            WriteError::Statement {
                code: 2, // BadValue: the statement cannot be written as BSON
                message: format!("statement cannot be serialized: {e}"),
            }
        })?;
        let bytes = statement.as_bytes().len();
        let (reply, rx) = oneshot::channel();
        let op = Op {
            collection: collection.to_string(),
            statement,
            bytes,
            reply,
        };
        match &self.mode {
            Mode::Coalescing(tx) => tx.send(op).map_err(|_| WriteError::Closed)?,
            Mode::Direct(db) => {
                let concern = write_concern_of(db);
                send(db, concern.as_ref(), op.collection.clone(), vec![op]).await
            }
        }
        rx.await.unwrap_or(Err(WriteError::Closed))
    }
}

async fn flusher(db: Database, mut rx: mpsc::UnboundedReceiver<Op>) {
    let concern = write_concern_of(&db);
    let mut pending: Vec<Op> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(op) => pending.push(op),
                None => return,
            }
            // Let the tasks that are issuing statements right now finish queueing them.
            tokio::task::yield_now().await;
        }
        while let Ok(op) = rx.try_recv() {
            pending.push(op);
        }
        // Split into commands: per collection, bounded in statements and bytes.
        let mut by_coll: HashMap<String, Vec<Vec<Op>>> = HashMap::new();
        for op in pending.drain(..) {
            let cmds = by_coll.entry(op.collection.clone()).or_default();
            let fits = cmds.last().is_some_and(|c| {
                c.len() < MAX_STATEMENTS
                    && c.iter().map(|o| o.bytes).sum::<usize>() + op.bytes <= MAX_COMMAND_BYTES
            });
            if fits {
                if let Some(last) = cmds.last_mut() {
                    last.push(op);
                }
            } else {
                cmds.push(vec![op]);
            }
        }
        let commands = by_coll
            .into_iter()
            .flat_map(|(coll, cmds)| cmds.into_iter().map(move |ops| (coll.clone(), ops)));
        // One command at a time: a server that applies writes on one core (and competes with the broker for
        // CPU) does more per second that way, and a round is rarely more than two or three commands. A command in
        // flight per collection was measured slower on such a server (docs/BENCHMARKS.md, "A third, also left out").
        for (coll, ops) in commands {
            send(&db, concern.as_ref(), coll, ops).await;
        }
    }
}

/// Sends `ops` as one unordered `update` command and answers each statement. When the server refuses the command
/// as a whole for a reason retrying cannot cure (a statement it cannot read, say), the fault is one statement's,
/// not everyone's: the command is split in halves and each half sent again, down to the statement that causes
/// it, which alone gets the error. Statements are idempotent (guarded upserts), so sending one again is safe. A
/// transient failure (network, not primary) is everyone's and answers all.
async fn send(
    db: &Database,
    concern: Option<&RawDocumentBuf>,
    collection: String,
    mut ops: Vec<Op>,
) {
    let started = Instant::now();
    let n = ops.len();
    let mut updates = RawArrayBuf::new();
    for o in &ops {
        updates.push(o.statement.clone());
    }
    let mut command = RawDocumentBuf::new();
    command.append("update", collection.as_str());
    command.append("updates", updates);
    command.append("ordered", false);
    if let Some(c) = concern {
        command.append("writeConcern", c.clone());
    }
    let result = db.run_raw_command(command).await;
    metrics::histogram!(crate::catalogue::WRITE_DURATION, "collection" => collection.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!(crate::catalogue::WRITE_STATEMENTS).record(n as f64);
    let reply = match result {
        Ok(r) => r,
        Err(e) if n > 1 && !crate::store::is_transient(&e) => {
            metrics::counter!(crate::catalogue::COMMAND_SPLITS, "collection" => collection.clone())
                .increment(1);
            let right = ops.split_off(n / 2);
            Box::pin(send(db, concern, collection.clone(), ops)).await;
            Box::pin(send(db, concern, collection, right)).await;
            return;
        }
        Err(e) => {
            for o in ops {
                let _ = o.reply.send(Err(WriteError::Command(e.clone())));
            }
            return;
        }
    };
    let replies = ops.into_iter().map(|o| o.reply);
    let mut errors: HashMap<usize, WriteError> = HashMap::new();
    if let Ok(list) = reply.get_array("writeErrors") {
        for we in list.iter().filter_map(Bson::as_document) {
            let index = bson_int(we.get("index")).unwrap_or(-1);
            let code = bson_int(we.get("code")).unwrap_or(0) as i32;
            let message = we.get_str("errmsg").unwrap_or_default().to_string();
            if index >= 0 {
                errors.insert(index as usize, WriteError::Statement { code, message });
            }
        }
    }
    let concern = reply
        .get_document("writeConcernError")
        .ok()
        .map(|w| WriteError::Concern {
            code: bson_int(w.get("code")).unwrap_or(64) as i32,
            message: w.get_str("errmsg").unwrap_or_default().to_string(),
        });
    for (i, r) in replies.enumerate() {
        let result = match (errors.remove(&i), &concern) {
            (Some(e), _) => Err(e),
            (None, Some(c)) => Err(c.clone()),
            (None, None) => Ok(()),
        };
        let _ = r.send(result);
    }
}

/// The database's write concern (the client's, see `store::connect`) as the `writeConcern` field of a command.
/// Commands sent with `run_raw_command` carry only what they are given.
fn write_concern_of(db: &Database) -> Option<RawDocumentBuf> {
    let wc = db.write_concern()?;
    mongodb::bson::to_raw_document_buf(wc).ok()
}

/// A number MongoDB returned, whichever BSON type it chose for it.
pub fn bson_int(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) => Some(*d as i64),
        _ => None,
    }
}
