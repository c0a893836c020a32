//! No secret in any output: the binary (`run`, `replay-dlq`, `healthcheck`, `rebuild`, `snapshot-outbox`) started with canary values in every
//! variable that can hold a secret, in valid and in malformed forms, against real Kafka and a real MongoDB-wire
//! server. Every line it writes, its `/metrics` page and the dead letters it produces are searched for the
//! canaries.

mod common;

use std::time::Duration;

use common::process::{Proc, log_path};
use common::*;
use rdkafka::message::{Headers, Message};

const WAIT: Duration = Duration::from_secs(90);

/// Canary values, unique to the run, each in the form a user would write.
struct Canaries {
    /// A MongoDB password with a `/` (written percent-encoded in a valid URI, bare in a malformed one).
    mongo_password: String,
    aws_token: String,
    sasl_password: String,
    ssl_key_password: String,
    oauth_secret: String,
    jaas_password: String,
}

impl Canaries {
    fn new() -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Canaries {
            mongo_password: format!("Cnry{tag}pw/sl4sh"),
            aws_token: format!("Cnry{tag}awstoken"),
            sasl_password: format!("Cnry{tag}sasl"),
            ssl_key_password: format!("Cnry{tag}sslkey"),
            oauth_secret: format!("Cnry{tag}oauth"),
            jaas_password: format!("Cnry{tag}jaas"),
        }
    }

    /// Every form in which a canary could leak: as written, percent-encoded, and the parts either side of the `/`.
    fn forms(&self) -> Vec<String> {
        let mut out = vec![
            self.mongo_password.clone(),
            self.mongo_password.replace('/', "%2F"),
            self.aws_token.clone(),
            self.sasl_password.clone(),
            self.ssl_key_password.clone(),
            self.oauth_secret.clone(),
            self.jaas_password.clone(),
        ];
        out.extend(self.mongo_password.split('/').map(str::to_string));
        out
    }

    /// The librdkafka pass-through secrets, valid for a PLAINTEXT cluster (librdkafka ignores them, and says so).
    fn kafka_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KAFKA_PROPERTY_SASL_USERNAME", "canary-user".to_string()),
            ("KAFKA_PROPERTY_SASL_PASSWORD", self.sasl_password.clone()),
            (
                "KAFKA_PROPERTY_SSL_KEY_PASSWORD",
                self.ssl_key_password.clone(),
            ),
        ]
    }

    fn leaks(&self, what: &str, text: &str) -> Vec<String> {
        self.forms()
            .into_iter()
            .filter(|c| text.contains(c.as_str()))
            .map(|c| format!("{what} contains {c}"))
            .collect()
    }
}

/// `mongodb://host` with credentials and options spliced in.
fn with_credentials(uri: &str, userinfo: &str, options: &str) -> String {
    let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
    let rest = rest.trim_end_matches('/');
    let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut out = format!("mongodb://{userinfo}@{hosts}/");
    let opts: Vec<&str> = [query, options]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if !opts.is_empty() {
        out.push('?');
        out.push_str(&opts.join("&"));
    }
    out
}

