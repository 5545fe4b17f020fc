//! `validate()`: every problem of the settings at once, in the order of the configuration table,
//! each naming the key, its environment variable and the fix. Reads the settings only: files
//! named by keys are checked to exist, nothing is connected to.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::database_url::{
    database_userinfo_problem, is_loopback_host, redact_url, remote_hosts, split_libpq_tls,
    url_refusal_reason, userinfo_refusal, DbTls, RootCert, SslMode,
};
use super::{duration_str, ConfigOrigin, Environment, IdentitySource, Settings};

/// Every problem of the settings at once, in the order of the configuration table.
pub(super) fn validate(s: &Settings, need_database: bool, problems: &mut Vec<String>) {
    validate_database(s, need_database, problems);
    validate_identity(s, problems);
    validate_keycloak(s, problems);
    validate_daemon(s, problems);
    validate_limits(s, problems);
    validate_production(s, problems);
}

/// `database.*`: the URL (its TLS parameters included), the connect timeout and the batch size.
fn validate_database(s: &Settings, need_database: bool, problems: &mut Vec<String>) {
    match &s.database.url {
        None if !need_database => {}
        None => problems.push(
            "database.url is not set: set SEEDKEEPER_DATABASE__URL (postgres://user@host:5432/db), \
             SEEDKEEPER_DATABASE__URL_FILE, or the systemd credential database.url"
                .to_string(),
        ),
        // Before anything parses it: a parser would take the tail of such a password for the host.
        Some(url) if database_userinfo_problem(url.expose_secret()).is_some() => {
            problems.extend(database_userinfo_problem(url.expose_secret()));
        }
        Some(url) => match split_libpq_tls(url.expose_secret()) {
            Err(why) => problems.push(format!("{why} (SEEDKEEPER_DATABASE__URL)")),
            Ok((rest, tls)) => match tokio_postgres::Config::from_str(&rest) {
                Err(e) => problems.push(format!(
                    "database.url is not a valid PostgreSQL URL{} (expected postgres://user@host:5432/db) \
                     (SEEDKEEPER_DATABASE__URL); its value is not shown because it may hold a password",
                    url_refusal_reason(&e).map(|r| format!(" ({r})")).unwrap_or_default()
                )),
                Ok(cfg) => validate_database_tls(s, &cfg, &tls, problems),
            },
        },
    }
    if s.database.connect_timeout.is_zero() {
        problems.push(
            "database.connect_timeout must be above 0 (SEEDKEEPER_DATABASE__CONNECT_TIMEOUT)"
                .into(),
        );
    }
    if !(1..=100_000).contains(&s.database.batch_size) {
        problems.push(
            "database.batch_size must be within 1..=100000 (SEEDKEEPER_DATABASE__BATCH_SIZE)"
                .into(),
        );
    }
}

/// `seed.path` and `identity.*`.
fn validate_identity(s: &Settings, problems: &mut Vec<String>) {
    if let Some(p) = &s.seed.path {
        if !p.is_file() {
            problems.push(format!(
                "seed.path {} is not a readable file: fix SEEDKEEPER_SEED__PATH, or unset it to use the embedded seed",
                p.display()
            ));
        }
    }
    if s.identity.admin_roles.is_empty()
        || s.identity.admin_roles.iter().any(|r| r.trim().is_empty())
    {
        problems.push(
            "identity.admin_roles must list at least one non-empty realm role (SEEDKEEPER_IDENTITY__ADMIN_ROLES)".into(),
        );
    }
    if let Some(p) = &s.identity.realm_file {
        // A realm export is a file or a `kc.sh export --dir` folder; a FIFO or a device would
        // block or never end.
        if s.identity.source == IdentitySource::RealmFile {
            if let Err(why) = super::files::check_file_or_dir(p) {
                problems.push(format!(
                    "identity.realm_file {} {why}: fix SEEDKEEPER_IDENTITY__REALM_FILE",
                    p.display()
                ));
            }
        }
    }
}

/// `keycloak.*`: no credentials in its URLs, what the keycloak source needs, and the listing's
/// bounds.
fn validate_keycloak(s: &Settings, problems: &mut Vec<String>) {
    // Whatever the source: a setting that is not used is still shown by `config` and `Debug`.
    validate_keycloak_urls_hold_no_credentials(s, problems);
    if s.identity.source == IdentitySource::Keycloak {
        validate_keycloak_source(s, problems);
    }
    validate_keycloak_listing_bounds(s, problems);
}

