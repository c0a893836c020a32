//! The dead-letter topic: where a record goes when it cannot be decoded or a handler fails permanently. Owns
//! the header vocabulary and the producer. A dead letter counts only once the broker acknowledged it; until
//! then the original record stays uncommitted.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Config;

/// Header names on every dead letter.
pub mod headers {
    pub const ERROR_CLASS: &str = "dlq.error.class";
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    pub const HANDLER: &str = "dlq.handler";
    pub const EVENT_ID: &str = "dlq.event.id";
    pub const EVENT_TYPE: &str = "dlq.event.type";
    pub const TOPIC: &str = "dlq.original.topic";
    pub const PARTITION: &str = "dlq.original.partition";
    pub const OFFSET: &str = "dlq.original.offset";
    pub const TIMESTAMP: &str = "dlq.original.timestamp";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const GROUP: &str = "dlq.consumer.group";
    pub const VALUE_OMITTED: &str = "dlq.value.omitted";

    /// What every header of a dead letter that the daemon writes starts with.
    pub const PREFIX: &str = "dlq.";
    /// Put in front of a header of the original record whose name is one of ours (`dlq.*`, or already escaped):
    /// the record's own headers can never pass for the daemon's, and a replay gives the record back its names.
    pub const ESCAPE: &str = "original.";

    /// Whether `key` is a header name the original record's own headers must not keep: `dlq.*`, or `dlq.*`
    /// behind one or more escapes.
    fn needs_escape(key: &str) -> bool {
        let mut k = key;
        while let Some(rest) = k.strip_prefix(ESCAPE) {
            k = rest;
        }
        k.starts_with(PREFIX)
    }

    /// The name an original header travels under in a dead letter.
    pub fn escape(key: &str) -> std::borrow::Cow<'_, str> {
        if needs_escape(key) {
            format!("{ESCAPE}{key}").into()
        } else {
            key.into()
        }
    }

    /// The original name of a header of a dead letter; `None` for the daemon's own headers.
    pub fn unescape(key: &str) -> Option<&str> {
        if key.starts_with(PREFIX) {
            return None;
        }
        match key.strip_prefix(ESCAPE) {
            Some(rest) if needs_escape(rest) => Some(rest),
            _ => Some(key),
        }
    }
}

/// Why a record is dead-lettered, and by whom.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub record: &'a OwnedMessage,
    /// `decode.<class>`, `handler.permanent`, `handler.panic`.
    pub error_class: String,
    pub error_message: String,
    /// The handler that failed; `None` when the record could not be decoded (no handler ran).
    pub handler: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub attempts: u32,
}

/// Where dead letters go. The daemon uses [`KafkaDeadLetters`].
#[async_trait]
pub trait DeadLetterSink: Send + Sync {
    /// Returns once the dead letter is durably acknowledged.
    async fn send(&self, letter: &DeadLetter<'_>) -> Result<(), KafkaError>;
}

/// Dead letters produced to `DLQ_TOPIC` with `acks=all` and idempotence on.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    group: String,
}

impl KafkaDeadLetters {
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let producer: FutureProducer = crate::kafka::client_config(config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "15000")
            .set("linger.ms", "0")
            .create()?;
        Ok(Self {
            producer,
            topic: config.dlq_topic.clone(),
            group: config.kafka_group_id.clone(),
        })
    }

    /// Flushes outstanding dead letters (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "Dead-letter producer flush failed");
        }
    }
}

