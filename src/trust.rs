//! Which certificate authorities seedkeeper trusts, for Keycloak (HTTPS) and for PostgreSQL's
//! `sslrootcert=system`: the OS trust store, read with rustls-native-certs, so a corporate CA
//! added with `update-ca-certificates` (or the `ca-certificates` package of an image) is trusted
//! like curl and libpq trust it. `SSL_CERT_FILE` and `SSL_CERT_DIR` replace the OS locations,
//! as for OpenSSL. When no OS store is found (no certificate could be loaded: a scratch image, a
//! chroot), the Mozilla set built into the binary (webpki-roots) is used, and that is logged once.
//!
//! Why rustls-native-certs and not rustls-platform-verifier: on Linux, where seedkeeper runs, the
//! platform verifier is itself rustls-native-certs plus rustls' WebPKI verifier, so it would add a
//! layer and nothing else; and loading the roots ourselves puts them in one `RootCertStore` with
//! `keycloak.ca_file`, lets the fallback be decided (and logged) here, and keeps a refused
//! certificate a rustls error whose subject and issuer the messages can name.
//!
//! Also here: the HTTPS client config for Keycloak (`keycloak.ca_file`, `keycloak.tls_verify`),
//! and the verifier wrapper that names a certificate no trusted CA signed. Reads no config itself:
//! callers pass the keys.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::error::{Error, Result};

// Said once per process; nothing else here is process-wide: what the OS store holds is read
// again each time (see `system_roots_description`).
static FALLBACK_LOGGED: Once = Once::new();
static OS_PROBLEMS_LOGGED: Once = Once::new();

/// The process' crypto provider (ring, installed at start), else ring.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The OS trust store, else the built-in Mozilla set. Read at every call (a CA added to the OS
/// store needs no restart for PostgreSQL connections); the fallback is logged once per process.
pub(crate) fn system_roots() -> RootCertStore {
    load_system_roots().store
}

/// What one look at the OS trust store gave.
struct SystemRoots {
    store: RootCertStore,
    /// No OS store was found: `store` is the built-in Mozilla set.
    built_in: bool,
}

fn load_system_roots() -> SystemRoots {
    let found = rustls_native_certs::load_native_certs();
    if !found.errors.is_empty() {
        // Unreadable files next to good ones are normal (a stray link); say it once, as debug
        // unless nothing at all could be loaded.
        OS_PROBLEMS_LOGGED.call_once(|| {
            let problems: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            tracing::debug!(problems = %problems.join("; "), "some OS trust store files could not be read");
        });
    }
    let mut store = RootCertStore::empty();
    let (added, _unparsable) = store.add_parsable_certificates(found.certs);
    if added > 0 {
        return SystemRoots {
            store,
            built_in: false,
        };
    }
    FALLBACK_LOGGED.call_once(|| {
        let problems: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        tracing::warn!(
            looked_at = %os_store_location(),
            problems = %problems.join("; "),
            "no OS trust store found: TLS to Keycloak and sslrootcert=system use the Mozilla roots built into seedkeeper; install ca-certificates (or set SSL_CERT_FILE) to trust the OS store"
        );
    });
    SystemRoots {
        store: RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        built_in: true,
    }
}

/// Where the OS store is read from, for messages.
fn os_store_location() -> String {
    let file = std::env::var("SSL_CERT_FILE")
        .ok()
        .filter(|v| !v.is_empty());
    let dir = std::env::var("SSL_CERT_DIR").ok().filter(|v| !v.is_empty());
    match (file, dir) {
        (Some(f), Some(d)) => format!("SSL_CERT_FILE={f} and SSL_CERT_DIR={d}"),
        (Some(f), None) => format!("SSL_CERT_FILE={f}"),
        (None, Some(d)) => format!("SSL_CERT_DIR={d}"),
        (None, None) => "the OS locations (/etc/ssl/certs and the like)".into(),
    }
}

/// What [`system_roots`] trusts, for the messages of a refused certificate. The OS store is
/// looked at again (only a refusal pays for it) rather than remembered from the last
/// connection: a process-wide "last look" would be whichever connection looked last.
pub(crate) fn system_roots_description() -> String {
    if load_system_roots().built_in {
        "the built-in Mozilla roots (no OS trust store was found)".into()
    } else {
        format!("the OS trust store ({})", os_store_location())
    }
}