/// `keycloak.base_url` and `keycloak.issuer` carry no `user:password@`.
fn validate_keycloak_urls_hold_no_credentials(s: &Settings, problems: &mut Vec<String>) {
    for (key, env, url) in [
        (
            "keycloak.base_url",
            "SEEDKEEPER_KEYCLOAK__BASE_URL",
            &s.keycloak.base_url,
        ),
        (
            "keycloak.issuer",
            "SEEDKEEPER_KEYCLOAK__ISSUER",
            &s.keycloak.issuer,
        ),
    ] {
        if let Some(u) = url.as_deref().filter(|u| has_userinfo(u)) {
            problems.push(userinfo_problem(key, env, u));
        }
    }
}

/// What `identity.source = "keycloak"` needs: http(s) URLs, a realm, a client and its secret,
/// a readable `ca_file` when one is named. A URL with credentials is reported once, by
/// [`validate_keycloak_urls_hold_no_credentials`].
fn validate_keycloak_source(s: &Settings, problems: &mut Vec<String>) {
    match &s.keycloak.base_url {
        None => problems.push(
            "keycloak.base_url is not set but identity.source = \"keycloak\": set SEEDKEEPER_KEYCLOAK__BASE_URL (e.g. http://127.0.0.1:8080)".into(),
        ),
        Some(u) if has_userinfo(u) => {}
        Some(u) => match reqwest::Url::parse(u) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => problems.push(format!(
                "keycloak.base_url {:?} is not an http(s) URL: fix SEEDKEEPER_KEYCLOAK__BASE_URL (e.g. https://keycloak.example.com)",
                redact_url(u)
            )),
        },
    }
    if let Some(u) = &s.keycloak.issuer {
        match reqwest::Url::parse(u) {
            _ if has_userinfo(u) => {}
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => problems.push(format!(
                "keycloak.issuer {:?} is not an http(s) URL: fix SEEDKEEPER_KEYCLOAK__ISSUER (the issuer Keycloak announces, e.g. https://auth.example.com/realms/{})",
                redact_url(u),
                s.keycloak.realm
            )),
        }
    }
    if s.keycloak.realm.trim().is_empty() {
        problems.push("keycloak.realm is empty: set SEEDKEEPER_KEYCLOAK__REALM".into());
    }
    if s.keycloak.client_id.trim().is_empty() {
        problems.push("keycloak.client_id is empty: set SEEDKEEPER_KEYCLOAK__CLIENT_ID".into());
    }
    if s.keycloak.client_secret.is_none() {
        problems.push(
            "keycloak.client_secret is not set but identity.source = \"keycloak\": set SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE (or SEEDKEEPER_KEYCLOAK__CLIENT_SECRET, or the systemd credential keycloak.client_secret)".into(),
        );
    }
    if let Some(ca) = &s.keycloak.ca_file {
        if !ca.is_file() {
            problems.push(format!(
                "keycloak.ca_file {} is not a readable file: fix SEEDKEEPER_KEYCLOAK__CA_FILE",
                ca.display()
            ));
        }
    }
}

/// `keycloak.page_size`, `keycloak.concurrency` and `keycloak.request_timeout` within bounds.
fn validate_keycloak_listing_bounds(s: &Settings, problems: &mut Vec<String>) {
    if !(1..=5000).contains(&s.keycloak.page_size) {
        problems.push(
            "keycloak.page_size must be within 1..=5000 (SEEDKEEPER_KEYCLOAK__PAGE_SIZE)".into(),
        );
    }
    if !(1..=32).contains(&s.keycloak.concurrency) {
        problems.push(
            "keycloak.concurrency must be within 1..=32 (SEEDKEEPER_KEYCLOAK__CONCURRENCY)".into(),
        );
    }
    if s.keycloak.request_timeout.is_zero() {
        problems.push(
            "keycloak.request_timeout must be above 0 (SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT)"
                .into(),
        );
    }
}

