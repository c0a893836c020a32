//! Keeps secrets out of every output: log lines (the daemon's, the drivers', librdkafka's), error messages, dead
//! letters. Owns what counts as a secret and the two ways of hiding one: redacted forms for what the daemon
//! prints itself (`redact_uri`, `redact_property`), and a last line of defence that replaces every known secret
//! value in text on its way out (`scrub`, installed once at start-up from the environment). Never decides what is
//! logged.

use std::borrow::Cow;
use std::sync::OnceLock;

/// What stands in for a hidden value.
pub const HIDDEN: &str = "***";

/// Parts of librdkafka property names whose values are secrets (passwords, keys, tokens, JAAS and OAuth
/// settings). Matching by part keeps properties added to librdkafka later covered.
const SECRET_PROPERTY_PARTS: &[&str] = &[
    "password",
    "secret",
    "jaas",
    "key",
    "token",
    "oauthbearer.config",
    "credential",
    "pem",
    "keytab",
];

/// Connection-string options whose values are shown as they are; every other option's value is hidden
/// (`authMechanismProperties` can hold an AWS session token, `tlsCertificateKeyFilePassword` a password, and an
/// option added later may hold anything).
const PLAIN_URI_OPTIONS: &[&str] = &[
    "authsource",
    "authmechanism",
    "replicaset",
    "tls",
    "ssl",
    "tlscafile",
    "directconnection",
    "retrywrites",
    "retryreads",
    "w",
    "journal",
    "appname",
    "readpreference",
    "maxpoolsize",
    "minpoolsize",
    "connecttimeoutms",
    "sockettimeoutms",
    "serverselectiontimeoutms",
    "heartbeatfrequencyms",
    "loadbalanced",
    "compressors",
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_PROPERTY_PARTS.iter().any(|p| n.contains(p))
}

/// A librdkafka property's value as it may be shown.
pub fn redact_property<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret_property(name) {
        HIDDEN
    } else {
        value
    }
}

/// The parts of a connection string: scheme, user info, hosts and path, query.
struct UriParts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    rest: &'a str,
    query: Option<&'a str>,
}

/// Splits a `mongodb://` URI without trusting it to be well formed: the user info runs to the last `@` before
/// the query (a password may hold `/`, `@` or `:` unescaped), the query starts at the first `?` after it.
fn split_uri(uri: &str) -> Option<UriParts<'_>> {
    let scheme_end = uri.find("://")? + 3;
    let (scheme, after) = uri.split_at(scheme_end);
    // The user info ends at the last `@` of the string: a `?` inside a password must not cut it short.
    let (userinfo, hosts_and_query) = match after.rfind('@') {
        Some(at) => (Some(&after[..at]), &after[at + 1..]),
        None => (None, after),
    };
    let (rest, query) = match hosts_and_query.find('?') {
        Some(q) => (&hosts_and_query[..q], Some(&hosts_and_query[q + 1..])),
        None => (hosts_and_query, None),
    };
    Some(UriParts {
        scheme,
        userinfo,
        rest,
        query,
    })
}

/// `mongodb://user:pass@host/db?authMechanismProperties=AWS_SESSION_TOKEN:x` ->
/// `mongodb://user:***@host/db?authMechanismProperties=***`. Hosts, database and plain options stay readable.
pub fn redact_uri(uri: &str) -> String {
    let Some(p) = split_uri(uri) else {
        return HIDDEN.to_string();
    };
    let mut out = String::from(p.scheme);
    if let Some(userinfo) = p.userinfo {
        let user = userinfo.split(':').next().unwrap_or("");
        out.push_str(user);
        if userinfo.contains(':') {
            out.push(':');
            out.push_str(HIDDEN);
        }
        out.push('@');
    }
    out.push_str(p.rest);
    if let Some(query) = p.query {
        out.push('?');
        let options: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if PLAIN_URI_OPTIONS.contains(&k.to_ascii_lowercase().as_str()) => {
                    format!("{k}={v}")
                }
                Some((k, _)) => format!("{k}={HIDDEN}"),
                None => kv.to_string(),
            })
            .collect();
        out.push_str(&options.join("&"));
    }
    out
}

