//! The PostgreSQL connection string as libpq reads it: the TLS parameters (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`) that tokio-postgres does not know (or knows only in part)
//! are taken out ([`split_libpq_tls`]) and typed ([`DbTls`]); the rest goes to tokio-postgres.
//! Also what a connection config says about where it goes (loopback or not, `host:port/db`).
//!
//! The string may hold a password: nothing here puts it in a message. Errors name the parameter
//! and start with `database.url:`, the key the string comes from ([`crate::config`] calls this
//! while validating, [`crate::config::DatabaseSettings::connection`] when connecting). It lives
//! in `config`, not in `store`, so that the store depends on the configuration and never the
//! other way round.
//!
//! A password that is not percent-encoded (`postgres://u:S3cr@t@host/db`) is refused before
//! anything parses it ([`userinfo_refusal`]): tokio-postgres and libpq end the credentials at the
//! first `@`, so the rest of the password would become the host, be sent to DNS and be printed
//! in every message naming the host. [`redact_url`] takes the userinfo out of any URL that goes
//! into a message, whatever its shape.

use std::path::PathBuf;

/// libpq's `sslmode`, weakest first: `disable` never uses TLS; `prefer` (the default) tries TLS
/// and falls back to plain, verifying nothing; `require` encrypts without verifying the
/// certificate (unless `sslrootcert` is given: then like `verify-ca`); `verify-ca` checks the
/// chain against the roots; `verify-full` checks the chain and that the certificate names the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// libpq's name of a mode; `None` for a name it does not have.
    fn parse(s: &str) -> Option<SslMode> {
        [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// Where the CA certificates that verify the server come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`, or none given: the OS trust store, else the Mozilla root set built
    /// into the binary ([`crate::trust::system_roots`], as for Keycloak).
    System,
}

/// The TLS parameters of `database.url` that libpq knows and tokio-postgres does not (or knows
/// only in part): `sslmode` (all five values), `sslrootcert`, `sslcert`, `sslkey`. They are
/// taken out of the URL before tokio-postgres parses the rest. Paths are not secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTls {
    pub mode: SslMode,
    /// Whether `sslmode` was given (else it is libpq's default).
    pub mode_given: bool,
    pub root_cert: RootCert,
    /// Whether `sslrootcert` was given (libpq: `require` with a root certificate verifies the chain).
    pub root_cert_given: bool,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

const LIBPQ_TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The TLS parameters found in a connection string, in the order given (the last one of a key
/// wins, as in libpq).
type TlsParams = Vec<(String, String)>;

/// Splits the libpq TLS parameters off a connection string (URL or `key=value` form). Returns
/// the rest for tokio-postgres and the TLS parameters, with libpq's defaults and implications
/// applied. Errors name the parameter, never the string (it may hold a password). A string that
/// does not tokenize is returned as it is: tokio-postgres then reports what is wrong with it.
pub fn split_libpq_tls(conn: &str) -> Result<(String, DbTls), String> {
    let (rest, found) = match ["postgres://", "postgresql://"]
        .iter()
        .find(|p| conn.starts_with(*p))
    {
        Some(prefix) => take_from_url(conn, prefix.len())?,
        None => take_from_key_value(conn),
    };
    Ok((rest, DbTls::from_params(&found)?))
}

/// The URL form: the TLS parameters of the query string, and the URL without them.
fn take_from_url(conn: &str, prefix_len: usize) -> Result<(String, TlsParams), String> {
    // As tokio-postgres (and libpq) read it: credentials end at the first '@', the parameters
    // start at the first '?' after them.
    let body = &conn[prefix_len..];
    let after_creds = body.find('@').map(|i| i + 1).unwrap_or(0);
    let Some(q) = body[after_creds..].find('?') else {
        return Ok((conn.to_string(), Vec::new()));
    };
    let q = prefix_len + after_creds + q;
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for pair in conn[q + 1..].split('&') {
        match tls_param(pair)? {
            Some(param) => found.push(param),
            None => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        conn[..q].to_string()
    } else {
        format!("{}?{}", &conn[..q], kept.join("&"))
    };
    Ok((rest, found))
}

/// One `key=value` of a URL's query string, decoded, when it is a TLS parameter.
fn tls_param(pair: &str) -> Result<Option<(String, String)>, String> {
    let Some((key, value)) = pair.split_once('=') else {
        return Ok(None);
    };
    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
    if !LIBPQ_TLS_KEYS.contains(&key.as_ref()) {
        return Ok(None);
    }
    let value = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| format!("database.url: {key} is not UTF-8"))?;
    Ok(Some((key.into_owned(), value.into_owned())))
}

/// The `key=value` form: the TLS parameters, and the string without them (as it is when it
/// does not tokenize).
fn take_from_key_value(conn: &str) -> (String, TlsParams) {
    let Some(pairs) = split_key_value(conn) else {
        return (conn.to_string(), Vec::new());
    };
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for (key, raw, value) in pairs {
        if LIBPQ_TLS_KEYS.contains(&key) {
            found.push((key.to_string(), value));
        } else {
            kept.push(raw);
        }
    }
    (kept.join(" "), found)
}

impl DbTls {
    /// The TLS settings of the parameters found, with libpq's defaults and implications.
    fn from_params(found: &TlsParams) -> Result<DbTls, String> {
        let get = |k: &str| {
            found
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let root_cert = root_cert(get("sslrootcert"))?;
        let mode = ssl_mode(get("sslmode"))?;
        let effective = effective_mode(mode, root_cert.as_ref())?;
        let (client_cert, client_key) = client_identity(get("sslcert"), get("sslkey"))?;
        Ok(DbTls {
            mode: effective,
            mode_given: mode.is_some(),
            root_cert_given: root_cert.is_some(),
            root_cert: root_cert.unwrap_or(RootCert::System),
            client_cert,
            client_key,
        })
    }
}

/// `sslrootcert`: `system`, or the path of a PEM file.
fn root_cert(value: Option<&str>) -> Result<Option<RootCert>, String> {
    match value {
        None => Ok(None),
        Some("system") => Ok(Some(RootCert::System)),
        Some("") => Err(
            "database.url: sslrootcert is empty: give the path of a PEM file of CA certificates"
                .into(),
        ),
        Some(p) => Ok(Some(RootCert::File(PathBuf::from(p)))),
    }
}

/// `sslmode`, as given.
fn ssl_mode(value: Option<&str>) -> Result<Option<SslMode>, String> {
    match value {
        None => Ok(None),
        Some(v) => SslMode::parse(v).map(Some).ok_or_else(|| {
            format!(
                "database.url: sslmode={v} is not supported: use disable, prefer, require, verify-ca or verify-full"
            )
        }),
    }
}

/// The mode in force: libpq's default, and what `sslrootcert` implies.
fn effective_mode(mode: Option<SslMode>, root_cert: Option<&RootCert>) -> Result<SslMode, String> {
    match (mode, root_cert) {
        // libpq 16: sslrootcert=system makes verify-full the default and refuses weaker modes.
        (None, Some(RootCert::System)) => Ok(SslMode::VerifyFull),
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => Err(format!(
            "database.url: sslmode={} cannot be combined with sslrootcert=system: use sslmode=verify-full",
            m.as_str()
        )),
        // libpq: require with a root certificate file verifies the chain, like verify-ca.
        (Some(SslMode::Require), Some(RootCert::File(_))) => Ok(SslMode::VerifyCa),
        (Some(m), _) => Ok(m),
        (None, _) => Ok(SslMode::Prefer),
    }
}

/// `sslcert` and `sslkey`: both or neither (an empty value counts as not given).
fn client_identity(
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<(Option<PathBuf>, Option<PathBuf>), String> {
    let cert = cert.filter(|s| !s.is_empty()).map(PathBuf::from);
    let key = key.filter(|s| !s.is_empty()).map(PathBuf::from);
    match (&cert, &key) {
        (Some(_), None) => Err("database.url: sslcert is given without sslkey: give both (the client certificate and its private key, PEM)".into()),
        (None, Some(_)) => Err("database.url: sslkey is given without sslcert: give both (the client certificate and its private key, PEM)".into()),
        _ => Ok((cert, key)),
    }
}

/// Tokenizes a `key=value` connection string as tokio-postgres does (values unquoted up to
/// whitespace, or single-quoted; a backslash escapes the next character). Returns each
/// parameter's key, its raw text and its value; `None` when it does not tokenize.
fn split_key_value(s: &str) -> Option<Vec<(&str, &str, String)>> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Some(out);
        };
        let mut key_end = s.len();
        while let Some(&(i, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                key_end = i;
                break;
            }
            it.next();
        }
        let key = &s[start..key_end];
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        it.next_if(|(_, c)| *c == '=')?;
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut end = s.len();
        let mut closed = !quoted;
        while let Some((i, c)) = it.next() {
            match c {
                '\'' if quoted => {
                    end = i + 1;
                    closed = true;
                    break;
                }
                c if c.is_whitespace() && !quoted => {
                    end = i;
                    break;
                }
                '\\' => value.push(it.next()?.1),
                c => value.push(c),
            }
        }
        if !closed || key.is_empty() {
            return None;
        }
        out.push((key, &s[start..end], value));
    }
}

/// Whether a character may stand unencoded in a URL's userinfo (RFC 3986: unreserved,
/// sub-delims and `:`; `%` only as the start of an escape, checked apart).
fn userinfo_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:".contains(c)
}

