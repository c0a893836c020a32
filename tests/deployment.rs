//! What cannot run without Docker is still checked: the compose file's event-processor is scalable, and
//! `.env.example` lists exactly the variables the configuration reads, with their real defaults.

use std::collections::BTreeSet;

use event_processor::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// `KEY=value` lines of `.env.example`, commented examples (`# KEY=value`) excluded.
fn env_example() -> Vec<(String, String)> {
    read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

#[test]
fn env_example_lists_every_variable_the_configuration_knows_and_no_other() {
    let vars: Vec<(String, String)> = env_example()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let config =
        Config::from_vars(vars.clone()).expect(".env.example must be a valid configuration");
    let known: BTreeSet<String> = config.variable_names().into_iter().collect();
    let listed: BTreeSet<String> = env_example().into_iter().map(|(k, _)| k).collect();
    assert_eq!(listed, known, ".env.example and Config disagree");
}

#[test]
fn env_example_values_are_the_defaults() {
    let example =
        Config::from_vars(env_example().into_iter().filter(|(_, v)| !v.is_empty())).unwrap();
    let required: Vec<(String, String)> = env_example()
        .into_iter()
        .filter(|(k, _)| k == "KAFKA_BOOTSTRAP_SERVERS" || k == "MONGODB_URI")
        .collect();
    let defaults = Config::from_vars(required).unwrap();
    assert_eq!(
        serde_json::to_value(&example).unwrap(),
        serde_json::to_value(&defaults).unwrap(),
        "a value in .env.example differs from the code's default"
    );
}

#[test]
fn compose_event_processor_can_be_scaled() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    let ep = &compose["services"]["event-processor"];
    assert!(ep.is_mapping(), "no event-processor service");
    assert!(
        ep.get("container_name").is_none(),
        "container_name prevents --scale"
    );
    if let Some(ports) = ep.get("ports") {
        for p in ports.as_sequence().unwrap() {
            let p = p.as_str().unwrap_or_default();
            assert!(!p.contains(':'), "fixed host port {p} prevents --scale");
        }
    }
    // Three consumers need at least three partitions on the topic the connector creates.
    let connector: serde_json::Value =
        serde_json::from_str(&read("debezium/postgres-connector.json")).unwrap();
    let partitions: i32 = connector["config"]["topic.creation.default.partitions"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        partitions >= 3,
        "{partitions} partitions cannot feed three consumers"
    );
    // The topic the daemon reads: set in the compose file, or else .env's (its default, in .env.example).
    let topics = ep["environment"]["KAFKA_TOPICS"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            env_example()
                .into_iter()
                .find(|(k, _)| k == "KAFKA_TOPICS")
                .map(|(_, v)| v)
        })
        .unwrap();
    assert_eq!(topics, "postgres.activity.event_outbox");
    // Every variable the compose file passes is one the configuration reads.
    let known: BTreeSet<String> = env_example().into_iter().map(|(k, _)| k).collect();
    for (k, _) in ep["environment"].as_mapping().unwrap() {
        let k = k.as_str().unwrap();
        assert!(
            known.contains(k) || k.starts_with("KAFKA_PROPERTY_"),
            "compose sets unknown variable {k}"
        );
    }
}

#[test]
fn dockerfile_healthcheck_uses_the_binary_and_runs_as_non_root() {
    let d = read("Dockerfile");
    assert!(d.contains("HEALTHCHECK") && d.contains("\"event-processor\", \"healthcheck\""));
    assert!(d.contains("cargo build --release --locked"));
    assert!(
        d.lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root"))
    );
}

/// Every metric the provisioned Grafana dashboard queries is one the daemon exports (a renamed metric would leave
/// an empty panel), and compose mounts the provisioning.
#[test]
fn grafana_dashboard_queries_only_metrics_the_daemon_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/event-processor.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(
        panels.len() >= 4,
        "throughput, lag, errors and latency panels"
    );
    let mut queried = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("event_processor_") {
                    let base = name
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count");
                    queried.insert(format!("event_processor_{base}"));
                }
            }
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    let exported: BTreeSet<&str> = event_processor::catalogue::ALL
        .iter()
        .map(|m| m.name)
        .collect();
    for metric in &queried {
        assert!(
            exported.contains(metric.as_str()),
            "the dashboard queries {metric}, which the daemon does not export"
        );
    }
    let compose = read("docker-compose.yml");
    assert!(compose.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning"));
    assert!(compose.contains("./deploy/grafana/dashboards:/var/lib/grafana/dashboards"));
}

#[test]
fn readme_handler_example_is_the_compiled_example() {
    let example = read("examples/order_placed.rs");
    let part = example
        .split("// README example: begin\n")
        .nth(1)
        .and_then(|rest| rest.split("// README example: end\n").next())
        .expect("markers in examples/order_placed.rs");
    assert!(part.contains("impl EventHandler for OrderPlacedHandler"));
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("```rust\n{part}```")),
        "the README's handler example differs from examples/order_placed.rs"
    );
}

/// The operators' list of metrics is the catalogue's: each metric the daemon exports is named in
/// docs/OPERATING.md's "Metrics" (in full or by its suffix after `event_processor`), so a new one cannot go
/// undocumented.
#[test]
fn operating_guide_lists_every_metric_of_the_catalogue() {
    let guide = read("docs/OPERATING.md");
    let monitoring = guide
        .split("## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/OPERATING.md's Metrics section");
    for m in event_processor::catalogue::ALL {
        let suffix = m.name.trim_start_matches("event_processor");
        assert!(
            monitoring.contains(&format!("`{}", m.name))
                || monitoring.contains(&format!("`{suffix}")),
            "{} is exported but not in docs/OPERATING.md's Metrics list",
            m.name
        );
    }
}