/// The rustls config of the Keycloak client: the OS trust store (see [`system_roots`]) plus the
/// CAs of `ca_file`; no verification at all when `verify` is false (`keycloak.tls_verify`,
/// refused in production). Only HTTP/1.1 is offered, as reqwest is built without HTTP/2.
pub(crate) fn https_client_config(ca_file: Option<&Path>, verify: bool) -> Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS to Keycloak: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = if verify {
        let mut roots = system_roots();
        if let Some(ca) = ca_file {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::config(format!(
                        "keycloak.ca_file {} is not a PEM CA bundle ({e}): fix the file or SEEDKEEPER_KEYCLOAK__CA_FILE",
                        ca.display()
                    ))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::config(format!(
                    "keycloak.ca_file {} holds no usable CA certificate: point SEEDKEEPER_KEYCLOAK__CA_FILE at the PEM file of the CA that signed Keycloak's certificate",
                    ca.display()
                )));
            }
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| Error::config(format!("TLS to Keycloak: the trusted roots: {e}")))?;
        Arc::new(NamesUntrusted(webpki))
    } else {
        Arc::new(AnyChain {
            algs: provider.signature_verification_algorithms,
        })
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A server certificate that no trusted CA signed: its subject and issuer, as `CN=…, O=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UntrustedCertificate {
    pub subject: String,
    pub issuer: String,
}

impl fmt::Display for UntrustedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the certificate \"{}\" issued by \"{}\" (unknown issuer)",
            self.subject, self.issuer
        )
    }
}

impl std::error::Error for UntrustedCertificate {}

/// The first rustls error in `e`'s chain (itself included), also inside `io::Error`s: reqwest's
/// connector wraps tokio-rustls' `io::Error` in another one, and `io::Error::source` skips the
/// error it wraps, so each is opened with `get_ref`.
pub(crate) fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(inner) = cur {
        let mut here: &(dyn std::error::Error + 'static) = inner;
        loop {
            if let Some(r) = here.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
            match here
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(wrapped) => here = wrapped,
                None => break,
            }
        }
        cur = inner.source();
    }
    None
}

/// The untrusted certificate a refused handshake names, if that is why it was refused.
pub(crate) fn untrusted(e: &rustls::Error) -> Option<&UntrustedCertificate> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<UntrustedCertificate>()
        }
        _ => None,
    }
}

/// Why Keycloak's certificate was refused and the fix, when `e` failed in TLS certificate
/// checks (retrying cannot fix those); `None` for everything else.
pub(crate) fn explain_keycloak(e: &(dyn std::error::Error + 'static), host: &str) -> Option<String> {
    let r = rustls_error(e)?;
    let roots = system_roots_description();
    let fix = "add the CA to the OS trust store (update-ca-certificates; or SSL_CERT_FILE/SSL_CERT_DIR), or give its PEM file as keycloak.ca_file (SEEDKEEPER_KEYCLOAK__CA_FILE)";
    Some(match r {
        rustls::Error::InvalidCertificate(c) => match (untrusted(r), c) {
            (Some(u), _) => format!(
                "Keycloak's TLS certificate at {host} is not trusted: {u} is not signed by a CA of {roots} nor of keycloak.ca_file: {fix}"
            ),
            (None, CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => format!(
                "Keycloak's TLS certificate at {host} is not valid for that host name ({c:?}): set keycloak.base_url to a host name the certificate names"
            ),
            (None, other) => format!(
                "Keycloak's TLS certificate at {host} was refused ({other:?}): renew it, or check the clocks"
            ),
        },
        other => return Some(format!("the TLS handshake with Keycloak at {host} failed: {other}")),
    })
}

/// rustls' verifier, except that an unknown issuer becomes an [`UntrustedCertificate`] naming
/// the certificate: "unknown issuer" alone does not tell an operator which CA to add.
#[derive(Debug)]
pub(crate) struct NamesUntrusted<V: ServerCertVerifier>(pub Arc<V>);

impl<V: ServerCertVerifier> ServerCertVerifier for NamesUntrusted<V> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    match name_certificate(end_entity) {
                        Some(u) => rustls::Error::InvalidCertificate(CertificateError::Other(
                            OtherError(Arc::new(u)),
                        )),
                        None => e,
                    }
                }
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// Subject and issuer of a DER certificate, when it parses. x509-cert (RustCrypto) parses it:
/// webpki hands out a name only as raw DER, and a parser of our own was one more to get wrong.
fn name_certificate(der: &CertificateDer<'_>) -> Option<UntrustedCertificate> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    Some(UntrustedCertificate {
        subject: render_name(&cert.tbs_certificate.subject),
        issuer: render_name(&cert.tbs_certificate.issuer),
    })
}

/// `C=…, O=…, CN=…` in the certificate's order, with the attributes an operator recognises
/// (CN, O, OU, C), each written and escaped by x509-cert (RFC 4514); the rest are skipped, so
/// an e-mail address or a serial number does not drown the name.
pub(crate) fn render_name(name: &x509_cert::name::Name) -> String {
    use x509_cert::der::oid::db::rfc4519::{
        COMMON_NAME, COUNTRY_NAME, ORGANIZATIONAL_UNIT_NAME, ORGANIZATION_NAME,
    };
    let known = [
        COMMON_NAME,
        ORGANIZATION_NAME,
        ORGANIZATIONAL_UNIT_NAME,
        COUNTRY_NAME,
    ];
    let parts: Vec<String> = name
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| known.contains(&atv.oid))
        .map(ToString::to_string)
        // An attribute whose value is no string is written `2.5.4.3=#…` (hex DER): not a name.
        .filter(|s| !s.contains("=#"))
        .collect();
    if parts.is_empty() {
        "(no readable name)".into()
    } else {
        parts.join(", ")
    }
}