/// The userinfo of a `scheme://userinfo@host...` URL: everything between `://` and the last `@`.
/// The last, not the first: whatever a reader takes for the host, nothing of a password with an
/// `@` in it is left outside this span. `None` without a scheme or an `@`.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let at = url[start..].rfind('@')? + start;
    Some((start, at))
}

/// Why the user or password written in a URL cannot be read as written: a character that must
/// be percent-encoded (a second `@`, `/`, `?`, `#`, a `%` that starts no escape, a space,
/// anything outside ASCII). The reason never quotes the URL or the character. `None` when the
/// userinfo is well-formed, or there is none.
pub(crate) fn userinfo_refusal(url: &str) -> Option<&'static str> {
    let (start, end) = userinfo_span(url)?;
    let info = &url.as_bytes()[start..end];
    let mut i = 0;
    while i < info.len() {
        let c = info[i];
        if c == b'%' {
            let escape = info.get(i + 1..i + 3);
            if !escape.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return Some("a `%` that does not start a percent-encoded escape");
            }
            i += 3;
            continue;
        }
        if !c.is_ascii() || !userinfo_char_ok(c as char) {
            return Some("a character that must be percent-encoded (such as a second `@`, `/`, `?`, `#`, `[`, a space or a non-ASCII character)");
        }
        i += 1;
    }
    None
}

