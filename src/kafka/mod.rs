//! Delivery: everything between Kafka and the processing of one record, and every rule about what is committed
//! when. Never processes a record itself.
//!
//! - [`delivery`]: the consumer loop: poll, hand records to the keyed lanes, backpressure, commits, the drain of
//!   revoked partitions and the drain on shutdown. Read it to change what is committed when.
//! - [`offsets`]: which offsets may be committed (the first unfinished offset per partition).
//! - [`context`]: librdkafka's callbacks: rebalances (handed to the loop), statistics, client errors.
//! - [`access`]: what the brokers refuse this client (credentials, certificate, ACLs): said once, and readiness.
//! - [`client`]: how every Kafka client is configured. Read it to change the Kafka side.

pub mod access;
pub mod client;
pub(crate) mod context;
pub mod delivery;
pub(crate) mod handoff;
pub(crate) mod membership;
pub mod offsets;

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

pub use client::client_config;
pub use context::{MissingTopic, MissingTopicLine, RejoinWatch, is_missing_topic};
pub use delivery::run;
pub use membership::hostname;
pub use offsets::{OffsetTracker, Tp};

/// The consumer with its callbacks.
pub(crate) type Kafka = StreamConsumer<context::GroupContext>;

pub fn to_tpl(offsets: &[(Tp, i64)]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    Ok(tpl)
}

pub fn tpl_to_vec(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}
