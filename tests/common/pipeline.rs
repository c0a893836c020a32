//! A copy of a shipped Debezium connector deployed in Kafka Connect under fresh names, and the PostgreSQL
//! connection that writes its outbox: the end-to-end tests' pipeline.

use std::time::Duration;

use serde_json::Value;

use super::{e2e_services, http_request, new_id, wait_until};

const WAIT: Duration = Duration::from_secs(120);

/// One deployed connector and the PostgreSQL connection of a test.
pub struct Pipeline {
    pub pg: tokio_postgres::Client,
    pub connect: String,
    pub name: String,
    pub slot: String,
    pub prefix: String,
    /// The connector configuration as deployed.
    pub config: serde_json::Map<String, Value>,
}

impl Pipeline {
    /// Deploys `debezium/<file>` under fresh names, with `overrides`, and waits until the connector, every task
    /// and the replication slot are live.
    pub async fn deploy(file: &str, overrides: &[(&str, &str)]) -> Pipeline {
        let (pg_url, connect) = e2e_services();
        let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL (POSTGRES_URL)");
        tokio::spawn(conn);
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let p = Pipeline {
            pg,
            connect,
            name: format!("e2e-{suffix}"),
            slot: format!("e2e_{suffix}"),
            prefix: format!("e2e{suffix}"),
            config: serde_json::Map::new(),
        };
        let path = format!("{}/debezium/{file}", env!("CARGO_MANIFEST_DIR"));
        let shipped: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut cfg = shipped["config"].as_object().unwrap().clone();
        let url = url_parts(&pg_url);
        for (k, v) in [
            ("database.hostname", url.host.as_str()),
            ("database.port", url.port.as_str()),
            ("database.user", url.user.as_str()),
            ("database.password", url.password.as_str()),
            ("database.dbname", url.db.as_str()),
            ("topic.prefix", p.prefix.as_str()),
            ("slot.name", p.slot.as_str()),
        ] {
            cfg.insert(k.into(), Value::String(v.into()));
        }
        if cfg.contains_key("transforms.outbox.route.topic.replacement") {
            cfg.insert(
                "transforms.outbox.route.topic.replacement".into(),
                Value::String(format!("{}.event.${{routedByValue}}", p.prefix)),
            );
        }
        for (k, v) in overrides {
            cfg.insert(k.to_string(), Value::String(v.to_string()));
        }
        let mut p = p;
        p.config = cfg.clone();
        let (code, body) = http(
            &p.connect,
            "PUT",
            &format!("/connectors/{}/config", p.name),
            Some(&Value::Object(cfg)),
        )
        .await;
        assert!(
            code == 200 || code == 201,
            "deploying the connector: HTTP {code}: {body}"
        );
        wait_until("connector and every task RUNNING", WAIT, || async {
            let (code, body) = http(
                &p.connect,
                "GET",
                &format!("/connectors/{}/status", p.name),
                None,
            )
            .await;
            let s: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let tasks = s["tasks"].as_array().cloned().unwrap_or_default();
            assert!(
                !tasks.iter().any(|t| t["state"] == "FAILED"),
                "connector task failed: {body}"
            );
            code == 200
                && s["connector"]["state"] == "RUNNING"
                && !tasks.is_empty()
                && tasks.iter().all(|t| t["state"] == "RUNNING")
        })
        .await;
        wait_until("replication slot active", WAIT, || async {
            let rows =
                p.pg.query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&p.slot],
                )
                .await
                .unwrap();
            !rows.is_empty()
        })
        .await;
        p
    }

    pub async fn insert(
        &self,
        event_type: &str,
        aggregate_id: &str,
        aggregate_type: &str,
        payload: &Value,
    ) -> String {
        let id = new_id();
        self.pg
            .execute(
                "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
                 VALUES ($1::text::uuid, $2::text::uuid, $3, $4, $5::text::jsonb)",
                &[&id, &aggregate_id, &aggregate_type, &event_type, &payload.to_string()],
            )
            .await
            .expect("INSERT into the outbox");
        id
    }

    /// `RECORD_FORMATS` for this connector's topics: the format its configuration gives
    /// (`Format::for_connector`), declared for its Event Router topics; raw change events are left to the default.
    pub fn record_formats(&self) -> String {
        match event_processor::decode::Format::for_connector(&self.config) {
            event_processor::decode::Format::ChangeEvent => String::new(),
            router => format!("^{}\\.event\\..*={router}", self.prefix),
        }
    }

    /// The daemon's settings for this connector's topics.
    pub fn topics(&self, router: bool) -> String {
        if router {
            format!("^{}\\.event\\..*", self.prefix)
        } else {
            format!("{}.activity.event_outbox", self.prefix)
        }
    }

    pub async fn remove(self) {
        let _ = http(
            &self.connect,
            "DELETE",
            &format!("/connectors/{}", self.name),
            None,
        )
        .await;
        for _ in 0..50 {
            let dropped = self
                .pg
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&self.slot],
                )
                .await;
            let left = self
                .pg
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
                .map(|r| r.len())
                .unwrap_or(1);
            if dropped.is_ok() && left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub struct UrlParts {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: String,
    pub db: String,
}

/// `postgres://user:password@host:port/db`.
pub fn url_parts(url: &str) -> UrlParts {
    let rest = url
        .split("://")
        .nth(1)
        .expect("POSTGRES_URL is postgres://user:password@host:port/db");
    let (auth, hostdb) = rest
        .split_once('@')
        .expect("POSTGRES_URL needs user:password@");
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, db) = hostdb.split_once('/').unwrap_or((hostdb, "postgres"));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    UrlParts {
        user: user.into(),
        password: password.into(),
        host: host.into(),
        port: port.into(),
        db: db.split('?').next().unwrap_or(db).into(),
    }
}

/// A request to the Kafka Connect REST API: status and JSON body.
pub async fn http(base: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let (code, body) =
        http_request(base, method, path, body.map(Value::to_string).as_deref()).await;
    // Chunked bodies: keep the JSON between the first '{' and the last '}'.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if b > a => body[a..=b].to_string(),
        _ => body,
    };
    (code, body)
}