/// `progress_interval` and the daemon's `events.poll_interval`, `schedule.cron`,
/// `schedule.retry_initial` and `http.*`.
fn validate_daemon(s: &Settings, problems: &mut Vec<String>) {
    if s.progress_interval < Duration::from_millis(100) {
        problems.push(format!(
            "progress_interval {} is below 100ms (SEEDKEEPER_PROGRESS_INTERVAL): a progress line would be logged without pause",
            duration_str::format(&s.progress_interval)
        ));
    }
    if s.events.poll_interval < Duration::from_millis(100) {
        problems.push(format!(
            "events.poll_interval {} is below 100ms (SEEDKEEPER_EVENTS__POLL_INTERVAL): Keycloak would be polled without pause",
            duration_str::format(&s.events.poll_interval)
        ));
    }
    if let Err(why) = validate_cron(&s.schedule.cron) {
        problems.push(format!(
            "schedule.cron {:?} is not a valid six-field cron expression (seconds first, e.g. \"0 */5 * * * *\") (SEEDKEEPER_SCHEDULE__CRON): {why}",
            s.schedule.cron
        ));
    }
    if s.schedule.retry_initial < Duration::from_millis(100) {
        problems.push(format!(
            "schedule.retry_initial {} is below 100ms (SEEDKEEPER_SCHEDULE__RETRY_INITIAL): a failed run would be retried without pause",
            duration_str::format(&s.schedule.retry_initial)
        ));
    }
    if SocketAddr::from_str(&s.http.listen).is_err() {
        problems.push(format!(
            "http.listen {:?} is not an address:port (e.g. 127.0.0.1:8787) (SEEDKEEPER_HTTP__LISTEN)",
            s.http.listen
        ));
    }
    if s.http.max_connections == 0 {
        problems.push(
            "http.max_connections must be at least 1 (SEEDKEEPER_HTTP__MAX_CONNECTIONS): the probes need a connection".into(),
        );
    }
    if s.http.header_read_timeout < Duration::from_millis(100) {
        problems.push(format!(
            "http.header_read_timeout {} is below 100ms (SEEDKEEPER_HTTP__HEADER_READ_TIMEOUT): no client could send a request in time",
            duration_str::format(&s.http.header_read_timeout)
        ));
    }
}

/// The timeouts' bounds, `run.timeout` against `startup.wait_timeout`, `evidence.retention`.
fn validate_limits(s: &Settings, problems: &mut Vec<String>) {
    for (key, d) in [
        ("statement_timeout", s.database.statement_timeout),
        ("lock_timeout", s.database.lock_timeout),
    ] {
        if d.as_millis() > i32::MAX as u128 {
            problems.push(format!(
                "database.{key} must be at most 24 days (PostgreSQL's limit); 0 leaves the server's setting (SEEDKEEPER_DATABASE__{})",
                key.to_uppercase()
            ));
        }
    }
    if s.run.timeout <= s.startup.wait_timeout {
        problems.push(format!(
            "run.timeout ({}) must be above startup.wait_timeout ({}): it bounds the whole run, waiting for PostgreSQL and Keycloak included (SEEDKEEPER_RUN__TIMEOUT)",
            duration_str::format(&s.run.timeout),
            duration_str::format(&s.startup.wait_timeout)
        ));
    }
    if s.evidence.retention == 0 {
        problems
            .push("evidence.retention must be at least 1 (SEEDKEEPER_EVIDENCE__RETENTION)".into());
    }
}

/// What `environment = "production"` refuses.
fn validate_production(s: &Settings, problems: &mut Vec<String>) {
    if s.environment == Environment::Production {
        // A `cd` into the wrong folder must not change what production runs with (one such
        // file's admin_roles made every user a superadmin).
        if let Some(f) = s
            .config_file
            .as_ref()
            .filter(|f| f.origin == ConfigOrigin::WorkingDirectory)
        {
            problems.push(format!(
                "environment = \"production\" refuses the config file {} picked up from the working directory ({}) without --config or SEEDKEEPER_CONFIG: name the file to use with --config {} or SEEDKEEPER_CONFIG={}, or remove it from the working directory",
                f.absolute.display(),
                f.path.display(),
                f.absolute.display(),
                f.absolute.display()
            ));
        }
        if s.identity.source == IdentitySource::RealmFile {
            problems.push(
                "environment = \"production\" refuses identity.source = \"realm-file\" (a dev-only source): set SEEDKEEPER_IDENTITY__SOURCE=keycloak".into(),
            );
        }
        if !s.keycloak.tls_verify {
            problems.push(
                "environment = \"production\" refuses keycloak.tls_verify = false: trust the CA with keycloak.ca_file (SEEDKEEPER_KEYCLOAK__CA_FILE) instead".into(),
            );
        }
        // The client secret and every token would cross the network in clear; on loopback
        // (a sidecar, a local proxy that terminates TLS) nothing leaves the machine.
        if let Some(url) = s
            .keycloak
            .base_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
        {
            if url.scheme() == "http" && !url_is_loopback(&url) {
                problems.push(format!(
                    "environment = \"production\" refuses keycloak.base_url {} (http:// to the non-loopback host {}): the client secret and every token would cross the network in clear. Use https:// in SEEDKEEPER_KEYCLOAK__BASE_URL (trusting its CA through the OS trust store or keycloak.ca_file)",
                    redact_url(url.as_str().trim_end_matches('/')),
                    url.host_str().unwrap_or_default()
                ));
            }
        }
    }
}

