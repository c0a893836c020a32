//! What the brokers refuse this client: its credentials, the TLS handshake, or an operation its principal has no
//! ACL for. librdkafka reports such a refusal from every client and every connection attempt, in its log and in
//! its error callback, and retries; none of it is the records' fault, and nothing is dead-lettered for it. Here
//! it becomes one ERROR line naming the cause and the setting to check (again every
//! [`crate::refusals::REPEAT`] while it lasts), and a reason in `/health/ready`, until the consumer is back in business (an assignment, or a record
//! received).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::health::Health;
use crate::refusals::Refusals;

/// What the brokers refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// SASL authentication failed: wrong user, password or mechanism.
    Credentials,
    /// The TLS handshake failed: the broker's certificate could not be verified.
    Certificate,
    /// No ACL lets this principal read (describe) a subscribed topic.
    Topic,
    /// No ACL lets this principal use the consumer group.
    Group,
    /// No ACL lets this principal do a cluster-wide operation.
    Cluster,
}

impl Refusal {
    /// The refusal an error reports, if it is one.
    pub fn of(error: &KafkaError) -> Option<Refusal> {
        use RDKafkaErrorCode as C;
        match error.rdkafka_error_code()? {
            C::Authentication | C::SaslAuthenticationFailed => Some(Refusal::Credentials),
            C::SSL => Some(Refusal::Certificate),
            C::TopicAuthorizationFailed => Some(Refusal::Topic),
            C::GroupAuthorizationFailed => Some(Refusal::Group),
            C::ClusterAuthorizationFailed => Some(Refusal::Cluster),
            _ => None,
        }
    }

    /// Its name in `/health/ready` (`kafka_refused`).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Credentials => "credentials",
            Refusal::Certificate => "certificate",
            Refusal::Topic => "topic authorization",
            Refusal::Group => "group authorization",
            Refusal::Cluster => "cluster authorization",
        }
    }

    /// What the operator is told to check.
    fn advice(self) -> &'static str {
        match self {
            Refusal::Credentials => {
                "Kafka refused this client's credentials: check KAFKA_PROPERTY_SASL_MECHANISM and its \
                 credentials (KAFKA_PROPERTY_SASL_USERNAME and KAFKA_PROPERTY_SASL_PASSWORD; for OAUTHBEARER \
                 with OIDC, KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_ID, _CLIENT_SECRET and _TOKEN_ENDPOINT_URL)"
            }
            Refusal::Certificate => {
                "The TLS handshake with a Kafka broker failed: its certificate could not be verified \
                 (KAFKA_PROPERTY_SSL_CA_LOCATION, and the host names in KAFKA_BOOTSTRAP_SERVERS)"
            }
            Refusal::Topic => {
                "Kafka does not let this principal read a subscribed topic: grant it READ on the topics of \
                 KAFKA_TOPICS"
            }
            Refusal::Group => {
                "Kafka does not let this principal use its consumer group: grant it READ on the group \
                 KAFKA_GROUP_ID"
            }
            Refusal::Cluster => {
                "Kafka refused this principal a cluster operation: check its ACLs on the cluster resource"
            }
        }
    }
}

/// What is refused now, shared by every Kafka client of the process (the consumer and the dead-letter producer
/// report the same wrong password).
pub struct AccessWatch {
    health: Arc<Health>,
    /// `KAFKA_BOOTSTRAP_SERVERS` and `ssl.ca.location`, to say why a certificate was not verified.
    tls_probe: Option<TlsProbe>,
    said: Refusals,
}

impl AccessWatch {
    pub fn new(health: Arc<Health>, config: &crate::config::Config) -> Arc<Self> {
        Arc::new(AccessWatch {
            health,
            tls_probe: TlsProbe::from_config(config),
            said: Refusals::default(),
        })
    }

    /// Takes an error from any client; true when it was a refusal (then it is handled here).
    pub fn report(&self, client: &str, error: &KafkaError, reason: &str) -> bool {
        let Some(refusal) = Refusal::of(error) else {
            return false;
        };
        metrics::counter!(crate::catalogue::ACCESS_REFUSALS,
            "service" => "kafka", "refused" => refusal.name())
        .increment(1);
        self.health.kafka_refused(Some(refusal.name()));
        if self.said.note(refusal.name()) {
            let diagnosis = match (refusal, &self.tls_probe) {
                (Refusal::Certificate, Some(probe)) => probe.diagnose(),
                _ => None,
            };
            tracing::error!(
                client,
                refused = refusal.name(),
                broker_said = reason,
                diagnosis,
                "{}",
                refusal.advice()
            );
        } else {
            tracing::debug!(
                client,
                refused = refusal.name(),
                reason,
                "Kafka refusal (said already)"
            );
        }
        true
    }

