//! Configuration from environment variables (12-factor), read once with `envy` and validated at start-up. Owns
//! defaults and cross-field checks; never logs a secret (`Secret` redacts credentials in `Debug`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// librdkafka properties the daemon's delivery guarantee depends on; `KAFKA_PROPERTY_*` cannot change them.
const PROTECTED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "enable.partition.eof",
    "isolation.level",
];

pub use crate::names::KAFKA_PROPERTY_PREFIX;

/// A connection string that must not appear in logs. `Debug`, `Display` and serialization print it redacted
/// (`redact::redact_uri`); only [`Secret::expose`] gives the value, to connect with.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_uri(&self.0))
    }
}

/// Serialized redacted, like `Debug`: serialization is for logs and introspection, never for connecting.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_uri(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_uri(&self.0))
    }
}

pub use crate::redact::redact_uri;

/// librdkafka properties from `KAFKA_PROPERTY_*`. `Debug` hides the values of secret ones (`sasl.password`,
/// `ssl.key.password`, `sasl.jaas.config`, ...).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl std::ops::Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, crate::redact::redact_property(k, v))),
            )
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting of the daemon. Field `foo_bar` is read from `FOO_BAR`; `.env.example` lists them all.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Config {
    pub kafka_bootstrap_servers: String,
    #[serde(default = "d::group_id")]
    pub kafka_group_id: String,
    /// Comma-separated topics; an entry starting with `^` is a regular expression.
    #[serde(default = "d::topics")]
    pub kafka_topics: String,
    /// What each topic carries, as its Debezium configuration decides: comma-separated `TOPIC=FORMAT` or
    /// `^PATTERN=FORMAT` entries and at most one bare `FORMAT` for the rest (`decode::Formats`). Empty:
    /// `debezium` everywhere, which reads the shipped connector configurations.
    #[serde(default)]
    pub record_formats: String,
    /// Records taken from the consumer per poll.
    #[serde(default = "d::hundred")]
    pub kafka_max_poll_records: usize,
    /// How long a poll waits for more records once it has one, in milliseconds. 0 takes what is already there:
    /// under a backlog that is a full batch, at low load a record is not held back waiting for company.
    #[serde(default = "d::poll_linger_ms")]
    pub kafka_poll_linger_ms: u64,
    #[serde(default = "d::offset_reset")]
    pub kafka_auto_offset_reset: String,
    #[serde(default = "d::session_timeout_ms")]
    pub kafka_session_timeout_ms: u64,
    #[serde(default = "d::max_poll_interval_ms")]
    pub kafka_max_poll_interval_ms: u64,
    /// How long the consumer may stay out of its group (join state not `steady`) before the process gives up
    /// and exits for its supervisor to restart it; 0 disables. librdkafka can fail to rejoin after a broker restart.
    #[serde(default = "d::rejoin_timeout_ms")]
    pub kafka_rejoin_timeout_ms: u64,
    /// Static group membership (`group.instance.id`): `auto` (the default) gives each process on a host its own
    /// stable id, `event-processor-<host name>-<slot>`, the slot being the lowest free one on the host (held by a
    /// lock file while the process runs), so that a process restarted in place (a container, a pod, a service
    /// after a crash) rejoins as the same member and takes its partitions back without a rebalance; `none` (or
    /// empty) turns it off; anything else is the id, `{hostname}` in it replaced by the host name. A process that
    /// stops cleanly leaves the group either way, so its partitions move at once.
    #[serde(default = "d::instance_id")]
    pub kafka_group_instance_id: String,
    /// The consumer group protocol: `classic`, or `consumer` (KIP-848, Kafka 4.x brokers; its session timeout is
    /// the broker's, `KAFKA_SESSION_TIMEOUT_MS` does not apply). docs/RELIABILITY.md compares them.
    #[serde(default = "d::group_protocol")]
    pub kafka_group_protocol: String,
    /// Records handed to the keyed lanes together: one `Batch done` log line each.
    #[serde(default = "d::hundred")]
    pub processing_batch_size: usize,
    /// How long a partition's oldest waiting record may hold its commit before the process reports itself not
    /// ready (`/health/ready`), whatever holds it up: MongoDB down, a dead letter refused, a handler retrying.
    #[serde(default = "d::partition_stall_timeout_ms")]
    pub partition_stall_timeout_ms: u64,
    /// Records (of different keys) processed concurrently.
    #[serde(default = "d::concurrency")]
    pub processing_concurrency: usize,
    /// Records polled and not yet finished, at most: above it the consumer pauses its partitions (and keeps
    /// polling, so it stays in the group) until work finishes.
    #[serde(default = "d::max_in_flight")]
    pub processing_max_in_flight: usize,
    pub mongodb_uri: Secret,
    #[serde(default = "d::database")]
    pub mongodb_database: String,
    #[serde(default = "d::dlq_topic")]
    pub dlq_topic: String,
    /// Whether events go through the event ledger (`event_ledger` collection): a record whose event id was taken
    /// in before with other content is dead-lettered, and a record without a creation time is dated by its first
    /// copy. Off, neither holds (one MongoDB statement less per event).
    #[serde(default = "d::yes")]
    pub event_ledger: bool,
    /// Attempts of a handler that fails permanently (or panics) before its event is dead-lettered.
    #[serde(default = "d::max_attempts")]
    pub handler_max_attempts: u32,
    #[serde(default = "d::handler_timeout_ms")]
    pub handler_timeout_ms: u64,
    #[serde(default = "d::retry_initial_ms")]
    pub retry_initial_backoff_ms: u64,
    #[serde(default = "d::retry_max_ms")]
    pub retry_max_backoff_ms: u64,
    /// How long shutdown waits for in-flight work before it commits what is finished and leaves.
    #[serde(default = "d::shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// How long a rebalance waits for in-flight work of revoked partitions before it commits what is finished.
    #[serde(default = "d::shutdown_timeout_ms")]
    pub rebalance_drain_timeout_ms: u64,
    #[serde(default = "d::log_level")]
    pub log_level: String,
    /// `json` or `pretty`.
    #[serde(default = "d::log_format")]
    pub log_format: String,
    /// Port of the HTTP server for `/metrics`, `/health/live` and `/health/ready`; 0 disables it.
    #[serde(default = "d::http_port")]
    pub http_port: u16,
    /// Address the HTTP server listens on: every interface by default, which a container needs for its port to
    /// be reached; `127.0.0.1` keeps the unauthenticated endpoints on the host.
    #[serde(default = "d::http_bind_address")]
    pub http_bind_address: String,
    /// Interval of the periodic `total_processed` log line, in seconds.
    #[serde(default = "d::stats_interval_secs")]
    pub stats_interval_secs: u64,
    /// librdkafka properties from `KAFKA_PROPERTY_*` (filled by [`Config::from_env`], not by `envy`).
    #[serde(skip_deserializing, skip_serializing)]
    pub kafka_properties: KafkaProperties,
}

