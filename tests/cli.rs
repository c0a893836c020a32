//! The command line as a user meets it: help on the binary and on every command, the version with its commit,
//! the documented exit codes, errors that end their line, and the commands that need no service (`config`,
//! `format`).

use std::process::{Command, Output};

fn bin(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_event-processor"))
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .expect("running the binary")
}

const COMMANDS: &[&str] = &[
    "run",
    "healthcheck",
    "replay-dlq",
    "rebuild",
    "snapshot-outbox",
    "config",
    "format",
];

#[test]
fn help_on_the_binary_and_on_every_command_exits_0() {
    for flag in ["--help", "-h"] {
        let out = bin(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        let text = String::from_utf8_lossy(&out.stdout);
        for c in COMMANDS {
            assert!(text.contains(c), "{flag} does not list {c}: {text}");
        }
    }
    for c in COMMANDS {
        let out = bin(&[c, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "{c} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: event-processor"));
    }
}

#[test]
fn the_version_names_the_commit_built_from() {
    for flag in ["--version", "-V"] {
        let out = bin(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            text.starts_with(&format!("event-processor {}", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        // Built from a checkout (as `cargo test` builds it here): the commit is part of it.
        if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists() {
            assert!(text.contains("(commit "), "{text}");
        }
    }
}

#[test]
fn a_usage_error_exits_2_and_a_configuration_error_78_each_with_one_finished_line() {
    for args in [
        &["no-such-command"][..],
        &["rebuild"],
        &["run", "--no-such-option"],
    ] {
        let out = bin(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stderr.ends_with(b"\n"), "{args:?}");
    }
    let out = bin(&["run"], &[("MONGODB_URI", "mongodb://x")]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.ends_with('\n') && err.contains("KAFKA_BOOTSTRAP_SERVERS"),
        "{err}"
    );
    let out = bin(
        &["config"],
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", "k:9092"),
            ("MONGODB_URI", "mongodb://x"),
            ("LOG_FORMAT", "xml"),
        ],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT"));
}

#[test]
fn config_prints_every_variable_with_its_value_and_hides_secrets() {
    let out = bin(
        &["config"],
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", "k:9092"),
            ("MONGODB_URI", "mongodb://app:pa55word@mongo:27017/?w=1"),
            ("KAFKA_PROPERTY_SASL_PASSWORD", "kafka-pa55"),
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
            ("RECORD_FORMATS", "^outbox\\..*=router"),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("pa55"), "{text}");
    let shown: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(shown["KAFKA_BOOTSTRAP_SERVERS"], "k:9092");
    assert_eq!(shown["KAFKA_PROPERTY_SECURITY_PROTOCOL"], "SASL_SSL");
    assert_eq!(shown["RECORD_FORMATS"], "^outbox\\..*=router");
    assert_eq!(shown["PROCESSING_MAX_IN_FLIGHT"], 1000, "defaults too");
    assert!(
        shown["MONGODB_URI"].as_str().unwrap().contains("app:***@"),
        "{text}"
    );
}

#[test]
fn format_reads_a_connector_configuration() {
    let file = |f: &str| format!("{}/debezium/{f}", env!("CARGO_MANIFEST_DIR"));
    for (f, expected) in [
        ("postgres-connector.json", "change-event"),
        ("outbox-router-connector.json", "router"),
    ] {
        let out = bin(&["format", &file(f)], &[]);
        assert_eq!(out.status.code(), Some(0), "{f}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected, "{f}");
    }
    let out = bin(&["format", "/no/such/file.json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.ends_with(b"\n"));
}
