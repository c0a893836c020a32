//! The daemon against secured servers: Kafka's SASL_SSL listener (SCRAM-SHA-512 or PLAIN over TLS, certificates
//! verified, the StandardAuthorizer's ACLs) and a MongoDB-wire server with SCRAM-SHA-256 authentication and TLS,
//! from `scripts/stack secure` (its settings and passwords in `$STACK_DIR/secured/secured.env`). First the path
//! from an INSERT to the read model, secured end to end; then each misconfiguration: one ERROR line naming it,
//! the process running and not ready (no crash loop), nothing committed, dead-lettered or lost, and, where access
//! is granted afterwards, the records applied once.
//!
//! Not part of a plain `cargo test` (it needs the secured side, which testcontainers does not start):
//! `scripts/test` runs it after `scripts/stack secure`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pipeline::Pipeline;
use common::process::{Proc, log_lines, log_path};
use common::*;
use mongodb::bson::{Document, doc};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

/// The secured side's settings and passwords, as `scripts/stack secure` wrote them.
struct Secured {
    vars: HashMap<String, String>,
}

impl Secured {
    fn load() -> Secured {
        let dir = std::env::var("STACK_DIR")
            .unwrap_or_else(|_| format!("{}/.stack", env!("CARGO_MANIFEST_DIR")));
        let path = format!("{dir}/secured/secured.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{path}: {e}. The secured tests need the secured side: run `scripts/stack secure`."
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Secured { vars }
    }

    fn get(&self, key: &str) -> String {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from secured.env"))
            .clone()
    }

    /// The daemon's Kafka settings: SASL over TLS as `user`, the stack's CA.
    fn kafka(&self, mechanism: &str, user: &str, password: &str) -> Vec<(String, String)> {
        [
            (
                "KAFKA_BOOTSTRAP_SERVERS",
                self.get("SECURED_KAFKA_BOOTSTRAP"),
            ),
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL".into()),
            ("KAFKA_PROPERTY_SASL_MECHANISM", mechanism.into()),
            ("KAFKA_PROPERTY_SASL_USERNAME", user.into()),
            ("KAFKA_PROPERTY_SASL_PASSWORD", password.into()),
            (
                "KAFKA_PROPERTY_SSL_CA_LOCATION",
                self.get("SECURED_CA_FILE"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A MongoDB URI for `user` over TLS with the CA file `ca`, to `hostport`. The stack's server is one node that
    /// advertises its IP address, not the name in its certificate, so the URIs connect directly to it.
    fn mongo_uri(&self, user: &str, password: &str, hostport: &str, ca: &str) -> String {
        format!(
            "mongodb://{user}:{}@{hostport}/?tls=true&tlsCAFile={ca}&authSource=admin&directConnection=true",
            password.replace('/', "%2F")
        )
    }

    fn admin_uri(&self) -> String {
        self.mongo_uri(
            "admin",
            &self.get("SECURED_MONGO_ADMIN_PASSWORD"),
            &self.get("SECURED_MONGO_HOSTPORT"),
            &self.get("SECURED_CA_FILE"),
        )
    }
}

/// One test's names and users: a topic, dead-letter topic and group (under the daemon's ACL prefixes unless the
/// test says otherwise), a database on the secured MongoDB-wire server and a user that may read and write it.
struct Case {
    secured: Secured,
    /// The stack's plaintext listener: the test's own producer, reader and offset checks.
    plain: String,
    topic: String,
    dlq: String,
    group: String,
    db_name: String,
    db: mongodb::Database,
    mongo_user: String,
    mongo_password: String,
}

impl Case {
    async fn new(name: &str, topic_prefix: &str, dlq_prefix: &str, group_prefix: &str) -> Case {
        let secured = Secured::load();
        let plain = services().await.kafka.clone();
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let topic = format!("{topic_prefix}{name}.{tag}");
        let dlq = format!("{dlq_prefix}{name}.{tag}");
        create_topics(&plain, &[(&topic, 1), (&dlq, 1)]).await;
        let admin = mongodb::Client::with_uri_str(secured.admin_uri())
            .await
            .expect("the secured MongoDB-wire server as admin");
        let db_name = format!("sec_{name}_{tag}");
        let mongo_user = format!("daemon_{tag}");
        // A '/' in the password: written percent-encoded in the URI, it must not leak in either form.
        let mongo_password = format!("Pw{tag}/s3cret");
        admin
            .database("admin")
            .run_command(doc! {
                "createUser": &mongo_user, "pwd": &mongo_password,
                "roles": [{ "role": "readWrite", "db": &db_name }],
            })
            .await
            .expect("creating the daemon's MongoDB user");
        Case {
            db: admin.database(&db_name),
            secured,
            plain,
            topic,
            dlq,
            group: format!("{group_prefix}{name}-{tag}"),
            db_name,
            mongo_user,
            mongo_password,
        }
    }

    /// Names under the daemon's ACL prefixes.
    async fn granted(name: &str) -> Case {
        Case::new(name, "secured.", "secured-dlq.", "secured-").await
    }

    fn mongo_uri(&self) -> String {
        self.secured.mongo_uri(
            &self.mongo_user,
            &self.mongo_password,
            &self.secured.get("SECURED_MONGO_HOSTPORT"),
            &self.secured.get("SECURED_CA_FILE"),
        )
    }

    /// The daemon's whole configuration, correct; `overrides` replace variables.
    fn vars(&self, port: u16, overrides: &[(&str, String)]) -> Vec<(String, String)> {
        let mut vars = self.secured.kafka(
            "SCRAM-SHA-512",
            "daemon",
            &self.secured.get("SECURED_KAFKA_DAEMON_PASSWORD"),
        );
        vars.extend(
            [
                ("MONGODB_URI", self.mongo_uri()),
                ("MONGODB_DATABASE", self.db_name.clone()),
                ("KAFKA_TOPICS", self.topic.clone()),
                ("KAFKA_GROUP_ID", self.group.clone()),
                ("DLQ_TOPIC", self.dlq.clone()),
                ("HTTP_PORT", port.to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        for (k, v) in overrides {
            vars.retain(|(key, _)| key != k);
            vars.push((k.to_string(), v.clone()));
        }
        vars
    }

    /// Starts the daemon as a process; the HTTP port it serves health and metrics on.
    fn start(&self, name: &str, overrides: &[(&str, String)]) -> (Proc, String) {
        let port = free_port();
        let vars = self.vars(port, overrides);
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = self.test_env();
        (
            Proc::command(&env, name, &["run"], &refs),
            format!("http://127.0.0.1:{port}"),
        )
    }

    /// What `Proc` reads its defaults from (each replaced by [`Case::vars`]).
    fn test_env(&self) -> TestEnv {
        TestEnv {
            kafka: self.secured.get("SECURED_KAFKA_BOOTSTRAP"),
            mongo_uri: self.mongo_uri(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            dlq: self.dlq.clone(),
            db_name: self.db_name.clone(),
            db: self.db.clone(),
            partitions: 1,
            declared: Vec::new(),
        }
    }

    async fn produce(&self, records: &[Rec]) {
        produce(&self.plain, &self.topic, records).await;
    }

    fn committed(&self) -> Option<i64> {
        committed(&self.plain, &self.group, &self.topic, 1)[0]
    }

    fn dead_letters(&self) -> Vec<rdkafka::message::OwnedMessage> {
        read_all(&self.plain, &self.dlq, 0, Duration::from_secs(5))
    }

    async fn users(&self) -> u64 {
        self.db
            .collection::<Document>("users")
            .count_documents(doc! {})
            .await
            .expect("count users")
    }

    /// Every secret this case's daemons were given.
    fn secrets(&self) -> Vec<String> {
        let mut out = vec![
            self.mongo_password.clone(),
            self.mongo_password.replace('/', "%2F"),
            self.secured.get("SECURED_KAFKA_DAEMON_PASSWORD"),
            self.secured.get("SECURED_KAFKA_PLAIN_PASSWORD"),
        ];
        out.extend(self.mongo_password.split('/').map(str::to_string));
        out
    }

    /// Grants `User:daemon` an ACL through the broker's own tool (`scripts/stack acl`).
    fn grant(&self, args: &[&str]) {
        let status =
            std::process::Command::new(format!("{}/scripts/stack", env!("CARGO_MANIFEST_DIR")))
                .args(["acl", "--add", "--allow-principal", "User:daemon"])
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("scripts/stack acl");
        assert!(status.success(), "granting {args:?} failed");
    }
}

/// `/health/ready` as JSON (null while the daemon does not answer yet).
async fn readiness(base: &str) -> Value {
    if tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .is_err()
    {
        return Value::Null;
    }
    let (_, body) = http_request(base, "GET", "/health/ready", None).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// The daemon's ERROR lines.
fn errors(name: &str) -> Vec<Value> {
    log_lines(name)
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect()
}

/// No secret of `case`'s in the daemon's log, its metrics or its health answer.
async fn assert_no_secret(case: &Case, name: &str, base: Option<&str>) {
    let mut outputs = vec![(
        "log".to_string(),
        std::fs::read_to_string(log_path(name)).unwrap_or_default(),
    )];
    if let Some(base) = base {
        for path in ["/metrics", "/health/ready", "/health/live"] {
            outputs.push((
                path.to_string(),
                http_request(base, "GET", path, None).await.1,
            ));
        }
    }
    for (what, text) in &outputs {
        for secret in case.secrets() {
            assert!(
                !text.contains(&secret),
                "a secret of {name} appears in its {what}"
            );
        }
    }
}

/// The misconfigured daemon `name`: within the wait, one ERROR line whose `refused` is `refused` (and whose
/// message contains `says`), readiness saying the same; then, some seconds on, still that one line, the process
/// still running, nothing committed, nothing dead-lettered, nothing written. Returns the ERROR line.
async fn refused_once(
    case: &Case,
    daemon: &mut Proc,
    name: &str,
    base: &str,
    field: &str,
    refused: &str,
) -> Value {
    wait_until(
        &format!("{name}: readiness says {field}={refused}"),
        WAIT,
        || async { readiness(base).await[field] == refused },
    )
    .await;
    wait_until(&format!("{name}: the ERROR line"), WAIT, || async {
        errors(name).iter().any(|l| l["refused"] == refused)
    })
    .await;
    // The clients retry many times in this while; the log says it once.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(daemon.exited().is_none(), "{name} exited");
    let ready = readiness(base).await;
    assert_eq!(ready["ready"], false, "{name}: {ready}");
    assert_eq!(ready[field], refused, "{name}: {ready}");
    let errs = errors(name);
    assert_eq!(
        errs.len(),
        1,
        "{name}: one ERROR line, not {}: {errs:#?}",
        errs.len()
    );
    assert_eq!(errs[0]["refused"], refused, "{name}: {:#?}", errs[0]);
    assert_eq!(case.committed(), None, "{name} committed");
    assert!(case.dead_letters().is_empty(), "{name} dead-lettered");
    assert_eq!(case.users().await, 0, "{name} wrote");
    assert_no_secret(case, name, Some(base)).await;
    errs[0].clone()
}

/// After a misconfigured daemon: the correctly configured one applies every record once.
async fn then_a_correct_daemon_applies_all(case: &Case, name: &str, n: u64) {
    let (daemon, _) = case.start(name, &[]);
    wait_until(&format!("{name}: {n} users"), WAIT, || async {
        case.users().await == n
    })
    .await;
    wait_until(&format!("{name}: committed to {n}"), WAIT, || async {
        case.committed() == Some(n as i64)
    })
    .await;
    assert!(case.dead_letters().is_empty());
    assert_no_secret(case, name, None).await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_reaches_the_read_model_over_sasl_scram_tls_and_mongodb_auth_tls() {
    let case = Case::granted("e2e").await;
    let s = &case.secured;
    // Debezium's producer on the SASL_SSL listener as its own principal, verifying the broker's certificate.
    let jaas = format!(
        "org.apache.kafka.common.security.scram.ScramLoginModule required username=\"debezium\" password=\"{}\";",
        s.get("SECURED_KAFKA_DEBEZIUM_PASSWORD")
    );
    let prefix = case
        .topic
        .trim_end_matches(|c| c != '.')
        .trim_end_matches('.')
        .to_string();
    let bootstrap = s.get("SECURED_KAFKA_BOOTSTRAP");
    let ca = s.get("SECURED_CA_FILE");
    let mut overrides: Vec<(String, String)> = vec![
        ("snapshot.mode".into(), "no_data".into()),
        ("topic.prefix".into(), prefix.clone()),
    ];
    for client in ["producer", "admin"] {
        for (k, v) in [
            ("bootstrap.servers", bootstrap.as_str()),
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.jaas.config", jaas.as_str()),
            ("ssl.truststore.type", "PEM"),
            ("ssl.truststore.location", ca.as_str()),
        ] {
            overrides.push((format!("{client}.override.{k}"), v.to_string()));
        }
    }
    let refs: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let p = Pipeline::deploy("postgres-connector.json", &refs).await;
    let topic = format!("{prefix}.activity.event_outbox");
    let (daemon, base) = case.start("secured_e2e", &[("KAFKA_TOPICS", topic)]);
    let email = format!("secured-{}@example.com", &case.db_name);
    let user_id = new_id();
    p.insert(
        "UserCreated",
        &user_id,
        "user",
        &serde_json::json!({ "email": email, "username": "secured" }),
    )
    .await;
    wait_until("the user in the secured read model", WAIT, || async {
        case.db
            .collection::<Document>("users")
            .find_one(doc! { "_id": &user_id, "email": &email })
            .await
            .expect("find")
            .is_some()
    })
    .await;
    wait_until("ready", WAIT, || async {
        readiness(&base).await["ready"] == true
    })
    .await;
    assert!(
        errors("secured_e2e").is_empty(),
        "{:#?}",
        errors("secured_e2e")
    );
    assert_no_secret(&case, "secured_e2e", Some(&base)).await;
    // The effective configuration the binary prints hides the secrets as well.
    let config_out = std::process::Command::new(env!("CARGO_BIN_EXE_event-processor"))
        .arg("config")
        .env_clear()
        .envs(case.vars(0, &[]))
        .output()
        .expect("event-processor config");
    let text = String::from_utf8_lossy(&config_out.stdout).to_string()
        + &String::from_utf8_lossy(&config_out.stderr);
    assert!(config_out.status.success(), "{text}");
    for secret in case.secrets() {
        assert!(!text.contains(&secret), "a secret in `config`'s output");
    }
    assert!(daemon.terminate().success());
    p.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_over_tls_reads_the_topic() {
    let case = Case::granted("plain").await;
    case.produce(&new_users(5, "plain")).await;
    let password = case.secured.get("SECURED_KAFKA_PLAIN_PASSWORD");
    let (daemon, _) = case.start(
        "secured_plain",
        &[
            ("KAFKA_PROPERTY_SASL_MECHANISM", "PLAIN".into()),
            ("KAFKA_PROPERTY_SASL_PASSWORD", password),
        ],
    );
    wait_until("5 users", WAIT, || async { case.users().await == 5 }).await;
    wait_until("committed", WAIT, || async { case.committed() == Some(5) }).await;
    assert_no_secret(&case, "secured_plain", None).await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kafka_password_is_one_error_and_not_ready() {
    let case = Case::granted("kafkapw").await;
    case.produce(&new_users(3, "kafkapw")).await;
    let (mut daemon, base) = case.start(
        "secured_kafka_password",
        &[("KAFKA_PROPERTY_SASL_PASSWORD", "not-the-password".into())],
    );
    let line = refused_once(
        &case,
        &mut daemon,
        "secured_kafka_password",
        &base,
        "kafka_refused",
        "credentials",
    )
    .await;
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("KAFKA_PROPERTY_SASL_PASSWORD"),
        "{line}"
    );
    daemon.kill9();
    then_a_correct_daemon_applies_all(&case, "secured_kafka_password_fixed", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_one_error_naming_the_issuer() {
    let case = Case::granted("kafkaca").await;
    case.produce(&new_users(3, "kafkaca")).await;
    let (mut daemon, base) = case.start(
        "secured_kafka_ca",
        &[(
            "KAFKA_PROPERTY_SSL_CA_LOCATION",
            case.secured.get("SECURED_OTHER_CA_FILE"),
        )],
    );
    let line = refused_once(
        &case,
        &mut daemon,
        "secured_kafka_ca",
        &base,
        "kafka_refused",
        "certificate",
    )
    .await;
    let diagnosis = line["diagnosis"].as_str().unwrap_or_default();
    assert!(diagnosis.contains("UnknownIssuer"), "{line}");
    daemon.kill9();
    then_a_correct_daemon_applies_all(&case, "secured_kafka_ca_fixed", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_addressed_by_a_name_its_certificate_lacks_is_one_error_naming_the_mismatch() {
    let case = Case::granted("kafkahost").await;
    case.produce(&new_users(3, "kafkahost")).await;
    // The certificate is for localhost only.
    let by_ip = case
        .secured
        .get("SECURED_KAFKA_BOOTSTRAP")
        .replace("localhost", "127.0.0.1");
    let (mut daemon, base) =
        case.start("secured_kafka_host", &[("KAFKA_BOOTSTRAP_SERVERS", by_ip)]);
    let line = refused_once(
        &case,
        &mut daemon,
        "secured_kafka_host",
        &base,
        "kafka_refused",
        "certificate",
    )
    .await;
    let diagnosis = line["diagnosis"].as_str().unwrap_or_default();
    assert!(
        diagnosis.contains("not valid for name \"127.0.0.1\""),
        "{line}"
    );
    daemon.kill9();
    then_a_correct_daemon_applies_all(&case, "secured_kafka_host_fixed", 3).await;
}

/// A daemon whose Kafka user lacks one ACL (`refused`, on what `grant` names): one ERROR line, not ready, nothing
/// consumed; once granted, every record applied once and committed, without a restart.
async fn refused_until_granted(case: Case, name: &str, refused: &str, grant: &[&str]) {
    case.produce(&new_users(4, name)).await;
    let (mut daemon, base) = case.start(name, &[]);
    refused_once(&case, &mut daemon, name, &base, "kafka_refused", refused).await;
    case.grant(grant);
    wait_until("4 users once granted", WAIT, || async {
        case.users().await == 4
    })
    .await;
    wait_until("committed", WAIT, || async { case.committed() == Some(4) }).await;
    wait_until("ready", WAIT, || async {
        readiness(&base).await["ready"] == true
    })
    .await;
    assert!(case.dead_letters().is_empty());
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_on_the_topic_is_one_error_until_granted_then_every_record_once() {
    // A topic outside the daemon's ACL prefix.
    let case = Case::new("noread", "unread.", "secured-dlq.", "secured-").await;
    let topic = case.topic.clone();
    refused_until_granted(
        case,
        "secured_no_read",
        "topic authorization",
        &["--operation", "Read", "--topic", &topic],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_to_the_group_is_one_error_until_granted_then_every_record_once() {
    // A group outside the daemon's ACL prefix.
    let case = Case::new("nogroup", "secured.", "secured-dlq.", "ungranted-").await;
    let group = case.group.clone();
    refused_until_granted(
        case,
        "secured_no_group",
        "group authorization",
        &["--operation", "Read", "--group", &group],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_on_the_dead_letter_topic_holds_the_commit_at_the_poison_until_granted() {
    // A dead-letter topic outside the daemon's ACL prefix.
    let case = Case::new("nodlq", "secured.", "unwritten.", "secured-").await;
    let mut records = new_users(2, "before");
    records.push(Rec::new("poison", "{ this is not JSON"));
    records.extend(new_users(3, "after"));
    case.produce(&records).await;
    let name = "secured_no_dlq_write";
    let (daemon, base) = case.start(name, &[]);
    wait_until("the refused letter in readiness", WAIT, || async {
        readiness(&base).await["dead_letters_refused"] == 1
    })
    .await;
    // The partition's commit stops at the poison (offset 2): the records after it are applied (handlers are
    // idempotent) but not committed while the poison's letter cannot go.
    wait_until("the 5 users applied", WAIT, || async {
        case.users().await == 5
    })
    .await;
    wait_until("committed up to the poison", WAIT, || async {
        case.committed() == Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        case.committed(),
        Some(2),
        "the commit waits for the poison's letter"
    );
    assert_eq!(readiness(&base).await["ready"], false);
    assert!(case.dead_letters().is_empty());
    case.grant(&["--operation", "Write", "--topic", &case.dlq]);
    wait_until("committed to the end", WAIT, || async {
        case.committed() == Some(6)
    })
    .await;
    wait_until("ready", WAIT, || async {
        readiness(&base).await["ready"] == true
    })
    .await;
    let letters = case.dead_letters();
    assert_eq!(letters.len(), 1, "one letter, for the poison");
    // Applied once: the statistics count each user once.
    let totals = case
        .db
        .collection::<Document>("user_statistics")
        .find_one(doc! { "_id": "totals" })
        .await
        .unwrap()
        .expect("totals");
    let total = totals
        .get("total_users")
        .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)));
    assert_eq!(total, Some(5));
    assert_no_secret(&case, name, Some(&base)).await;
    assert!(daemon.terminate().success());
}

/// A misconfigured MongoDB connection (`uri` from the case): one ERROR line naming `refused`, not ready, nothing
/// consumed; then the correct daemon applies everything.
async fn mongo_refused(
    name: &str,
    tag: &str,
    refused: &str,
    uri: impl Fn(&Case) -> String,
) -> Value {
    let case = Case::granted(tag).await;
    case.produce(&new_users(3, tag)).await;
    let (mut daemon, base) = case.start(name, &[("MONGODB_URI", uri(&case))]);
    let line = refused_once(&case, &mut daemon, name, &base, "mongo_refused", refused).await;
    daemon.kill9();
    then_a_correct_daemon_applies_all(&case, &format!("{name}_fixed"), 3).await;
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_mongodb_password_is_one_error_and_not_ready() {
    let line = mongo_refused("secured_mongo_password", "mongopw", "credentials", |c| {
        let s = &c.secured;
        s.mongo_uri(
            &c.mongo_user,
            "Wr0ng/pw",
            &s.get("SECURED_MONGO_HOSTPORT"),
            &s.get("SECURED_CA_FILE"),
        )
    })
    .await;
    assert!(
        line["message"].as_str().unwrap().contains("MONGODB_URI"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_certificate_from_an_unknown_ca_is_one_error() {
    let line = mongo_refused("secured_mongo_ca", "mongoca", "certificate", |c| {
        let s = &c.secured;
        s.mongo_uri(
            &c.mongo_user,
            &c.mongo_password,
            &s.get("SECURED_MONGO_HOSTPORT"),
            &s.get("SECURED_OTHER_CA_FILE"),
        )
    })
    .await;
    assert!(
        line["error"].as_str().unwrap().contains("UnknownIssuer"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_server_addressed_by_a_name_its_certificate_lacks_is_one_error() {
    let line = mongo_refused("secured_mongo_host", "mongohost", "certificate", |c| {
        let s = &c.secured;
        let by_ip = s
            .get("SECURED_MONGO_HOSTPORT")
            .replace("localhost", "127.0.0.1");
        s.mongo_uri(
            &c.mongo_user,
            &c.mongo_password,
            &by_ip,
            &s.get("SECURED_CA_FILE"),
        )
    })
    .await;
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("not valid for name"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_user_without_write_access_is_one_error_and_nothing_is_dead_lettered() {
    let case = Case::granted("mongoro").await;
    case.produce(&new_users(3, "mongoro")).await;
    let reader = format!("reader_{}", &case.db_name[case.db_name.len() - 10..]);
    let reader_password = format!("R{}", &case.mongo_password);
    case.db
        .client()
        .database("admin")
        .run_command(doc! {
            "createUser": &reader, "pwd": &reader_password,
            "roles": [{ "role": "read", "db": &case.db_name }],
        })
        .await
        .expect("creating a read-only user");
    let s = &case.secured;
    let uri = s.mongo_uri(
        &reader,
        &reader_password,
        &s.get("SECURED_MONGO_HOSTPORT"),
        &s.get("SECURED_CA_FILE"),
    );
    let (mut daemon, base) = case.start("secured_mongo_read_only", &[("MONGODB_URI", uri)]);
    refused_once(
        &case,
        &mut daemon,
        "secured_mongo_read_only",
        &base,
        "mongo_refused",
        "authorization",
    )
    .await;
    daemon.kill9();
    then_a_correct_daemon_applies_all(&case, "secured_mongo_read_only_fixed", 3).await;
}
