//! The dead-letter topic: where a record goes when it cannot be decoded or a handler fails permanently. Owns
//! the header vocabulary and the producer. A dead letter counts only once the broker acknowledged it; until
//! then the original record stays uncommitted.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Config;
use crate::kafka::access::{AccessWatch, ProducerContext};

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
    /// On a letter whose key, original headers or error text had to be cut to fit the broker's limit: what was
    /// cut, with the size and a SHA-256 of each original.
    pub const TRUNCATED: &str = "dlq.truncated";

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
    producer: FutureProducer<ProducerContext>,
    topic: String,
    group: String,
}

impl KafkaDeadLetters {
    /// `access` hears what the brokers refuse the producer (its credentials or certificate, as the consumer's).
    pub fn new(config: &Config, access: Arc<AccessWatch>) -> Result<Self, KafkaError> {
        let producer = crate::kafka::client_config(config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "15000")
            .set("linger.ms", "0")
            .create_with_context(ProducerContext {
                access,
                client: "dead-letter producer",
            })?;
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

/// How much of the original record a dead letter carries. Tried in this order until the broker takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Key, value and headers as they came.
    Whole,
    /// Without the value (`dlq.value.omitted`).
    WithoutValue,
    /// Without the value, the key and each original header cut to [`BOUNDED_PART`] bytes and the original
    /// headers to [`BOUNDED_HEADERS`] in all, the error text to [`BOUNDED_PART`]; `dlq.truncated` says what was cut.
    /// A few KiB whatever the record: it fits any broker's limit, so no letter is too large to send.
    Bounded,
}

/// The most bytes of one part (the key, one original header, the error text) a bounded letter keeps.
pub const BOUNDED_PART: usize = 1024;
/// The most bytes of original headers (names and values) a bounded letter keeps.
pub const BOUNDED_HEADERS: usize = 4096;
/// The most bytes of error text any letter carries: an error can quote a whole payload.
pub const MAX_ERROR_TEXT: usize = 16 * 1024;

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `<bytes> bytes, sha256 <hex>` of a cut part.
fn fingerprint(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{} bytes, sha256 {hex}", bytes.len())
}

/// The key a letter of `shape` carries, and what was cut of it.
fn letter_key(r: &OwnedMessage, shape: Shape) -> (Option<&[u8]>, Option<String>) {
    match (r.key(), shape) {
        (Some(k), Shape::Bounded) if k.len() > BOUNDED_PART => (
            Some(&k[..BOUNDED_PART]),
            Some(format!("key ({})", fingerprint(k))),
        ),
        (k, _) => (k, None),
    }
}

/// The headers of a dead letter: the original record's own headers (any named like ours escaped, see
/// [`headers::escape`]; cut in a [`Shape::Bounded`] letter), then ours, which are the only `dlq.*` headers of the
/// letter. `cut_key` says what was cut of the key, for `dlq.truncated`.
pub fn build_headers(
    letter: &DeadLetter<'_>,
    group: &str,
    shape: Shape,
    cut_key: Option<String>,
) -> OwnedHeaders {
    let r = letter.record;
    let bounded = shape == Shape::Bounded;
    let mut cuts: Vec<String> = cut_key.into_iter().collect();
    let mut h = OwnedHeaders::new();
    if let Some(orig) = r.headers() {
        let mut kept = 0usize;
        for hdr in orig.iter() {
            let key = headers::escape(hdr.key);
            let value = hdr.value.unwrap_or_default();
            if !bounded {
                h = h.insert(Header {
                    key: &key,
                    value: hdr.value,
                });
                continue;
            }
            let name = cut(&key, BOUNDED_PART);
            let part = &value[..value.len().min(BOUNDED_PART)];
            if kept + name.len() + part.len() > BOUNDED_HEADERS {
                cuts.push(format!(
                    "header {:?} left out ({})",
                    cut(&key, 64),
                    fingerprint(value)
                ));
                continue;
            }
            if name.len() < key.len() || part.len() < value.len() {
                cuts.push(format!(
                    "header {:?} ({})",
                    cut(&key, 64),
                    fingerprint(value)
                ));
            }
            kept += name.len() + part.len();
            h = h.insert(Header {
                key: name,
                value: hdr.value.map(|_| part),
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
    let scrubbed = crate::redact::scrub(&letter.error_message);
    let limit = if bounded {
        BOUNDED_PART
    } else {
        MAX_ERROR_TEXT
    };
    let message = cut(&scrubbed, limit);
    if message.len() < scrubbed.len() {
        cuts.push(format!("error text ({})", fingerprint(scrubbed.as_bytes())));
    }
    let cut_list = cuts.join("; ");
    let mut ours: Vec<(&str, &str)> = vec![
        (headers::ERROR_CLASS, &letter.error_class),
        (headers::ERROR_MESSAGE, message),
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
        ours.push((headers::EVENT_ID, cut(id, BOUNDED_PART)));
    }
    if let Some(t) = letter.event_type {
        ours.push((headers::EVENT_TYPE, cut(t, BOUNDED_PART)));
    }
    if shape != Shape::Whole && r.payload().is_some() {
        ours.push((
            headers::VALUE_OMITTED,
            "too large for the dead-letter topic",
        ));
    }
    if !cut_list.is_empty() {
        ours.push((headers::TRUNCATED, &cut_list));
    }
    for (k, v) in ours {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// Whether the broker refused a dead letter for a reason that sending it again cannot cure: too large even
/// bounded, not authorised, a topic that does not exist and cannot be made. The record's partition then stops
/// there (it is not finished) and the daemon is not ready until the letter goes (docs/RELIABILITY.md).
pub fn is_refusal(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::InvalidTopic
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::PolicyViolation
        )
    )
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    /// Sends the letter whole; when the broker finds it too large, without the value; then bounded
    /// ([`Shape::Bounded`]), which fits any broker's limit.
    async fn send(&self, letter: &DeadLetter<'_>) -> Result<(), KafkaError> {
        let r = letter.record;
        let mut last = None;
        for shape in [Shape::Whole, Shape::WithoutValue, Shape::Bounded] {
            let (key, cut_key) = letter_key(r, shape);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .headers(build_headers(letter, &self.group, shape, cut_key));
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let (Some(v), Shape::Whole) = (r.payload(), shape) {
                rec = rec.payload(v);
            }
            match self.producer.send(rec, Duration::from_secs(15)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) if too_large(&e) => last = Some(e),
                Err((e, _)) => return Err(e),
            }
        }
        Err(last.unwrap_or(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        )))
    }
}

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
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
        let built = build_headers(&letter, "g", Shape::Whole, None);
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

    /// A record whose key and headers are larger than any broker takes gets a bounded letter of a few KiB that
    /// says what was cut, with a hash of each original part.
    #[test]
    fn a_bounded_letter_is_small_whatever_the_record_and_says_what_was_cut() {
        let big = vec![b'k'; 1_500_000];
        let mut h = OwnedHeaders::new();
        for i in 0..50 {
            let name = format!("h{i}");
            h = h.insert(Header {
                key: &name,
                value: Some(&vec![b'v'; 100_000]),
            });
        }
        let record = OwnedMessage::new(
            Some(vec![b'x'; 3_000_000]),
            Some(big.clone()),
            "t".into(),
            Timestamp::CreateTime(1),
            0,
            7,
            Some(h),
        );
        let letter = DeadLetter {
            record: &record,
            error_class: "decode.not_json".into(),
            error_message: "e".repeat(100_000),
            handler: None,
            event_id: None,
            event_type: None,
            attempts: 1,
        };
        let (key, cut_key) = letter_key(&record, Shape::Bounded);
        let built = build_headers(&letter, "g", Shape::Bounded, cut_key);
        let size = key.map_or(0, <[u8]>::len)
            + built
                .iter()
                .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
                .sum::<usize>();
        assert!(size < 16 * 1024, "{size} bytes");
        let header = |name: &str| {
            built
                .iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let cuts = header(headers::TRUNCATED).unwrap();
        assert!(cuts.contains("key (1500000 bytes, sha256 "), "{cuts}");
        assert!(cuts.contains("header \"h49\" left out"), "{cuts}");
        assert!(cuts.contains("error text (100000 bytes"), "{cuts}");
        assert!(header(headers::VALUE_OMITTED).is_some());
        assert_eq!(header(headers::OFFSET).as_deref(), Some("7"));
        // Whole, nothing is cut but an error text past its bound.
        let whole = build_headers(&letter, "g", Shape::Whole, None);
        assert!(whole.iter().all(|x| x.key != headers::VALUE_OMITTED));
        assert!(
            whole.iter().any(
                |x| x.key == headers::ERROR_MESSAGE && x.value.unwrap().len() == MAX_ERROR_TEXT
            )
        );
    }
}
