//! Names of environment variables that several modules need: the configuration reads them, the redaction hides
//! their values, the commands name them in errors. Below every other module; depends on none.

/// The daemon's MongoDB connection string, which may hold credentials.
pub const MONGODB_URI: &str = "MONGODB_URI";

/// The outbox's PostgreSQL connection string for `snapshot-outbox` (credentials included).
pub const OUTBOX_DATABASE_URL: &str = "OUTBOX_DATABASE_URL";

/// Prefix of the librdkafka pass-through: `KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL` sets
/// `security.protocol`. `_` becomes `.`; write `__` for a literal `_`.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";
