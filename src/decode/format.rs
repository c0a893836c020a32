//! Record formats: what a topic carries is declared (`RECORD_FORMATS`), never guessed from the fields of a record's
//! value. A business payload may hold any field names (`op`, `after`, `payload`, `schema`, ...), so only what
//! Debezium itself controls may tell one shape from another: the Event Router's `id` header, a raw change
//! event's top-level envelope, the topic a heartbeat goes to.

use std::fmt;
use std::str::FromStr;
use std::sync::RwLock;

/// How the records of a topic are laid out, as the Debezium configuration that produced them decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// What the shipped connector configurations produce, told apart by what Debezium controls: a record with the
    /// Event Router's `id` header (the router adds it to every record it routes) is Event Router output carrying
    /// the payload alone (`router`); any other is a raw change event (`change-event`).
    Debezium,
    /// Raw change events of the outbox table (no Event Router): `{"before", "after", "op", ...}`, with or without
    /// the JsonConverter's schema wrapper, which the envelope's own top level shows. Heartbeats, transaction
    /// metadata and logical messages of the same connector are recognised by their top level too.
    ChangeEvent,
    /// Outbox Event Router output.
    Router {
        /// `table.fields.additional.placement` puts fields in the value: it is `{"payload": ..., <aliases>}`.
        /// Without it the value is the payload column alone (a JSON string literal, the expanded JSON, or
        /// StringConverter text).
        envelope: bool,
        /// `value.converter.schemas.enable=true`: the value is wrapped as `{"schema": ..., "payload": ...}`.
        schemas: bool,
    },
}

impl Format {
    /// `router` with no options: what `debezium` takes a record with the `id` header for.
    pub const ROUTER: Format = Format::Router {
        envelope: false,
        schemas: false,
    };

