//! MongoDB: the client, the classification of its errors into transient and permanent, and the idempotent write
//! primitive the handlers share. Owns no read model (handlers do) and never uses transactions, change streams or
//! `Client::bulk_write`, so that a standalone MongoDB 7 works.

use std::time::Duration;

use mongodb::bson::Document;
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::event::EventHandler;
use mongodb::event::command::CommandEvent;
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Database};

/// Server error codes that mean "try again later": network, elections, shutdowns, time limits, write conflicts.
pub const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    64,    // WriteConcernFailed (wtimeout)
    // Refusals of this client, not of a record: fixed by an operator, after which the same write succeeds.
    13, // Unauthorized
    18, // AuthenticationFailed
];

/// E11000: an upsert whose filter missed found the `_id` already taken.
pub const DUPLICATE_KEY: i32 = 11000;

/// The write concern of every write an offset commit depends on, when `MONGODB_URI` names none (no `w`, `journal`
/// or `wtimeoutMS`): acknowledged once a majority of the replica set has the write in its on-disk journal. A
/// standalone server takes it as its own journal (MongoDB's "Acknowledgment Behavior"); a server that acknowledges
/// a write before its journal has it can lose it in a crash, and an offset committed for a lost write is never
/// redone (docs/RELIABILITY.md, "MongoDB killed under load").
pub fn durable_write_concern() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .build()
}

/// The write concern the daemon uses with these options: the URI's where it sets one, else
/// [`durable_write_concern`].
pub fn effective_write_concern(opts: &ClientOptions) -> WriteConcern {
    match &opts.write_concern {
        Some(wc) if wc.w.is_some() || wc.journal.is_some() || wc.w_timeout.is_some() => wc.clone(),
        _ => durable_write_concern(),
    }
}

/// Connects (lazily: the driver dials on first use) with short selection and connect timeouts so that an
/// unreachable server surfaces as a transient error within seconds rather than minutes. Every write carries the
/// [`effective_write_concern`]: the client's own (find-and-modify, index builds) and the coalescing writer's
/// commands, which take it from the database.
pub async fn connect(uri: &str, app_name: &str) -> Result<Client, MongoError> {
    let mut opts = ClientOptions::parse(uri).await?;
    opts.write_concern = Some(effective_write_concern(&opts));
    opts.app_name.get_or_insert_with(|| app_name.to_string());
    opts.server_selection_timeout
        .get_or_insert(Duration::from_secs(5));
    opts.connect_timeout.get_or_insert(Duration::from_secs(5));
    opts.retry_writes.get_or_insert(true);
    opts.command_event_handler = Some(EventHandler::callback(count_command));
    Client::with_options(opts)
}

/// Counts what is sent to MongoDB, from the driver's command monitoring: commands (round trips), statements and
/// bytes, by command name. These do not depend on how fast the server is, so they show the MongoDB work per event
/// on any deployment.
fn count_command(event: CommandEvent) {
    let started = match event {
        CommandEvent::Started(started) => started,
        // The round trip, which on a server that runs one command at a time is also how long the command held it.
        CommandEvent::Succeeded(done) => {
            return command_duration(done.command_name, done.duration);
        }
        CommandEvent::Failed(failed) => {
            return command_duration(failed.command_name, failed.duration);
        }
        _ => return,
    };
    let name = started.command_name;
    // A write command's statements are its array of updates, documents or deletes; any other command is one.
    let statements = ["updates", "documents", "deletes"]
        .iter()
        .find_map(|field| started.command.get_array(field).ok())
        .map_or(1, Vec::len);
    let bytes = mongodb::bson::to_vec(&started.command).map_or(0, |b| b.len());
    metrics::counter!(crate::catalogue::MONGODB_COMMANDS, "command" => name.clone()).increment(1);
    metrics::counter!(crate::catalogue::MONGODB_STATEMENTS, "command" => name.clone())
        .increment(statements as u64);
    metrics::counter!(crate::catalogue::MONGODB_BYTES, "command" => name).increment(bytes as u64);
}

fn command_duration(name: String, took: Duration) {
    metrics::histogram!(crate::catalogue::MONGODB_COMMAND_DURATION, "command" => name)
        .record(took.as_secs_f64());
}

/// Creates the indexes the registered handlers declare. Idempotent; run at start-up.
pub async fn ensure_indexes(
    db: &Database,
    indexes: Vec<(String, mongodb::IndexModel)>,
) -> Result<(), MongoError> {
    for (collection, index) in indexes {
        db.collection::<Document>(&collection)
            .create_index(index)
            .await?;
    }
    Ok(())
}

/// Whether the server answers a ping.
pub async fn ping(db: &Database) -> Result<(), MongoError> {
    db.run_command(mongodb::bson::doc! { "ping": 1 })
        .await
        .map(|_| ())
}

