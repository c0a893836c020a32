//! How the daemon's Kafka clients are configured: what every client shares (`KAFKA_PROPERTY_*`, the brokers),
//! the consumer's settings that the delivery guarantee needs, and the defaults a variable may override. The one
//! file to read to change how Kafka is configured.

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use super::membership::{InstanceSlot, hostname};
use crate::config::Config;

/// The consumer's configuration ([`consumer_config`]) with its group instance id: when `auto`, a slot claimed
/// on this host, which the caller keeps (a held lock file) for as long as the consumer lives.
pub(crate) fn consumer_config_with_membership(
    config: &Config,
) -> (ClientConfig, Option<InstanceSlot>) {
    let mut cc = consumer_config(config);
    let mut claimed = None;
    match config.kafka_group_instance_id.trim() {
        "" | "none" => {}
        "auto" => match InstanceSlot::claim(&config.kafka_group_id) {
            Ok(slot) => {
                cc.set("group.instance.id", slot.id());
                tracing::info!(group_instance_id = %slot.id(), "Static group membership: a restart of this process rejoins as this member");
                claimed = Some(slot);
            }
            Err(e) => tracing::warn!(error = %e,
                "No group instance id could be claimed on this host; joining without static membership (a restart rebalances the group)"),
        },
        id => {
            // `{hostname}` makes one setting serve every replica: a container keeps its host name when it is
            // restarted in place, so it rejoins as the same member and takes its partitions back.
            cc.set("group.instance.id", id.replace("{hostname}", &hostname()));
        }
    }
    (cc, claimed)
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
    let classic = config.kafka_group_protocol == "classic";
    cc.set("group.id", &config.kafka_group_id)
        .set("group.protocol", &config.kafka_group_protocol)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", &config.kafka_auto_offset_reset)
        .set(
            "max.poll.interval.ms",
            config.kafka_max_poll_interval_ms.to_string(),
        )
        .set("topic.metadata.refresh.interval.ms", "10000");
    if classic {
        // With the `consumer` protocol the session timeout is the broker's, and librdkafka refuses one set here.
        cc.set(
            "session.timeout.ms",
            config.kafka_session_timeout_ms.to_string(),
        );
    }
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
        // The `consumer` protocol assigns on the broker (`group.remote.assignor`); librdkafka refuses a strategy.
        if (classic || key != "partition.assignment.strategy")
            && !config.kafka_properties.contains_key(key)
        {
            cc.set(key, value);
        }
    }
    // librdkafka's `debug` contexts (`KAFKA_PROPERTY_DEBUG=cgrp,...`) log at debug level: let them through.
    cc.set_log_level(if config.kafka_properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    });
    cc
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
    fn the_consumer_protocol_leaves_session_and_assignment_to_the_broker() {
        let cc = consumer_config(&config(&[("KAFKA_GROUP_PROTOCOL", "consumer")]));
        assert_eq!(cc.get("group.protocol"), Some("consumer"));
        assert_eq!(cc.get("session.timeout.ms"), None);
        assert_eq!(cc.get("partition.assignment.strategy"), None);
        let cc = consumer_config(&config(&[]));
        assert_eq!(cc.get("group.protocol"), Some("classic"));
        assert_eq!(cc.get("session.timeout.ms"), Some("45000"));
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