    /// The consumer works again (partitions assigned, a record received): what was refused is no longer.
    pub fn clear(&self) {
        if let Some(was) = self.said.clear() {
            self.health.kafka_refused(None);
            tracing::info!(was_refused = was, "Kafka accepts this client again");
        }
    }
}

/// librdkafka's log, as rdkafka forwards it by default, but for its `FAIL` and `OIDC` lines: a failed connection
/// or token retrieval is also reported to the error callback, where a refusal is said once ([`AccessWatch`]) and
/// any other error is logged, so the log line is only kept at debug.
pub fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel as L;
    if fac == "FAIL" || fac == "OIDC" {
        tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}");
        return;
    }
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
        L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
        L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
    }
}

/// The context of the daemon's producers: their refusals go to the [`AccessWatch`], other errors to the log.
pub struct ProducerContext {
    pub access: Arc<AccessWatch>,
    pub client: &'static str,
}

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self.access.report(self.client, &error, reason) {
            tracing::error!(client = self.client, error = %error, reason, "librdkafka error");
        }
    }
}

impl rdkafka::producer::ProducerContext for ProducerContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// librdkafka says only "certificate verify failed" both for a certificate from an unknown CA and for one that
/// is not for the host name connected to. The daemon asks the first bootstrap broker itself, with the same CA
/// file, to say which.
struct TlsProbe {
    host: String,
    port: u16,
    ca_file: String,
}

impl TlsProbe {
    fn from_config(config: &crate::config::Config) -> Option<TlsProbe> {
        let protocol = config.kafka_properties.get("security.protocol")?;
        if !protocol.eq_ignore_ascii_case("ssl") && !protocol.eq_ignore_ascii_case("sasl_ssl") {
            return None;
        }
        let ca_file = config.kafka_properties.get("ssl.ca.location")?.clone();
        let first = config.kafka_bootstrap_servers.split(',').next()?.trim();
        let first = first.rsplit_once("://").map_or(first, |(_, rest)| rest);
        let (host, port) = first.rsplit_once(':')?;
        Some(TlsProbe {
            host: host.trim_matches(['[', ']']).to_string(),
            port: port.parse().ok()?,
            ca_file,
        })
    }

    /// Why the broker's certificate fails verification with the CA file, as rustls says it (e.g. "certificate
    /// not valid for name ..." or "UnknownIssuer"); `None` when it could not tell.
    fn diagnose(&self) -> Option<String> {
        match tls_handshake(&self.host, self.port, &self.ca_file) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "{}:{} with {}: {e}",
                self.host, self.port, self.ca_file
            )),
        }
    }
}

/// A TLS handshake with `host:port`, verifying its certificate against the CAs in `ca_file` and the name `host`.
fn tls_handshake(host: &str, port: u16, ca_file: &str) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("reading the CA file: {e}"))?
    {
        let cert = cert.map_err(|e| format!("reading the CA file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a CA in the file: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(tls), name).map_err(|e| e.to_string())?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_by_their_codes() {
        use RDKafkaErrorCode as C;
        let global = |c| KafkaError::Global(c);
        assert_eq!(
            Refusal::of(&global(C::Authentication)),
            Some(Refusal::Credentials)
        );
        assert_eq!(Refusal::of(&global(C::SSL)), Some(Refusal::Certificate));
        assert_eq!(
            Refusal::of(&KafkaError::MessageConsumption(C::TopicAuthorizationFailed)),
            Some(Refusal::Topic)
        );
        assert_eq!(
            Refusal::of(&global(C::GroupAuthorizationFailed)),
            Some(Refusal::Group)
        );
        assert_eq!(Refusal::of(&global(C::AllBrokersDown)), None);
        assert_eq!(Refusal::of(&global(C::UnknownTopicOrPartition)), None);
    }

    #[test]
    fn readiness_names_the_refusal_until_cleared() {
        let health = Arc::new(Health::new());
        let config = crate::config::Config::from_vars(
            [
                ("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
                ("MONGODB_URI", "mongodb://localhost"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let watch = AccessWatch::new(health.clone(), &config);
        assert!(!watch.report(
            "consumer",
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "x"
        ));
        assert_eq!(health.readiness().kafka_refused, None);
        assert!(watch.report(
            "consumer",
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "x"
        ));
        assert_eq!(
            health.readiness().kafka_refused.as_deref(),
            Some("credentials")
        );
        watch.clear();
        assert_eq!(health.readiness().kafka_refused, None);
    }
}