fn log_of(name: &str) -> String {
    std::fs::read_to_string(log_path(name)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output() {
    let env = TestEnv::new("secrets", 1).await;
    let c = Canaries::new();
    let mut leaks = Vec::new();
    let kafka: Vec<(&str, String)> = c.kafka_vars();
    let as_refs = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        kafka.iter().cloned().chain(extra.iter().cloned()).collect()
    };
    let run = |name: &str, args: &[&str], vars: &[(&'static str, String)]| {
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proc::command(&env, name, args, &refs)
    };

    // 1. A working daemon with the Kafka secrets, at debug level (librdkafka's configuration and security
    //    contexts too), that dead-letters a record: its log, its metrics, its dead letter.
    let port = free_port();
    let working = as_refs(&[
        ("HTTP_PORT", port.to_string()),
        ("LOG_LEVEL", "debug".to_string()),
        ("KAFKA_PROPERTY_DEBUG", "conf,security,generic".to_string()),
    ]);
    let mut daemon = run(&format!("secrets-run-{}", env.topic), &["run"], &working);
    env.produce(&[Rec::new("k", "not json")]).await;
    wait_committed(&env, 1, 1, WAIT).await;
    let metrics = http_request(&format!("http://127.0.0.1:{port}"), "GET", "/metrics", None)
        .await
        .1;
    assert!(
        metrics.contains("event_processor_records_consumed_total"),
        "metrics served"
    );
    leaks.extend(c.leaks("/metrics", &metrics));
    let health = Proc::command(
        &env,
        &format!("secrets-health-{}", env.topic),
        &["healthcheck"],
        &{
            let v: Vec<(&str, &str)> = working.iter().map(|(k, v)| (*k, v.as_str())).collect();
            v
        },
    )
    .wait_exit(Duration::from_secs(30));
    assert!(health.is_some_and(|s| s.success()), "healthcheck passes");
    assert!(daemon.exited().is_none(), "the daemon runs");
    assert!(daemon.terminate().success());
    let log = log_of(&format!("secrets-run-{}", env.topic));
    assert!(log.contains("Starting event-processor"), "{log}");
    leaks.extend(c.leaks("the daemon's log", &log));
    let letters = env.dead_letters(1);
    assert_eq!(letters.len(), 1);
    for m in &letters {
        let mut text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        for h in m.headers().unwrap().iter() {
            text.push_str(h.key);
            text.push_str(&String::from_utf8_lossy(h.value.unwrap_or_default()));
        }
        leaks.extend(c.leaks("a dead letter", &text));
    }

    // 2. replay-dlq with the same secrets.
    let mut replay = run(
        &format!("secrets-replay-{}", env.topic),
        &["replay-dlq"],
        &working,
    );
    assert!(replay.wait_exit(WAIT).is_some(), "replay-dlq ends");
    leaks.extend(c.leaks(
        "replay-dlq's output",
        &log_of(&format!("secrets-replay-{}", env.topic)),
    ));

    // 3. MongoDB credentials the server does not know, valid in form, with an AWS session token option and a
    //    percent-encoded password: the daemon keeps trying and logs why.
    let encoded = c.mongo_password.replace('/', "%2F");
    let valid_uri = with_credentials(
        &env.mongo_uri,
        &format!("canary-user:{encoded}"),
        &format!(
            "authSource=admin&appName=canary&authMechanismProperties=AWS_SESSION_TOKEN:{}",
            c.aws_token
        ),
    );
    let mut bad_auth = run(
        &format!("secrets-auth-{}", env.topic),
        &["run"],
        &as_refs(&[("MONGODB_URI", valid_uri.clone())]),
    );
    let ended = bad_auth.wait_exit(Duration::from_secs(12));
    if ended.is_none() {
        bad_auth.terminate();
    }
    let log = log_of(&format!("secrets-auth-{}", env.topic));
    assert!(!log.trim().is_empty(), "the daemon said something");
    leaks.extend(c.leaks("the log with MongoDB credentials", &log));
    let replay_auth = run(
        &format!("secrets-replay-auth-{}", env.topic),
        &["replay-dlq"],
        &as_refs(&[("MONGODB_URI", valid_uri)]),
    )
    .wait_exit(WAIT);
    assert!(replay_auth.is_some(), "replay-dlq ends");
    leaks.extend(c.leaks(
        "replay-dlq with MongoDB credentials",
        &log_of(&format!("secrets-replay-auth-{}", env.topic)),
    ));

    // 4. Malformed: the password's `/` not escaped; a JAAS line and an OAuth secret librdkafka does not take.
    let malformed = [
        (
            "uri",
            vec![(
                "MONGODB_URI",
                with_credentials(
                    &env.mongo_uri,
                    &format!("canary-user:{}", c.mongo_password),
                    &format!("authMechanismProperties=AWS_SESSION_TOKEN:{}", c.aws_token),
                ),
            )],
        ),
        (
            "jaas",
            vec![(
                "KAFKA_PROPERTY_SASL_JAAS_CONFIG",
                format!(
                    "org.apache.kafka.common.security.plain.PlainLoginModule required username=\"u\" password=\"{}\";",
                    c.jaas_password
                ),
            )],
        ),
        (
            "oauth",
            vec![
                (
                    "KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_SECRET",
                    c.oauth_secret.clone(),
                ),
                ("KAFKA_PROPERTY_SASL_OAUTHBEARER_METHOD", "oidc".to_string()),
                (
                    "KAFKA_PROPERTY_SECURITY_PROTOCOL",
                    "SASL_PLAINTEXT".to_string(),
                ),
                ("KAFKA_PROPERTY_SASL_MECHANISMS", "OAUTHBEARER".to_string()),
            ],
        ),
    ];
    for (what, vars) in malformed {
        for cmd in ["run", "replay-dlq"] {
            let name = format!("secrets-{what}-{cmd}-{}", env.topic);
            let mut p = run(&name, &[cmd], &as_refs(&vars));
            if p.wait_exit(Duration::from_secs(12)).is_none() {
                p.terminate();
            }
            let out = log_of(&name);
            assert!(!out.trim().is_empty(), "{name} said nothing");
            leaks.extend(c.leaks(&format!("{what} {cmd}"), &out));
        }
    }

    // 5. rebuild with the Kafka secrets (it runs to its end over the test's topic), and snapshot-outbox with a
    //    PostgreSQL password in OUTBOX_DATABASE_URL and a server that is not there.
    let name = format!("secrets-rebuild-{}", env.topic);
    let mut rebuild = run(
        &name,
        &["rebuild", "--handler", "UserCreatedHandler"],
        &working,
    );
    let status = rebuild.wait_exit(WAIT).expect("rebuild ends");
    assert!(status.success(), "rebuild finished: {}", log_of(&name));
    leaks.extend(c.leaks("rebuild's output", &log_of(&name)));
    let name = format!("secrets-snapshot-{}", env.topic);
    let outbox_url = format!("postgres://canary-user:{encoded}@127.0.0.1:1/app");
    let mut snapshot = run(
        &name,
        &["snapshot-outbox"],
        &as_refs(&[("OUTBOX_DATABASE_URL", outbox_url)]),
    );
    let status = snapshot.wait_exit(WAIT).expect("snapshot-outbox ends");
    assert!(!status.success(), "no PostgreSQL there");
    let out = log_of(&name);
    assert!(
        out.contains("OUTBOX_DATABASE_URL"),
        "says what failed: {out}"
    );
    leaks.extend(c.leaks("snapshot-outbox's output", &out));

    // 6. `config`, which prints the whole configuration: with every secret of the run above and the MongoDB
    //    credentials, it names each variable and shows none of their secret values.
    let name = format!("secrets-config-{}", env.topic);
    let mut config = run(
        &name,
        &["config"],
        &as_refs(&[
            (
                "MONGODB_URI",
                with_credentials(
                    &env.mongo_uri,
                    &format!("canary-user:{encoded}"),
                    "authSource=admin",
                ),
            ),
            (
                "KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_SECRET",
                c.oauth_secret.clone(),
            ),
        ]),
    );
    let status = config.wait_exit(WAIT).expect("config ends");
    assert!(status.success(), "config printed: {}", log_of(&name));
    let out = log_of(&name);
    assert!(
        out.contains("\"KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_SECRET\"")
            && out.contains("\"MONGODB_URI\""),
        "{out}"
    );
    leaks.extend(c.leaks("config's output", &out));
    assert!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
}