/// The signature checks of a [`ServerCertVerifier`] whose `algs` field holds the provider's
/// algorithms: the same for every verifier here, whatever it makes of the chain.
macro_rules! signatures_checked {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}
pub(crate) use signatures_checked;

/// Accepts any chain (no CA, no name), but the handshake must still be signed with the
/// certificate's key: `keycloak.tls_verify = false`, and PostgreSQL's `prefer`/`require`.
#[derive(Debug)]
pub(crate) struct AnyChain {
    pub algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked!();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// SET { SEQUENCE { OID, string } } for one attribute.
    fn rdn(oid: &[u8], tag: u8, value: &str) -> Vec<u8> {
        let mut atv = vec![0x06, oid.len() as u8];
        atv.extend_from_slice(oid);
        atv.extend_from_slice(&[tag, value.len() as u8]);
        atv.extend_from_slice(value.as_bytes());
        let mut seq = vec![0x30, atv.len() as u8];
        seq.extend(atv);
        let mut set = vec![0x31, seq.len() as u8];
        set.extend(seq);
        set
    }

    /// The Name SEQUENCE around `rdns`, parsed by x509-cert.
    fn name(rdns: &[u8]) -> std::result::Result<x509_cert::name::Name, x509_cert::der::Error> {
        use x509_cert::der::Decode;
        let mut der = vec![0x30, rdns.len() as u8];
        der.extend_from_slice(rdns);
        x509_cert::name::Name::from_der(&der)
    }

    #[test]
    fn names_render_the_attributes_an_operator_knows() {
        let mut der = rdn(&[0x55, 0x04, 0x06], 0x13, "DE");
        der.extend(rdn(&[0x55, 0x04, 0x0a], 0x0c, "Example AG"));
        // emailAddress (1.2.840.113549.1.9.1) is skipped.
        der.extend(rdn(
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            0x16,
            "a@b.c",
        ));
        der.extend(rdn(&[0x55, 0x04, 0x03], 0x0c, "Corp Root CA"));
        let name = name(&der).unwrap();
        assert_eq!(render_name(&name), "C=DE, O=Example AG, CN=Corp Root CA");
    }

    #[test]
    fn a_name_value_is_escaped_as_rfc_4514_says() {
        let name = name(&rdn(&[0x55, 0x04, 0x0a], 0x0c, "Example, AG")).unwrap();
        assert_eq!(render_name(&name), "O=Example\\, AG");
    }

    #[test]
    fn a_truncated_name_is_refused_and_an_empty_one_has_no_readable_name() {
        let der = rdn(&[0x55, 0x04, 0x03], 0x0c, "Corp Root CA");
        assert!(name(&der[..der.len() - 3]).is_err());
        assert_eq!(render_name(&name(&[]).unwrap()), "(no readable name)");
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_not_named() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(name_certificate(&der).is_none());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("seedkeeper-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("empty.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = https_client_config(Some(&f), true).unwrap_err().to_string();
        assert!(
            e.contains("keycloak.ca_file") && e.contains("SEEDKEEPER_KEYCLOAK__CA_FILE"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
