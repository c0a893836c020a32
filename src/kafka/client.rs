//! How the daemon's Kafka clients are configured: what every client shares (`KAFKA_PROPERTY_*`, the brokers),
//! the consumer's settings that the delivery guarantee needs, and the defaults a variable may override. The one
//! file to read to change how Kafka is configured.

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;

use super::Kafka;
use super::context::GroupContext;
use crate::config::Config;

/// Builds and subscribes the consumer.
pub(crate) fn create_consumer(config: &Config, context: GroupContext) -> KafkaResult<Kafka> {
    let consumer: Kafka = consumer_config(config).create_with_context(context)?;
    let topics = config.topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// What every Kafka client of the daemon starts from (the consumer, the dead-letter producer, the replay's
/// clients): the `KAFKA_PROPERTY_*` variables (security, tuning) and the brokers.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka_properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &config.kafka_bootstrap_servers);
    cc
}

/// The consumer's librdkafka configuration: the common client settings, then the properties the delivery
/// guarantee needs, then defaults those variables did not set.
fn consumer_config(config: &Config) -> ClientConfig {
    let mut cc = client_config(config);
    cc.set("group.id", &config.kafka_group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", &config.kafka_auto_offset_reset)
        .set(
            "session.timeout.ms",
            config.kafka_session_timeout_ms.to_string(),
        )
        .set(
            "max.poll.interval.ms",
            config.kafka_max_poll_interval_ms.to_string(),
        )
        .set("topic.metadata.refresh.interval.ms", "10000");
    // Defaults a `KAFKA_PROPERTY_*` variable may override. librdkafka fetches ahead up to `queued.min.messages`
    // records per partition (100,000 by default) or `queued.max.messages.kbytes` in all (64 MiB) and, once over
    // either, waits `fetch.queue.backoff.ms` (1 s by default) before fetching that partition again: a consumer
    // catching up on a backlog drained its queue and then idled for most of that second. A smaller queue,
    // refilled within 20 ms, keeps it busy and bounds the memory the prefetched records take: 3,000 per partition
    // is well over what the handlers get through in 20 ms, and with six partitions behind it keeps a catching-up
    // daemon near 60 MiB where 10,000 took about 75 (docs/BENCHMARKS.md).
    let client_id = format!("event-processor-{}", hostname());
    for (key, value) in [
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("statistics.interval.ms", "5000"),
        ("client.id", client_id.as_str()),
        ("queued.min.messages", "3000"),
        ("fetch.queue.backoff.ms", "20"),
    ] {
        if !config.kafka_properties.contains_key(key) {
            cc.set(key, value);
        }
    }
    if let Some(id) = config
        .kafka_group_instance_id
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        // `{hostname}` makes one setting serve every replica: a container keeps its host name when it is
        // restarted in place, so it rejoins as the same member and takes its partitions back without a rebalance.
        cc.set("group.instance.id", id.replace("{hostname}", &hostname()));
    }
    // librdkafka's `debug` contexts (`KAFKA_PROPERTY_DEBUG=cgrp,...`) log at debug level: let them through.
    cc.set_log_level(if config.kafka_properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    });
    cc
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Config {
        let base = [
            ("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092"),
            ("MONGODB_URI", "mongodb://mongo:27017"),
        ];
        Config::from_vars(
            base.iter()
                .chain(vars)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .expect("valid configuration")
    }

    #[test]
    fn a_partition_is_fetched_again_within_20_ms_once_its_queue_has_room_unless_configured() {
        let cc = consumer_config(&config(&[]));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(cc.get("queued.min.messages"), Some("3000"));
        assert_eq!(
            cc.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));

        let cc = consumer_config(&config(&[
            ("KAFKA_PROPERTY_FETCH_QUEUE_BACKOFF_MS", "250"),
            ("KAFKA_PROPERTY_QUEUED_MIN_MESSAGES", "500"),
            ("KAFKA_PROPERTY_PARTITION_ASSIGNMENT_STRATEGY", "range"),
        ]));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(cc.get("queued.min.messages"), Some("500"));
        assert_eq!(cc.get("partition.assignment.strategy"), Some("range"));
    }

    #[test]
    fn librdkafka_logs_warnings_unless_its_debug_contexts_are_asked_for() {
        let level = |cc: &ClientConfig| format!("{:?}", cc.log_level);
        assert_eq!(level(&consumer_config(&config(&[]))), "Warning");
        let cc = consumer_config(&config(&[("KAFKA_PROPERTY_DEBUG", "cgrp,fetch")]));
        assert_eq!(cc.get("debug"), Some("cgrp,fetch"));
        assert_eq!(level(&cc), "Debug");
    }
}