/// The refusal of a `database.url` whose user or password is not percent-encoded: the fix,
/// never the URL.
pub(crate) fn database_userinfo_problem(url: &str) -> Option<String> {
    userinfo_refusal(url).map(|why| {
        format!(
            "database.url (SEEDKEEPER_DATABASE__URL): the user or password in it holds {why}, so \
             where the password ends and the host begins cannot be told: percent-encode the \
             password in the URL (`@` as %40, `/` as %2F, `?` as %3F, `#` as %23, `%` as %25, \
             `:` may stay), or leave the password out of the URL \
             (postgres://user@host:5432/db) and give it as database.password \
             (SEEDKEEPER_DATABASE__PASSWORD_FILE=/path/to/file, SEEDKEEPER_DATABASE__PASSWORD, \
             or the systemd credential database.password), read as it is with no encoding; \
             the URL is not shown because it holds a password"
        )
    })
}

/// A URL (or libpq `key=value` string) fit for a message: its userinfo (`user:password@`) and
/// any `password=` parameter replaced by `[REDACTED]`, whatever the shape of the rest.
pub(crate) fn redact_url(s: &str) -> String {
    let mut out = match userinfo_span(s) {
        Some((start, end)) => format!("{}[REDACTED]{}", &s[..start], &s[end..]),
        None => s.to_string(),
    };
    // `password=` in a query string or a key=value string: up to the next separator.
    let mut from = 0;
    while let Some(i) = out[from..].find("password=").map(|i| i + from) {
        let value_start = i + "password=".len();
        let value_end = out[value_start..]
            .find(['&', ' ', '#'])
            .map(|e| e + value_start)
            .unwrap_or(out.len());
        out.replace_range(value_start..value_end, "[REDACTED]");
        from = value_start + "[REDACTED]".len();
    }
    out
}