/// The headers of a dead letter: the original record's own headers (any named like ours escaped, see
/// [`headers::escape`]), then ours, which are the only `dlq.*` headers of the letter.
pub fn build_headers(letter: &DeadLetter<'_>, group: &str, value_omitted: bool) -> OwnedHeaders {
    let r = letter.record;
    let mut h = OwnedHeaders::new();
    if let Some(orig) = r.headers() {
        for hdr in orig.iter() {
            h = h.insert(Header {
                key: &headers::escape(hdr.key),
                value: hdr.value,
            });
        }
    }
    let partition = r.partition().to_string();
    let offset = r.offset().to_string();
    let timestamp = r
        .timestamp()
        .to_millis()
        .map(|t| t.to_string())
        .unwrap_or_default();
    let attempts = letter.attempts.to_string();
    // An error's text can quote what a driver was given: no secret of the environment leaves in it.
    let message = crate::redact::scrub(&letter.error_message);
    let mut ours: Vec<(&str, &str)> = vec![
        (headers::ERROR_CLASS, &letter.error_class),
        (headers::ERROR_MESSAGE, &message),
        (headers::TOPIC, r.topic()),
        (headers::PARTITION, &partition),
        (headers::OFFSET, &offset),
        (headers::TIMESTAMP, &timestamp),
        (headers::ATTEMPTS, &attempts),
        (headers::GROUP, group),
    ];
    if let Some(handler) = letter.handler {
        ours.push((headers::HANDLER, handler));
    }
    if let Some(id) = letter.event_id {
        ours.push((headers::EVENT_ID, id));
    }
    if let Some(t) = letter.event_type {
        ours.push((headers::EVENT_TYPE, t));
    }
    if value_omitted {
        ours.push((
            headers::VALUE_OMITTED,
            "too large for the dead-letter topic",
        ));
    }
    for (k, v) in ours {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letter: &DeadLetter<'_>) -> Result<(), KafkaError> {
        let r = letter.record;
        let mut omit = false;
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(build_headers(letter, &self.group, omit));
            if let Some(k) = r.key() {
                rec = rec.key(k);
            }
            if let (Some(v), false) = (r.payload(), omit) {
                rec = rec.payload(v);
            }
            match self.producer.send(rec, Duration::from_secs(15)).await {
                Ok(_) => return Ok(()),
                // A record too large for the dead-letter topic still gets its dead letter, with the headers
                // saying where the original is.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))
                    if !omit =>
                {
                    omit = true;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    #[test]
    fn the_records_own_dlq_headers_cannot_pass_for_ours_and_come_back_on_replay() {
        let forged = [
            ("dlq.original.topic", "forged-topic"),
            ("dlq.original.offset", "999999"),
            ("original.dlq.handler", "x"),
            ("original.original.dlq.y", "z"),
            ("id", "e1"),
            ("original.keep", "as is"),
        ];
        let mut h = OwnedHeaders::new();
        for (k, v) in forged {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let record = OwnedMessage::new(
            Some(b"v".to_vec()),
            None,
            "real-topic".into(),
            Timestamp::CreateTime(1),
            3,
            42,
            Some(h),
        );
        let letter = DeadLetter {
            record: &record,
            error_class: "decode.not_json".into(),
            error_message: "m".into(),
            handler: None,
            event_id: None,
            event_type: None,
            attempts: 1,
        };
        let built = build_headers(&letter, "g", false);
        let all: Vec<(String, String)> = built
            .iter()
            .map(|x| {
                (
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap()).into_owned(),
                )
            })
            .collect();
        let ours: Vec<&(String, String)> = all
            .iter()
            .filter(|(k, _)| k.starts_with(headers::PREFIX))
            .collect();
        assert!(ours.contains(&&(headers::TOPIC.to_string(), "real-topic".to_string())));
        assert!(ours.contains(&&(headers::OFFSET.to_string(), "42".to_string())));
        assert!(
            !ours
                .iter()
                .any(|(_, v)| v == "forged-topic" || v == "999999")
        );
        // Each original header comes back under its own name, and only those.
        let restored: Vec<(String, String)> = all
            .iter()
            .filter_map(|(k, v)| headers::unescape(k).map(|k| (k.to_string(), v.clone())))
            .collect();
        let expected: Vec<(String, String)> = forged
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(restored, expected);
    }
}
