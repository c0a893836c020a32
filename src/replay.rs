//! `event-processor replay-dlq [HANDLER]`: re-runs dead letters once their cause is fixed. Reads the dead-letter
//! topic up to where it ended when the command started (new dead letters wait for the next run), rebuilds each
//! original record from the headers, and runs only the handler the letter names (or the whole record when it
//! could not be decoded). Progress is committed under its own group, one per handler filter, so a replay can be
//! stopped and resumed.

use std::sync::Arc;
use std::time::Duration;

use crate::kafka::client_config;
use anyhow::Context;
use rdkafka::Timestamp;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dlq::{KafkaDeadLetters, headers};
use crate::handler::HandlerContext;
use crate::pipeline::{ProcessingSettings, Processor, RecordOutcome};
use crate::registry::Registry;
use crate::store;

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    /// Letters whose record ran again and succeeded.
    pub replayed: usize,
    /// Letters that failed again (and were dead-lettered again).
    pub failed_again: usize,
    /// Letters of other handlers, left for their own replay.
    pub other_handlers: usize,
    /// Letters whose record cannot be rebuilt: the value was too large for the dead-letter topic and the
    /// original topic no longer holds it (or cannot be read now). Their partition's progress is not committed
    /// past them, so every later replay reports them again.
    pub not_replayable: usize,
}

/// One of the daemon's headers of a dead letter. The last of the name: ours follow the record's own.
fn letter_header(letter: &OwnedMessage, name: &str) -> Option<String> {
    letter
        .headers()?
        .iter()
        .filter(|x| x.key == name)
        .last()
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok().map(str::to_string))
}

/// Whether the letter was written without the record's value (too large for the dead-letter topic).
pub fn value_omitted(letter: &OwnedMessage) -> bool {
    letter_header(letter, headers::VALUE_OMITTED).is_some()
}