/// The secret values of a connection string: the password and every hidden option's value, as written and
/// percent-decoded, and the pieces of an `authMechanismProperties` list.
pub fn uri_secrets(uri: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Some(p) = split_uri(uri) else {
        out.push(uri.to_string());
        return out;
    };
    if let Some((_, password)) = p.userinfo.and_then(|u| u.split_once(':')) {
        out.push(password.to_string());
    }
    for kv in p.query.into_iter().flat_map(|q| q.split('&')) {
        if let Some((k, v)) = kv.split_once('=')
            && !PLAIN_URI_OPTIONS.contains(&k.to_ascii_lowercase().as_str())
        {
            out.push(v.to_string());
            // `AWS_SESSION_TOKEN:abc,SERVICE_NAME:x`: a driver message may quote one piece alone.
            for item in v.split([',', '%']) {
                if let Some((_, piece)) = item.split_once(':') {
                    out.push(piece.to_string());
                }
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|s| percent_decode(s)).collect();
    out.extend(decoded);
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Shorter values are not scrubbed from text: replacing every `app` or `ok` would garble the output and tell
/// little; the redacted forms still hide them where the daemon prints them.
const MIN_SCRUBBED_LEN: usize = 4;

/// The secret values in an environment: `MONGODB_URI`'s, and every secret `KAFKA_PROPERTY_*`'s.
pub fn env_secrets<I: IntoIterator<Item = (String, String)>>(vars: I) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in vars {
        if k == crate::names::MONGODB_URI || k == crate::names::OUTBOX_DATABASE_URL {
            out.extend(uri_secrets(&v));
        } else if let Some(rest) = k.strip_prefix(crate::names::KAFKA_PROPERTY_PREFIX)
            && is_secret_property(&rest.replace('_', "."))
        {
            out.push(v.clone());
            out.extend(assigned_secrets(&v));
        }
    }
    out.retain(|s| s.len() >= MIN_SCRUBBED_LEN);
    // Longest first: a secret that contains another is replaced whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// The values of secret-named assignments in a JAAS-style line: `... username="u" password="x";` gives `x`, which a
/// client library may quote alone.
fn assigned_secrets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .rsplit(|c: char| c.is_whitespace() || c == ';')
            .next()
            .unwrap_or("");
        let after = rest[eq + 1..].trim_start();
        let (value, next) = match after.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let body = &after[1..];
                let end = body.find(q).unwrap_or(body.len());
                (&body[..end], &body[(end + 1).min(body.len())..])
            }
            _ => {
                let end = after
                    .find(|c: char| c.is_whitespace() || c == ';')
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        if is_secret_property(key) {
            out.push(value.to_string());
        }
        rest = next;
    }
    out
}

static SECRETS: OnceLock<Vec<String>> = OnceLock::new();

/// Makes `scrub` hide these values from now on (the first call wins).
pub fn install(secrets: Vec<String>) {
    let _ = SECRETS.set(secrets);
}

/// Installs the secrets of the process environment.
pub fn install_from_env() {
    install(env_secrets(std::env::vars()));
}

/// `text` with every installed secret value replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let Some(secrets) = SECRETS.get() else {
        return Cow::Borrowed(text);
    };
    let mut out = Cow::Borrowed(text);
    for s in secrets {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), HIDDEN));
        }
    }
    out
}

/// A writer that scrubs what passes through it: every log line leaves the process through one.
pub struct Scrubbing<W>(pub W);

impl<W: std::io::Write> std::io::Write for Scrubbing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => match scrub(text) {
                Cow::Borrowed(_) => self.0.write_all(buf),
                Cow::Owned(clean) => self.0.write_all(clean.as_bytes()),
            },
            Err(_) => self.0.write_all(buf),
        }?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_hidden_options_never_show_in_a_redacted_uri() {
        for (uri, shown) in [
            (
                "mongodb://app:s3cr/et@mongo:27017/db?authSource=admin",
                "mongodb://app:***@mongo:27017/db?authSource=admin",
            ),
            (
                "mongodb://app:p@ss?w/rd@h1,h2/?replicaSet=rs&authMechanismProperties=AWS_SESSION_TOKEN:tok3n",
                "mongodb://app:***@h1,h2/?replicaSet=rs&authMechanismProperties=***",
            ),
            ("mongodb://localhost:27017", "mongodb://localhost:27017"),
            (
                "mongodb+srv://u@cluster/?tlsCertificateKeyFilePassword=pw1234",
                "mongodb+srv://u@cluster/?tlsCertificateKeyFilePassword=***",
            ),
        ] {
            assert_eq!(redact_uri(uri), shown);
        }
        assert_eq!(redact_uri("no scheme s3cret"), HIDDEN);
    }

    #[test]
    fn the_secrets_of_an_environment_cover_every_form() {
        let secrets = env_secrets([
            (
                "MONGODB_URI".to_string(),
                "mongodb://app:pa%2Fss%40word@h/?authMechanismProperties=AWS_SESSION_TOKEN:sessiontok".into(),
            ),
            ("KAFKA_PROPERTY_SASL_PASSWORD".into(), "kafkapass".into()),
            (
                "KAFKA_PROPERTY_SASL_JAAS_CONFIG".into(),
                "org.Plain required username=\"u\" password=\"jaaspass\";".into(),
            ),
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL".into(), "SASL_SSL".into()),
            ("LOG_LEVEL".into(), "debug".into()),
        ]);
        assert!(
            !secrets
                .iter()
                .any(|x| x == "password" || x == "required" || x == "username"),
            "words of the JAAS line are no secrets: {secrets:?}"
        );
        for s in [
            "pa%2Fss%40word",
            "pa/ss@word",
            "sessiontok",
            "kafkapass",
            "jaaspass",
        ] {
            assert!(secrets.iter().any(|x| x == s), "{s} not in {secrets:?}");
        }
        assert!(!secrets.iter().any(|x| x == "SASL_SSL" || x == "debug"));
    }

    #[test]
    fn secret_librdkafka_properties_are_recognised() {
        for p in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.jaas.config",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_property(p), "{p}");
            assert_eq!(redact_property(p, "x"), HIDDEN);
        }
        for p in ["security.protocol", "sasl.mechanisms", "client.id"] {
            assert!(!is_secret_property(p), "{p}");
        }
    }
}
