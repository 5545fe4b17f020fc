//! TLS to PostgreSQL: rustls (ring, the provider reqwest uses) configured from libpq's URL
//! parameters ([`DbTls`]), and what a failed handshake means for the operator.
//!
//! - `prefer` and `require` (without `sslrootcert`) encrypt but accept any certificate chain;
//!   the handshake signatures are still checked, so the server must hold the certificate's key.
//! - `verify-ca` checks the chain against the roots but not the host name.
//! - `verify-full` checks both (rustls' own WebPKI verifier).
//!
//! The roots are `sslrootcert`'s PEM file, else (`sslrootcert=system`, or none given) the OS
//! trust store, with the built-in Mozilla set as the fallback where none is found
//! ([`crate::trust`]). Files are read at every connection, so a rotated CA or client certificate
//! needs no restart.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};
use crate::trust::{self, signatures_checked, AnyChain, NamesUntrusted};

use crate::config::{DbTls, RootCert, SslMode};

/// The connector for `tls`. File problems are configuration errors naming the parameter.
pub(crate) fn connector(tls: &DbTls) -> Result<MakeRustlsConnect> {
    let provider = trust::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS to PostgreSQL: {e}")))?;
    let algs = provider.signature_verification_algorithms;
    let builder = match tls.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyChain { algs })),
        SslMode::VerifyCa => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NamesUntrusted(Arc::new(ChainOnly {
                roots: roots(tls)?,
                algs,
            })))),
        SslMode::VerifyFull => {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(tls)?), provider)
                    .build()
                    .map_err(|e| Error::config(format!("database.url: sslrootcert: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamesUntrusted(verifier)))
        }
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| pem_problem("sslcert", cert, "a PEM certificate", e))?;
            if chain.is_empty() {
                return Err(Error::config(format!(
                    "database.url: sslcert={} holds no PEM certificate",
                    cert.display()
                )));
            }
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem_problem("sslkey", key, "a PEM private key", e))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                Error::config(format!(
                    "database.url: sslkey={} does not go with sslcert={}: {e}",
                    key.display(),
                    cert.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn pem_problem(key: &str, path: &Path, what: &str, e: rustls::pki_types::pem::Error) -> Error {
    Error::config(format!(
        "database.url: {key}={} is not {what} ({e}): fix the file or the path",
        path.display()
    ))
}

/// The trust anchors: `sslrootcert`'s PEM file, else the OS trust store (or its fallback).
fn roots(tls: &DbTls) -> Result<RootCertStore> {
    match &tls.root_cert {
        RootCert::System => Ok(trust::system_roots()),
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| pem_problem("sslrootcert", path, "a PEM CA bundle", e))?;
            let mut store = RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::config(format!(
                    "database.url: sslrootcert={} holds no usable CA certificate: point it at the PEM file of the CA that signed the server certificate",
                    path.display()
                )));
            }
            Ok(store)
        }
    }
}

/// `verify-ca`: the chain must lead to a root; the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: RootCertStore,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked!();
}

/// When a connection failed in TLS in a way that retrying cannot fix (a certificate that does
/// not verify, a server without TLS, a handshake the server refuses), what went wrong and the
/// fix. `None` for everything else (including the network failing mid-handshake).
pub(crate) fn refusal(e: &tokio_postgres::Error, tls: &DbTls, host: &str) -> Option<String> {
    if let Some(r) = trust::rustls_error(e) {
        return Some(explain(r, tls, host));
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        if inner.to_string() == "server does not support TLS" {
            return Some(format!(
                "the server does not accept TLS (its ssl setting is off) but sslmode={} requires it: turn on ssl in the server's postgresql.conf, or choose a weaker sslmode (not in production)",
                tls.mode.as_str()
            ));
        }
        src = inner.source();
    }
    None
}

fn explain(e: &rustls::Error, tls: &DbTls, host: &str) -> String {
    let roots = match &tls.root_cert {
        RootCert::File(p) => format!("the CAs of sslrootcert={}", p.display()),
        RootCert::System => format!(
            "{}, as sslrootcert is system or not given",
            trust::system_roots_description()
        ),
    };
    if let Some(u) = trust::untrusted(e) {
        return format!(
            "the server certificate is not trusted: {u} is not signed by {roots}: set sslrootcert=/path/ca.pem in database.url to the CA that signed it (or add that CA to the OS trust store for sslrootcert=system), or sslmode=require to encrypt without verifying"
        );
    }
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the server certificate is not trusted (unknown issuer: it is not signed by {roots}): set sslrootcert=/path/ca.pem in database.url to the CA that signed it, or sslmode=require to encrypt without verifying"
            ),
            CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. } => {
                let names = match c {
                    CertificateError::NotValidForNameContext { presented, .. } => {
                        // rustls renders them as `DnsName("db.example")`: keep the name.
                        let plain: Vec<&str> = presented
                            .iter()
                            .map(|p| {
                                p.split_once('(')
                                    .map(|(_, r)| r.trim_end_matches(')').trim_matches('"'))
                                    .unwrap_or(p)
                            })
                            .collect();
                        format!(" (it names {})", plain.join(", "))
                    }
                    _ => String::new(),
                };
                format!(
                    "the server certificate is not valid for the host name {host}{names}: connect with a host name the certificate names, or use sslmode=verify-ca to verify the chain but not the name"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the server certificate has expired ({c:?}): renew it on the server"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "the server certificate is not valid yet ({c:?}): check the clocks of this machine and the server"
                )
            }
            other => format!(
                "the server certificate was refused ({other:?}): check it against {roots}, or use sslmode=require to encrypt without verifying"
            ),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "the server ended the TLS handshake with the alert {alert:?}: if it requires a client certificate, set sslcert= and sslkey= in database.url (a certificate its CA signed)"
        ),
        other => format!("the TLS handshake failed: {other}"),
    }
}