    /// The format of the outbox records a Kafka Connect connector configuration (the `config` object, as PUT to
    /// `/connectors/<name>/config`) produces: `router` when one of its `transforms` is the Outbox Event Router,
    /// with `envelope` when its `table.fields.additional.placement` places a field in the envelope, and `schemas`
    /// when its value converter is the JsonConverter with `schemas.enable` not `false`. A connector that names no
    /// value converter gets the worker's; taken here as the JsonConverter with its own default (schemas on).
    pub fn for_connector(config: &serde_json::Map<String, serde_json::Value>) -> Format {
        let get = |key: &str| config.get(key).and_then(|v| v.as_str()).map(str::trim);
        let router = get("transforms")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .find(|t| {
                get(&format!("transforms.{t}.type"))
                    == Some("io.debezium.transforms.outbox.EventRouter")
            });
        let Some(router) = router else {
            return Format::ChangeEvent;
        };
        let envelope = get(&format!(
            "transforms.{router}.table.fields.additional.placement"
        ))
        .unwrap_or_default()
        .split(',')
        .any(|entry| entry.split(':').nth(1).map(str::trim) == Some("envelope"));
        let converter =
            get("value.converter").unwrap_or("org.apache.kafka.connect.json.JsonConverter");
        let schemas = converter == "org.apache.kafka.connect.json.JsonConverter"
            && get("value.converter.schemas.enable") != Some("false");
        Format::Router { envelope, schemas }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Debezium => f.write_str("debezium"),
            Format::ChangeEvent => f.write_str("change-event"),
            Format::Router { envelope, schemas } => {
                f.write_str("router")?;
                if *envelope {
                    f.write_str("+envelope")?;
                }
                if *schemas {
                    f.write_str("+schemas")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().split('+').map(str::trim);
        let base = parts.next().unwrap_or_default();
        let options: Vec<&str> = parts.collect();
        let no_options = |name: &str, f: Format| {
            if options.is_empty() {
                Ok(f)
            } else {
                Err(format!(
                    "`{name}` takes no options (`+{}`)",
                    options.join("+")
                ))
            }
        };
        match base {
            "debezium" => no_options("debezium", Format::Debezium),
            "change-event" => no_options("change-event", Format::ChangeEvent),
            "router" => {
                let (mut envelope, mut schemas) = (false, false);
                for o in options {
                    let flag = match o {
                        "envelope" => &mut envelope,
                        "schemas" => &mut schemas,
                        other => {
                            return Err(format!(
                                "unknown router option `{other}` (known: envelope, schemas)"
                            ));
                        }
                    };
                    if std::mem::replace(flag, true) {
                        return Err(format!("router option `{o}` given twice"));
                    }
                }
                Ok(Format::Router { envelope, schemas })
            }
            other => Err(format!(
                "unknown record format `{other}` (known: debezium, change-event, router, router+envelope, \
                 router+schemas, router+envelope+schemas)"
            )),
        }
    }
}

/// Which topics an entry of `RECORD_FORMATS` covers.
#[derive(Debug)]
enum Topics {
    Name(String),
    Pattern(regex::Regex),
}

impl Topics {
    fn matches(&self, topic: &str) -> bool {
        match self {
            Topics::Name(n) => n == topic,
            Topics::Pattern(re) => re.is_match(topic),
        }
    }
}

/// The declared format of every topic: `RECORD_FORMATS` entries in order (the first that covers a topic decides),
/// else the default. Resolved once per topic and kept (a handful of topics), so a record pays a short look-up.
#[derive(Debug)]
pub struct Formats {
    rules: Vec<(Topics, Format)>,
    default: Format,
    resolved: RwLock<Vec<(String, Format)>>,
}

/// Topics remembered at most; past it a topic's format is worked out per record (a subscription pattern that
/// keeps meeting new topics cannot grow the list without end).
const MAX_RESOLVED: usize = 256;

impl Default for Formats {
    fn default() -> Self {
        Formats {
            rules: Vec::new(),
            default: Format::Debezium,
            resolved: RwLock::new(Vec::new()),
        }
    }
}

impl Formats {
    /// Parses `RECORD_FORMATS`: comma-separated entries, each `TOPIC=FORMAT`, `^PATTERN=FORMAT`, or a bare
    /// `FORMAT` for every topic no entry names (at most one). Empty: `debezium` everywhere.
    pub fn parse(spec: &str) -> Result<Formats, String> {
        let mut formats = Formats::default();
        let mut default_given = false;
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            // A format name never holds `=`; a pattern may (split at the last one).
            match entry.rsplit_once('=') {
                Some((topics, format)) => {
                    let topics = topics.trim();
                    let format: Format = format
                        .parse()
                        .map_err(|e| format!("entry `{entry}`: {e}"))?;
                    let matcher = if topics.starts_with('^') {
                        Topics::Pattern(regex::Regex::new(topics).map_err(|e| {
                            format!(
                                "entry `{entry}`: `{topics}` is not a valid regular expression: {e}"
                            )
                        })?)
                    } else if topics.is_empty() {
                        return Err(format!("entry `{entry}` names no topic"));
                    } else {
                        Topics::Name(topics.to_string())
                    };
                    formats.rules.push((matcher, format));
                }
                None => {
                    if std::mem::replace(&mut default_given, true) {
                        return Err(format!(
                            "more than one default format (`{entry}`); name the topics of the others"
                        ));
                    }
                    formats.default = entry.parse().map_err(|e| format!("entry `{entry}`: {e}"))?;
                }
            }
        }
        Ok(formats)
    }

    /// The declared format of `topic`.
    pub fn of(&self, topic: &str) -> Format {
        if self.rules.is_empty() {
            return self.default;
        }
        if let Ok(known) = self.resolved.read()
            && let Some((_, f)) = known.iter().find(|(t, _)| t == topic)
        {
            return *f;
        }
        let format = self
            .rules
            .iter()
            .find(|(t, _)| t.matches(topic))
            .map_or(self.default, |(_, f)| *f);
        if let Ok(mut known) = self.resolved.write()
            && known.len() < MAX_RESOLVED
            && !known.iter().any(|(t, _)| t == topic)
        {
            known.push((topic.to_string(), format));
        }
        format
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_print_and_refuse_what_they_do_not_know() {
        for name in [
            "debezium",
            "change-event",
            "router",
            "router+envelope",
            "router+schemas",
            "router+envelope+schemas",
        ] {
            assert_eq!(name.parse::<Format>().unwrap().to_string(), name);
        }
        assert_eq!(
            "router+schemas+envelope".parse::<Format>(),
            Ok(Format::Router {
                envelope: true,
                schemas: true
            })
        );
        for bad in [
            "",
            "raw",
            "router+expand",
            "router+envelope+envelope",
            "change-event+schemas",
        ] {
            assert!(bad.parse::<Format>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_connector_configuration_says_its_format() {
        let shipped = |file: &str| -> serde_json::Map<String, serde_json::Value> {
            let path = format!("{}/debezium/{file}", env!("CARGO_MANIFEST_DIR"));
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            doc["config"].as_object().unwrap().clone()
        };
        assert_eq!(
            Format::for_connector(&shipped("postgres-connector.json")),
            Format::ChangeEvent
        );
        let mut router = shipped("outbox-router-connector.json");
        assert_eq!(Format::for_connector(&router), Format::ROUTER);
        router.insert(
            "transforms.outbox.table.fields.additional.placement".into(),
            "event_type:header:eventType,event_id:envelope:eventId".into(),
        );
        router.remove("value.converter.schemas.enable");
        assert_eq!(
            Format::for_connector(&router),
            Format::Router {
                envelope: true,
                schemas: true
            }
        );
        router.insert(
            "value.converter".into(),
            "org.apache.kafka.connect.storage.StringConverter".into(),
        );
        assert_eq!(
            Format::for_connector(&router),
            Format::Router {
                envelope: true,
                schemas: false
            }
        );
    }

    #[test]
    fn the_first_entry_that_covers_a_topic_decides_else_the_default() {
        let f = Formats::parse(
            r"postgres.activity.event_outbox=change-event, ^outbox\.event\.(user|order)$=router+envelope, ^outbox\..*=router, debezium",
        )
        .unwrap();
        assert_eq!(f.of("postgres.activity.event_outbox"), Format::ChangeEvent);
        for _ in 0..2 {
            assert_eq!(
                f.of("outbox.event.user"),
                Format::Router {
                    envelope: true,
                    schemas: false
                }
            );
        }
        assert_eq!(f.of("outbox.event.activity"), Format::ROUTER);
        assert_eq!(f.of("elsewhere"), Format::Debezium);
        assert_eq!(Formats::parse("").unwrap().of("any"), Format::Debezium);
        assert_eq!(
            Formats::parse("router+schemas").unwrap().of("any"),
            Format::Router {
                envelope: false,
                schemas: true
            }
        );
        for bad in [
            "router,change-event",
            "=router",
            "t=nope",
            "^(unclosed=router",
        ] {
            assert!(Formats::parse(bad).is_err(), "{bad}");
        }
    }
}