mod d {
    pub fn group_id() -> String {
        "event-processor".into()
    }
    pub fn instance_id() -> String {
        "auto".into()
    }
    pub fn group_protocol() -> String {
        "classic".into()
    }
    pub fn topics() -> String {
        "postgres.activity.event_outbox".into()
    }
    pub fn hundred() -> usize {
        100
    }
    pub fn poll_linger_ms() -> u64 {
        0
    }
    pub fn offset_reset() -> String {
        "earliest".into()
    }
    pub fn session_timeout_ms() -> u64 {
        45_000
    }
    pub fn max_poll_interval_ms() -> u64 {
        300_000
    }
    pub fn rejoin_timeout_ms() -> u64 {
        600_000
    }
    pub fn partition_stall_timeout_ms() -> u64 {
        60_000
    }
    pub fn concurrency() -> usize {
        256
    }
    pub fn max_in_flight() -> usize {
        1000
    }
    pub fn database() -> String {
        "event_processor".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn dlq_topic() -> String {
        "event-processor.dlq".into()
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn handler_timeout_ms() -> u64 {
        30_000
    }
    pub fn retry_initial_ms() -> u64 {
        100
    }
    pub fn retry_max_ms() -> u64 {
        30_000
    }
    pub fn shutdown_timeout_ms() -> u64 {
        10_000
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn log_format() -> String {
        "json".into()
    }
    pub fn http_bind_address() -> String {
        "0.0.0.0".into()
    }
    pub fn http_port() -> u16 {
        9090
    }
    pub fn stats_interval_secs() -> u64 {
        30
    }
}

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads and validates the given variables (tests pass their own).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut cfg: Config =
            envy::from_iter(vars.iter().cloned()).map_err(|e| ConfigError(envy_message(e)))?;
        for (k, v) in &vars {
            if let Some(rest) = k.strip_prefix(KAFKA_PROPERTY_PREFIX) {
                let prop = rest
                    .to_ascii_lowercase()
                    .replace("__", "\u{0}")
                    .replace('_', ".")
                    .replace('\u{0}', "_");
                if PROTECTED_KAFKA_PROPERTIES.contains(&prop.as_str()) {
                    return Err(ConfigError(format!(
                        "{k} would override `{prop}`, which the daemon sets itself for its delivery guarantee"
                    )));
                }
                cfg.kafka_properties.0.insert(prop, v.clone());
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |var: &str, why: &str| Err(ConfigError(format!("{var} {why}")));
        if self.kafka_bootstrap_servers.trim().is_empty() {
            return bad("KAFKA_BOOTSTRAP_SERVERS", "must not be empty");
        }
        if self.kafka_group_id.trim().is_empty() {
            return bad("KAFKA_GROUP_ID", "must not be empty");
        }
        if self.topics().is_empty() {
            return bad("KAFKA_TOPICS", "must name at least one topic or ^pattern");
        }
        if self.topics().iter().any(|t| t == &self.dlq_topic) {
            return bad(
                "DLQ_TOPIC",
                "must not be one of KAFKA_TOPICS (dead letters would be consumed again)",
            );
        }
        for pattern in self.topics().iter().filter(|t| t.starts_with('^')) {
            let re = match regex::Regex::new(pattern) {
                Ok(re) => re,
                Err(e) => {
                    return Err(ConfigError(format!(
                        "KAFKA_TOPICS entry `{pattern}` is not a valid regular expression: {e}"
                    )));
                }
            };
            if re.is_match(&self.dlq_topic) {
                return Err(ConfigError(format!(
                    "KAFKA_TOPICS pattern `{pattern}` matches DLQ_TOPIC `{}` (dead letters would be consumed \
                     again): narrow the pattern or name the dead-letter topic outside it",
                    self.dlq_topic
                )));
            }
        }
        if self.dlq_topic.trim().is_empty() {
            return bad("DLQ_TOPIC", "must not be empty");
        }
        if let Err(e) = crate::decode::Formats::parse(&self.record_formats) {
            return bad("RECORD_FORMATS", &e);
        }
        if self.kafka_max_poll_records == 0 {
            return bad("KAFKA_MAX_POLL_RECORDS", "must be at least 1");
        }
        if self.processing_batch_size == 0 {
            return bad("PROCESSING_BATCH_SIZE", "must be at least 1");
        }
        if self.partition_stall_timeout_ms == 0 {
            return bad("PARTITION_STALL_TIMEOUT_MS", "must be at least 1");
        }
        if self.processing_concurrency == 0 {
            return bad("PROCESSING_CONCURRENCY", "must be at least 1");
        }
        if self.processing_max_in_flight == 0 {
            return bad("PROCESSING_MAX_IN_FLIGHT", "must be at least 1");
        }
        if self.handler_max_attempts == 0 {
            return bad("HANDLER_MAX_ATTEMPTS", "must be at least 1");
        }
        if !matches!(self.kafka_group_protocol.as_str(), "classic" | "consumer") {
            return bad("KAFKA_GROUP_PROTOCOL", "must be `classic` or `consumer`");
        }
        if !matches!(self.kafka_auto_offset_reset.as_str(), "earliest" | "latest") {
            return bad("KAFKA_AUTO_OFFSET_RESET", "must be `earliest` or `latest`");
        }
        if self.retry_initial_backoff_ms == 0
            || self.retry_initial_backoff_ms > self.retry_max_backoff_ms
        {
            return bad(
                "RETRY_INITIAL_BACKOFF_MS",
                "must be at least 1 and at most RETRY_MAX_BACKOFF_MS",
            );
        }
        if self.shutdown_timeout_ms >= self.kafka_session_timeout_ms {
            return bad(
                "SHUTDOWN_TIMEOUT_MS",
                "must be below KAFKA_SESSION_TIMEOUT_MS so a drain finishes before the group gives up on us",
            );
        }
        if self.kafka_rejoin_timeout_ms != 0
            && self.kafka_rejoin_timeout_ms
                <= self
                    .kafka_max_poll_interval_ms
                    .max(self.kafka_session_timeout_ms)
        {
            return bad(
                "KAFKA_REJOIN_TIMEOUT_MS",
                "must be 0 (off) or above KAFKA_MAX_POLL_INTERVAL_MS and KAFKA_SESSION_TIMEOUT_MS: a rebalance may \
                 legitimately wait that long for the other members",
            );
        }
        if self.rebalance_drain_timeout_ms >= self.kafka_max_poll_interval_ms {
            return bad(
                "REBALANCE_DRAIN_TIMEOUT_MS",
                "must be below KAFKA_MAX_POLL_INTERVAL_MS so a rebalance completes before the group gives up on us",
            );
        }
        if !self.mongodb_uri.expose().starts_with("mongodb://")
            && !self.mongodb_uri.expose().starts_with("mongodb+srv://")
        {
            return bad(
                "MONGODB_URI",
                "must start with mongodb:// or mongodb+srv://",
            );
        }
        if self.mongodb_database.trim().is_empty()
            || self.mongodb_database.contains(['/', '.', ' ', '$'])
        {
            return bad("MONGODB_DATABASE", "must be a valid database name");
        }
        if self.http_bind_address.parse::<std::net::IpAddr>().is_err() {
            return bad(
                "HTTP_BIND_ADDRESS",
                "must be an IP address (0.0.0.0 for every interface, 127.0.0.1 for the host only)",
            );
        }
        if !matches!(self.log_format.as_str(), "json" | "pretty") {
            return bad("LOG_FORMAT", "must be `json` or `pretty`");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return bad(
                "LOG_LEVEL",
                "is not a valid level or filter (e.g. info, debug, event_processor=debug)",
            );
        }
        Ok(())
    }

    /// The configuration as the daemon runs with it, by variable name (defaults included, `KAFKA_PROPERTY_*` by
    /// the variable that set each property), every secret hidden: what `event-processor config` prints.
    pub fn effective(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out: BTreeMap<String, serde_json::Value> = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), v))
                .collect(),
            _ => BTreeMap::new(),
        };
        for (prop, value) in &self.kafka_properties.0 {
            let var = format!(
                "{KAFKA_PROPERTY_PREFIX}{}",
                prop.replace('_', "__")
                    .replace('.', "_")
                    .to_ascii_uppercase()
            );
            let shown = crate::redact::redact_property(prop, value);
            out.insert(var, serde_json::Value::String(shown.to_string()));
        }
        out
    }

    /// The names of every environment variable this configuration reads (besides `KAFKA_PROPERTY_*`).
    pub fn variable_names(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m.keys().map(|k| k.to_ascii_uppercase()).collect(),
            _ => Vec::new(),
        }
    }

    /// The declared format of every topic (validated with the rest of the configuration).
    pub fn record_formats(&self) -> crate::decode::Formats {
        crate::decode::Formats::parse(&self.record_formats).unwrap_or_default()
    }

    /// The subscription: topic names and `^`-patterns.
    pub fn topics(&self) -> Vec<String> {
        self.kafka_topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn log_format(&self) -> LogFormat {
        if self.log_format == "pretty" {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }

    /// The address a probe on this host reaches the HTTP server at.
    pub fn http_probe_host(&self) -> String {
        match self.http_bind_address.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_unspecified() && ip.is_ipv6() => "::1".into(),
            Ok(ip) if ip.is_unspecified() => "127.0.0.1".into(),
            _ => self.http_bind_address.clone(),
        }
    }

    pub fn handler_timeout(&self) -> Duration {
        Duration::from_millis(self.handler_timeout_ms)
    }

    pub fn rebalance_drain_timeout(&self) -> Duration {
        Duration::from_millis(self.rebalance_drain_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// envy names fields in lower case; the user wrote upper-case variables.
fn envy_message(e: envy::Error) -> String {
    match e {
        envy::Error::MissingValue(field) => {
            format!("{} is required but not set", field.to_ascii_uppercase())
        }
        // "invalid digit found in string while parsing value 'x' provided by foo_bar"
        envy::Error::Custom(msg) => match msg.rsplit_once(" provided by ") {
            Some((what, var)) => format!("{}: {what}", var.to_ascii_uppercase()),
            None => msg,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v = vec![
            (
                "KAFKA_BOOTSTRAP_SERVERS".to_string(),
                "localhost:9092".to_string(),
            ),
            (
                "MONGODB_URI".to_string(),
                "mongodb://app:s3cret@mongo:27017/?authSource=admin".to_string(),
            ),
        ];
        v.extend(
            extra
                .iter()
                .map(|(k, val)| (k.to_string(), val.to_string())),
        );
        v
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.kafka_max_poll_records, 100);
        assert_eq!(c.processing_batch_size, 100);
        assert_eq!(c.kafka_group_id, "event-processor");
        assert_eq!(c.topics(), ["postgres.activity.event_outbox"]);
        assert_eq!(c.log_format(), LogFormat::Json);
    }

    #[test]
    fn missing_required_variable_is_named() {
        let err = Config::from_vars(vec![("MONGODB_URI".to_string(), "mongodb://x".to_string())])
            .unwrap_err();
        assert!(err.0.contains("KAFKA_BOOTSTRAP_SERVERS"), "{err}");
    }

    #[test]
    fn malformed_number_is_named() {
        let err = Config::from_vars(vars(&[("PROCESSING_BATCH_SIZE", "many")])).unwrap_err();
        assert!(
            err.0.starts_with("PROCESSING_BATCH_SIZE: invalid digit"),
            "{err}"
        );
        let err = Config::from_vars(vars(&[("PROCESSING_BATCH_SIZE", "0")])).unwrap_err();
        assert!(err.0.contains("PROCESSING_BATCH_SIZE"), "{err}");
        let err = Config::from_vars(vars(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.0.contains("LOG_FORMAT"), "{err}");
    }

    #[test]
    fn passwords_are_never_printed() {
        let c = Config::from_vars(vars(&[])).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("mongodb://app:***@mongo:27017"),
            "{printed}"
        );
        assert_eq!(
            redact_uri("mongodb://localhost:27017"),
            "mongodb://localhost:27017"
        );
    }

    #[test]
    fn the_effective_configuration_names_every_variable_and_hides_secrets() {
        let c = Config::from_vars(vars(&[
            ("KAFKA_PROPERTY_SASL_PASSWORD", "hunter2"),
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
        ]))
        .unwrap();
        let shown = c.effective();
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        assert_eq!(shown["KAFKA_PROPERTY_SECURITY_PROTOCOL"], "SASL_SSL");
        assert_eq!(shown["KAFKA_GROUP_INSTANCE_ID"], "auto");
        assert_eq!(shown["PROCESSING_BATCH_SIZE"], 100);
        for name in c.variable_names() {
            assert!(shown.contains_key(&name), "{name}");
        }
    }

    #[test]
    fn kafka_pass_through_maps_names_and_guards_delivery_settings() {
        let c = Config::from_vars(vars(&[
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_PROPERTY_SASL_MECHANISMS", "SCRAM-SHA-512"),
        ]))
        .unwrap();
        assert_eq!(c.kafka_properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka_properties["sasl.mechanisms"], "SCRAM-SHA-512");
        let err =
            Config::from_vars(vars(&[("KAFKA_PROPERTY_ENABLE_AUTO_COMMIT", "true")])).unwrap_err();
        assert!(err.0.contains("KAFKA_PROPERTY_ENABLE_AUTO_COMMIT"), "{err}");
    }

    #[test]
    fn rejoin_timeout_is_off_or_longer_than_a_rebalance_may_take() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.kafka_rejoin_timeout_ms, 600_000);
        let err = Config::from_vars(vars(&[("KAFKA_REJOIN_TIMEOUT_MS", "300000")])).unwrap_err();
        assert!(err.0.starts_with("KAFKA_REJOIN_TIMEOUT_MS"), "{err}");
        let c = Config::from_vars(vars(&[
            ("KAFKA_REJOIN_TIMEOUT_MS", "60000"),
            ("KAFKA_MAX_POLL_INTERVAL_MS", "30000"),
        ]))
        .unwrap();
        assert_eq!(c.kafka_rejoin_timeout_ms, 60_000);
        assert!(Config::from_vars(vars(&[("KAFKA_REJOIN_TIMEOUT_MS", "0")])).is_ok());
    }

    #[test]
    fn dead_letter_topic_cannot_be_subscribed() {
        let err = Config::from_vars(vars(&[("KAFKA_TOPICS", "a,dlq"), ("DLQ_TOPIC", "dlq")]))
            .unwrap_err();
        assert!(err.0.contains("DLQ_TOPIC"), "{err}");
        // Nor matched by a pattern: the default dead-letter topic under a catch-all.
        for pattern in [
            r"^event-processor\..*",
            "^.*",
            r"^outbox\.event\..*,^event-.*",
        ] {
            let err = Config::from_vars(vars(&[("KAFKA_TOPICS", pattern)])).unwrap_err();
            assert!(
                err.0.contains("matches DLQ_TOPIC `event-processor.dlq`"),
                "{pattern}: {err}"
            );
        }
        assert!(Config::from_vars(vars(&[("KAFKA_TOPICS", r"^outbox\.event\..*")])).is_ok());
        let err = Config::from_vars(vars(&[("KAFKA_TOPICS", "^(unclosed")])).unwrap_err();
        assert!(err.0.starts_with("KAFKA_TOPICS"), "{err}");
    }
}