/// tokio-postgres' reason for refusing a connection string, when it names only an option (its
/// other messages can quote a character of the string).
pub(crate) fn url_refusal_reason(e: &tokio_postgres::Error) -> Option<String> {
    let inner = std::error::Error::source(e)?.to_string();
    (inner.starts_with("unknown option") || inner.starts_with("invalid value for option"))
        .then_some(inner)
}

/// `host:port/db` of a connection config, for messages: never the user or the password.
pub fn describe_target(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            // A host with an `@` in it is the tail of a password that was not percent-encoded
            // (validation refuses those; this holds for any config built another way).
            tokio_postgres::config::Host::Tcp(s) if s.contains('@') => "[REDACTED]".to_string(),
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_string());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// Whether a host is this machine: a Unix socket directory, `localhost` or a loopback address.
pub fn is_loopback_host(host: &tokio_postgres::config::Host) -> bool {
    match host {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(h) => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.to_ascii_lowercase().ends_with(".localhost")
                || h.parse::<std::net::IpAddr>()
                    .map(|ip| ip.is_loopback())
                    .unwrap_or(false)
        }
    }
}

/// The hosts of a connection config that are not this machine (`hostaddr`, when given, is
/// where the connection goes).
pub fn remote_hosts(cfg: &tokio_postgres::Config) -> Vec<String> {
    let mut remote: Vec<String> = cfg
        .get_hostaddrs()
        .iter()
        .filter(|ip| !ip.is_loopback())
        .map(|ip| ip.to_string())
        .collect();
    if cfg.get_hostaddrs().is_empty() {
        remote.extend(
            cfg.get_hosts()
                .iter()
                .filter(|h| !is_loopback_host(h))
                .map(|h| match h {
                    // As in `describe_target`: never the tail of a password.
                    tokio_postgres::config::Host::Tcp(s) if s.contains('@') => {
                        "[REDACTED]".to_string()
                    }
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                }),
        );
    }
    remote
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_password_with_an_at_sign_is_refused_and_an_encoded_one_is_not() {
        assert!(userinfo_refusal("postgres://u:S3cr@tPart2@host/db").is_some());
        assert!(userinfo_refusal("postgres://u:a/b@host/db").is_some());
        assert!(userinfo_refusal("postgres://u:50%off@host/db").is_some());
        assert!(userinfo_refusal("postgres://u:S3cr%40tPart2@host/db").is_none());
        assert!(userinfo_refusal("postgres://u:pa:ss@host/db").is_none());
        assert!(userinfo_refusal("postgres://host/db").is_none());
        assert!(userinfo_refusal("host=x password=a@b").is_none());
    }

    #[test]
    fn redaction_takes_out_the_userinfo_whatever_its_shape() {
        assert_eq!(
            redact_url("postgres://u:S3cr@tPart2@host/db"),
            "postgres://[REDACTED]@host/db"
        );
        assert_eq!(
            redact_url("https://u:p@kc.example/"),
            "https://[REDACTED]@kc.example/"
        );
        assert_eq!(redact_url("https://kc.example/"), "https://kc.example/");
        assert_eq!(
            redact_url("host=h password=s3cret user=u"),
            "host=h password=[REDACTED] user=u"
        );
        assert_eq!(
            redact_url("postgres://h/db?password=s3&sslmode=require"),
            "postgres://h/db?password=[REDACTED]&sslmode=require"
        );
    }

    #[test]
    fn the_target_of_a_misread_password_names_no_part_of_it() {
        let cfg: tokio_postgres::Config = "postgres://u:S3cr@tPart2@host/db".parse().unwrap();
        let t = describe_target(&cfg);
        assert!(!t.contains("tPart2"), "{t}");
    }
}