/// The original record a dead letter carries: its coordinates, key, value and headers (under their own names
/// again). A letter written without the value gives a record without one: see [`value_omitted`].
pub fn original_record(letter: &OwnedMessage) -> Option<OwnedMessage> {
    let h = |name: &str| letter_header(letter, name);
    let topic = h(headers::TOPIC)?;
    let partition = h(headers::PARTITION)?.parse().ok()?;
    let offset = h(headers::OFFSET)?.parse().ok()?;
    let timestamp = h(headers::TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .map_or(Timestamp::NotAvailable, Timestamp::CreateTime);
    let mut original_headers = OwnedHeaders::new();
    if let Some(hs) = letter.headers() {
        for x in hs.iter() {
            if let Some(key) = headers::unescape(x.key) {
                original_headers = original_headers.insert(Header {
                    key,
                    value: x.value,
                });
            }
        }
    }
    Some(OwnedMessage::new(
        letter.payload().map(<[u8]>::to_vec),
        letter.key().map(<[u8]>::to_vec),
        topic,
        timestamp,
        partition,
        offset,
        Some(original_headers),
    ))
}

/// Replays the dead letters present now; `handler` limits it to the letters of one handler.
pub async fn replay_dead_letters(
    config: Config,
    registry: Registry,
    handler: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<ReplayStats> {
    let client = store::connect(config.mongodb_uri.expose(), "event-processor-replay").await?;
    let db = client.database(&config.mongodb_database);
    // A letter is replayed into the read model where readers find it now, rebuilt or not.
    let routes = Arc::new(crate::routes::Routes::default());
    let table = crate::routes::load(&db).await?;
    routes
        .adopt(&table, &client, &config.mongodb_database)
        .await;
    let processor = Processor {
        registry: Arc::new(registry),
        ctx: HandlerContext::new(db),
        routes,
        dead_letters: Arc::new(KafkaDeadLetters::new(
            &config,
            crate::kafka::access::AccessWatch::new(Default::default(), &config),
        )?),
        settings: ProcessingSettings::from_config(&config),
        cancel: shutdown.clone(),
        metrics: Default::default(),
        health: Default::default(),
        outages: Default::default(),
    };
    let group = format!(
        "{}.dlq-replay.{}",
        config.kafka_group_id,
        handler.as_deref().unwrap_or("all")
    );
    let consumer: BaseConsumer = client_config(&config)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the replay consumer")?;
    let topic = config.dlq_topic.clone();
    // (partition, next offset to replay, end of the topic when the replay started)
    let (consumer, mut ends) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .context("reading the dead-letter topic's metadata")?;
        let mut ends: Vec<(i32, i64, i64)> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                .context("reading the dead-letter topic's end")?;
            ends.push((p.id(), low, high));
            tpl.add_partition(&topic, p.id());
        }
        {
            let committed = consumer
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
                .context("reading the replay group's progress")?;
            for (p, next, _) in &mut ends {
                if let Some(Offset::Offset(o)) =
                    committed.find_partition(&topic, *p).map(|e| e.offset())
                {
                    *next = (*next).max(o);
                }
            }
        }
        consumer
            .assign(&tpl)
            .context("assigning the dead-letter topic")?;
        Ok((consumer, ends))
    })
    .await??;
    let mut stats = ReplayStats::default();
    // Partitions with a letter that could not be replayed: their progress stays before it.
    let mut held: Vec<i32> = Vec::new();
    let consumer = Arc::new(consumer);
    loop {
        if shutdown.is_cancelled() || ends.iter().all(|(_, next, high)| next >= high) {
            break;
        }
        let c = consumer.clone();
        let msg = tokio::task::spawn_blocking(move || {
            c.poll(Duration::from_millis(500))
                .map(|r| r.map(|m| m.detach()))
        })
        .await?;
        let letter = match msg {
            None => continue,
            Some(Err(e)) => {
                warn!(error = %e, "Reading the dead-letter topic failed");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let (p, o) = (letter.partition(), letter.offset());
        let Some(entry) = ends.iter_mut().find(|(ep, _, _)| *ep == p) else {
            continue;
        };
        if o >= entry.2 {
            continue; // written after the replay started
        }
        entry.1 = o + 1;
        let named = letter_header(&letter, headers::HANDLER);
        let original = match original_record(&letter) {
            Some(rec) if value_omitted(&letter) && (handler.is_none() || named == handler) => {
                match fetch_original(&config, &rec).await {
                    Ok(full) => Some(full),
                    Err(why) => {
                        error!(partition = p, offset = o, original_topic = rec.topic(), original_partition = rec.partition(),
                            original_offset = rec.offset(), error = %why,
                            "Dead letter not replayable: its value was left out and the original record cannot be read; it stays unconsumed");
                        stats.not_replayable += 1;
                        if !held.contains(&p) {
                            held.push(p);
                        }
                        continue;
                    }
                }
            }
            other => other,
        };
        if handler.is_some() && named != handler {
            stats.other_handlers += 1;
        } else if let Some(original) = original {
            match processor.replay(&original, named.as_deref()).await {
                RecordOutcome::Abandoned => break,
                RecordOutcome::Processed { dead_lettered: 0 } | RecordOutcome::Skipped => {
                    stats.replayed += 1
                }
                _ => stats.failed_again += 1,
            }
        } else {
            warn!(
                partition = p,
                offset = o,
                "Not a dead letter of this daemon (no original coordinates); left alone"
            );
            stats.other_handlers += 1;
        }
        if held.contains(&p) {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&config.dlq_topic, p, Offset::Offset(o + 1))?;
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await??;
    }
    info!(?stats, group, "Dead-letter replay finished");
    Ok(stats)
}

/// Reads a dead letter's original record back from its topic, partition and offset: the letter was written
/// without the value. An error saying why when the topic no longer holds it or cannot be read.
async fn fetch_original(config: &Config, at: &OwnedMessage) -> Result<OwnedMessage, String> {
    let (topic, partition, offset) = (at.topic().to_string(), at.partition(), at.offset());
    let consumer: BaseConsumer = client_config(config)
        .set("enable.auto.commit", "false")
        .set("group.id", format!("{}.dlq-fetch", config.kafka_group_id))
        .create()
        .map_err(|e| format!("creating a consumer: {e}"))?;
    tokio::task::spawn_blocking(move || {
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .map_err(|e| format!("reading {topic}/{partition}'s offsets: {e}"))?;
        if offset < low || offset >= high {
            return Err(format!(
                "{topic}/{partition} holds offsets {low}..{high} now; offset {offset} is gone (retention)"
            ));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) if m.offset() == offset => return Ok(m.detach()),
                Some(Ok(_)) | None => {}
                Some(Err(e)) => return Err(format!("reading {topic}/{partition}@{offset}: {e}")),
            }
        }
        Err(format!("{topic}/{partition}@{offset} did not arrive within 30 s"))
    })
    .await
    .map_err(|e| e.to_string())?
}