/// The server error code of a failed operation, if it carries one.
pub fn error_code(err: &MongoError) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.code)
            .or_else(|| e.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

/// What MongoDB refuses this client, if the error says so: `credentials` (authentication failed),
/// `certificate` (the TLS handshake could not verify the server's certificate: an unknown CA, or a certificate for
/// another host name) or `authorization` (the user lacks a privilege). With what to check, for the log.
pub fn refusal(err: &MongoError) -> Option<(&'static str, &'static str)> {
    const CREDENTIALS: (&str, &str) = (
        "credentials",
        "MongoDB refused the credentials of MONGODB_URI (user, password, authSource, authMechanism)",
    );
    match err.kind.as_ref() {
        ErrorKind::Authentication { .. } => return Some(CREDENTIALS),
        _ if error_code(err) == Some(18) => return Some(CREDENTIALS),
        _ if error_code(err) == Some(13) => {
            return Some((
                "authorization",
                "The MongoDB user of MONGODB_URI lacks a privilege the daemon needs (readWrite on MONGODB_DATABASE)",
            ));
        }
        _ => {}
    }
    // Once the driver has failed to connect, later operations get a server-selection error that carries the
    // connection's error as text: a failed authentication, or a failed TLS handshake as the TLS library says it.
    let text = err.to_string();
    let says = |parts: &[&str]| parts.iter().any(|p| text.contains(p));
    if says(&[
        "SCRAM failure",
        "AuthenticationFailed",
        "Authentication failed",
    ]) {
        return Some(CREDENTIALS);
    }
    says(&["invalid peer certificate", "certificate verify failed", "UnknownIssuer"])
        .then_some((
            "certificate",
            "The TLS handshake with MongoDB failed: its certificate could not be verified (tlsCAFile in \
             MONGODB_URI, and the host names in it)",
        ))
}

/// True when retrying the same operation later can succeed.
pub fn is_transient(err: &MongoError) -> bool {
    if err.contains_label("RetryableWriteError")
        || err.contains_label("TransientTransactionError")
        || err.contains_label("NetworkError")
    {
        return true;
    }
    match err.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Authentication { .. }
        | ErrorKind::Shutdown => true,
        _ => error_code(err).is_some_and(|c| TRANSIENT_CODES.contains(&c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{classify, classify_write};
    use mongodb::error::{CommandError, WriteError};

    fn command_error(code: i32) -> MongoError {
        let e: CommandError = mongodb::bson::from_document(mongodb::bson::doc! {
            "code": code, "codeName": "X", "errmsg": "x"
        })
        .unwrap();
        MongoError::from(ErrorKind::Command(e))
    }

    #[test]
    fn not_primary_and_network_errors_are_transient() {
        assert!(is_transient(&command_error(10107)));
        assert!(is_transient(&command_error(91)));
        let io = MongoError::from(ErrorKind::Io(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))));
        assert!(is_transient(&io));
        assert!(classify(command_error(189)).is_transient());
    }

    #[tokio::test]
    async fn writes_are_journaled_by_a_majority_unless_the_uri_says_otherwise() {
        async fn wc(uri: &str) -> WriteConcern {
            effective_write_concern(&ClientOptions::parse(uri).await.unwrap())
        }
        assert_eq!(wc("mongodb://h").await, durable_write_concern());
        assert_eq!(
            mongodb::bson::to_document(&durable_write_concern()).unwrap(),
            mongodb::bson::doc! { "w": "majority", "j": true }
        );
        let own = wc("mongodb://h/?w=1&journal=false&wtimeoutMS=2500").await;
        assert_eq!(own.w, Some(Acknowledgment::Nodes(1)));
        assert_eq!(own.journal, Some(false));
        assert_eq!(own.w_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(wc("mongodb://h/?journal=true").await.journal, Some(true));
    }

    #[test]
    fn refusals_name_their_cause_and_other_errors_none() {
        let cause = |e: &MongoError| refusal(e).map(|(what, _)| what);
        assert_eq!(cause(&command_error(18)), Some("credentials")); // AuthenticationFailed
        assert_eq!(cause(&command_error(13)), Some("authorization")); // Unauthorized
        // The driver's other refusals (an Authentication kind, a TLS handshake's text inside a server-selection
        // error) have no public constructors: tests/secured.rs meets each on a real server.
        assert_eq!(cause(&command_error(10107)), None);
        assert_eq!(cause(&command_error(121)), None);
    }

    #[test]
    fn validation_and_duplicate_key_errors_are_permanent() {
        assert!(!is_transient(&command_error(121))); // DocumentValidationFailure
        let w: WriteError = mongodb::bson::from_document(mongodb::bson::doc! {
            "code": DUPLICATE_KEY, "errmsg": "E11000"
        })
        .unwrap();
        let dup = MongoError::from(ErrorKind::Write(WriteFailure::WriteError(w)));
        assert_eq!(error_code(&dup), Some(DUPLICATE_KEY));
        assert!(!classify(dup).is_transient());
        let stmt = |code| crate::writer::WriteError::Statement {
            code,
            message: "x".into(),
        };
        assert!(classify_write(stmt(10107)).is_transient());
        assert!(!classify_write(stmt(10334)).is_transient()); // BSONObjectTooLarge
    }
}