/// The TLS files of `database.url` exist, and production refuses a remote database without TLS.
fn validate_database_tls(
    s: &Settings,
    cfg: &tokio_postgres::Config,
    tls: &DbTls,
    problems: &mut Vec<String>,
) {
    let files = [
        (
            "sslrootcert",
            match &tls.root_cert {
                RootCert::File(p) => Some(p),
                RootCert::System => None,
            },
        ),
        ("sslcert", tls.client_cert.as_ref()),
        ("sslkey", tls.client_key.as_ref()),
    ];
    for (key, path) in files {
        if let Some(p) = path.filter(|p| !p.is_file()) {
            problems.push(format!(
                "database.url: {key}={} is not a readable file: fix the path in SEEDKEEPER_DATABASE__URL",
                p.display()
            ));
        }
    }
    let remote = remote_hosts(cfg);
    if s.environment == Environment::Production && tls.mode < SslMode::Require && !remote.is_empty()
    {
        problems.push(format!(
            "environment = \"production\" refuses database.url's sslmode={}{} for the non-loopback host {}: identity data would cross the network unencrypted or unauthenticated. Add sslmode=verify-full&sslrootcert=/path/ca.pem to database.url (SEEDKEEPER_DATABASE__URL), or sslmode=require at least",
            tls.mode.as_str(),
            if tls.mode_given { "" } else { " (libpq's default when none is given)" },
            remote.join(", ")
        ));
    }
}

/// Whether a Keycloak URL carries a user or password (`https://user:pw@host`), in any shape.
fn has_userinfo(u: &str) -> bool {
    u.find("://").is_some_and(|start| {
        u[start + 3..]
            .split(['/', '?', '#'])
            .next()
            .is_some_and(|a| a.contains('@'))
            || userinfo_refusal(u).is_some()
    })
}

/// The refusal of a user or password in a Keycloak URL. seedkeeper authenticates with the
/// client credentials; a userinfo would be sent as Basic authentication to every endpoint and
/// be part of every URL seedkeeper logs. Never quotes the userinfo.
fn userinfo_problem(key: &str, env: &str, u: &str) -> String {
    let encoding = match userinfo_refusal(u) {
        Some(why) => format!(
            " (it also holds {why}, which would have to be percent-encoded: `@` as %40, `/` as %2F)"
        ),
        None => String::new(),
    };
    format!(
        "{key} {:?} carries a user or password{encoding}: remove it from {env}; seedkeeper \
         authenticates with keycloak.client_id and keycloak.client_secret \
         (SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE), never with credentials in the URL",
        redact_url(u)
    )
}

/// Six fields, seconds first; checked with the scheduler's own parser.
pub(crate) fn validate_cron(expr: &str) -> std::result::Result<(), String> {
    if expr.split_whitespace().count() != 6 {
        return Err(format!(
            "{} fields given, 6 expected",
            expr.split_whitespace().count()
        ));
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map_err(|e| e.to_string())?;
    // Its interval caps the retry backoff: an expression that never fires has none.
    crate::cron::interval(expr).map(|_| ())
}

/// Whether a URL's host is this machine: `localhost` (and `*.localhost`) or a loopback address.
pub(crate) fn url_is_loopback(url: &reqwest::Url) -> bool {
    url.host_str()
        .is_some_and(|h| is_loopback_host(&tokio_postgres::config::Host::Tcp(h.to_string())))
}
