//! Every metric the daemon exports: its name, kind, labels and meaning, in one place. Code records metrics by
//! these constants; the README's list and the dashboard's test check against [`ALL`].

/// One exported metric.
pub struct Metric {
    pub name: &'static str,
    pub kind: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($konst:ident = $name:literal, $kind:literal, [$($label:literal),*], $help:literal;)*) => {
        $(#[doc = $help] pub const $konst: &str = $name;)*
        /// The whole catalogue, in the order the README lists it.
        pub const ALL: &[Metric] = &[$(Metric { name: $name, kind: $kind, labels: &[$($label),*], help: $help }),*];
    };
}

catalogue! {
    RECORDS_CONSUMED = "event_processor_records_consumed_total", "counter", ["topic"],
        "Records taken from Kafka.";
    RECORDS = "event_processor_records_total", "counter", ["topic", "outcome"],
        "Records finished, by outcome (processed, undecodable, invalid_payload, conflicting_duplicate, ...).";
    RECORDS_SKIPPED = "event_processor_records_skipped_total", "counter", ["topic", "reason"],
        "Records that carry no event (deletes, tombstones, unknown types, the dead-letter topic's own).";
    LEDGER_FAILURES = "event_processor_ledger_failures_total", "counter", ["class"],
        "Event-ledger look-ups that failed, transient or permanent.";
    COMMAND_SPLITS = "event_processor_mongodb_command_splits_total", "counter", ["collection"],
        "MongoDB commands refused as a whole and split to find the statement at fault.";
    HANDLER_RESULTS = "event_processor_handler_results_total", "counter", ["handler", "event_type", "outcome"],
        "Handler calls by outcome (ok, transient, permanent, panic).";
    HANDLER_DURATION = "event_processor_handler_duration_seconds", "histogram", ["handler"],
        "Time of one handler call.";
    WRITE_DURATION = "event_processor_mongodb_write_duration_seconds", "histogram", ["collection"],
        "Time of one MongoDB write command.";
    WRITE_STATEMENTS = "event_processor_mongodb_write_statements", "histogram", [],
        "Statements in one MongoDB write command.";
    BATCH_SIZE = "event_processor_batch_size", "histogram", [],
        "Records handed to the lanes together.";
    COMMIT_DURATION = "event_processor_commit_duration_seconds", "histogram", [],
        "Time of one offset commit.";
    COMMIT_FAILURES = "event_processor_commit_failures_total", "counter", [],
        "Offset commits that failed (retried with the next).";
    DEAD_LETTER_FAILURES = "event_processor_dead_letter_failures_total", "counter", [],
        "Dead letters the broker did not acknowledge (the record stays unfinished and is retried).";
    DEAD_LETTERS = "event_processor_dead_letters_total", "counter", ["topic", "class"],
        "Dead letters written, by class.";
    CONSUMER_LAG_RECORDS = "event_processor_consumer_lag_records", "gauge", ["topic", "partition"],
        "Records between the consumer's position and the partition's end.";
    CONSUMER_LAG_SECONDS = "event_processor_consumer_lag_seconds", "gauge", ["topic", "partition"],
        "0 when caught up, else the age of the oldest record taken in and not finished.";
    LAST_BATCH_LAG = "event_processor_last_batch_lag_seconds", "gauge", [],
        "Age of the last record of the latest finished batch, when that batch finished.";
    REBALANCES = "event_processor_rebalances_total", "counter", ["kind"],
        "Group rebalances seen (assign, revoke, lost, error).";
    IN_FLIGHT = "event_processor_in_flight_records", "gauge", [],
        "Records taken in and not finished.";
    BACKPRESSURE_PAUSES = "event_processor_backpressure_pauses_total", "counter", [],
        "Times the partitions were paused because PROCESSING_MAX_IN_FLIGHT records were in flight.";
    CONSUMER_ERRORS = "event_processor_consumer_errors_total", "counter", [],
        "Errors the consumer returned while polling.";
    ACCESS_REFUSALS = "event_processor_access_refusals_total", "counter", ["service", "refused"],
        "Refusals of this client's access by Kafka or MongoDB (credentials, certificate, an authorization).";
    MONGODB_COMMANDS = "event_processor_mongodb_commands_total", "counter", ["command"],
        "Commands sent to MongoDB (round trips), from the driver's command monitoring.";
    MONGODB_STATEMENTS = "event_processor_mongodb_statements_total", "counter", ["command"],
        "Statements sent to MongoDB: a write command's updates, documents or deletes; 1 for any other command.";
    MONGODB_BYTES = "event_processor_mongodb_command_bytes_total", "counter", ["command"],
        "Bytes of the commands sent to MongoDB (BSON, as monitored).";
    MONGODB_COMMAND_DURATION = "event_processor_mongodb_command_duration_seconds", "histogram", ["command"],
        "Round trip of each MongoDB command, sent to answered (failed ones included), from the driver's command monitoring.";
    REBUILD_RECORDS = "event_processor_rebuild_records", "gauge", ["phase"],
        "A rebuild's records behind it, over every partition (exported by `event-processor rebuild` only).";
}
