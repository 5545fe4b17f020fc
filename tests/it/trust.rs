//! Keycloak's TLS certificate is trusted through the OS trust store (plus
//! `keycloak.ca_file`), with the built-in Mozilla set when no OS store is found. The emulator
//! serves HTTPS with a certificate from a private CA made here with openssl; `SSL_CERT_DIR` and
//! `SSL_CERT_FILE` stand for the OS store (they replace its locations, as for OpenSSL), so no
//! root access is needed. PostgreSQL's `sslrootcert=system` is in `pg_tls`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::kc_env;
use crate::pg_tls::{make_ca, sign};

fn e(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn keycloak_over_https_is_trusted_through_the_os_trust_store() {
    seedkeeper::telemetry::install_crypto();
    let dir = TempDir::new();
    let pki = dir.0.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_ca(&pki, "ca");
    make_ca(&pki, "other-ca");
    sign(
        &pki,
        "kc",
        "/CN=keycloak.test",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    let chain = CertificateDer::pem_file_iter(pki.join("kc.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.join("kc.key")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let kc = KeycloakEmulator::start_tls(dev_realm(), Arc::new(server)).await;
    assert!(kc.base_url().starts_with("https://127.0.0.1:"));

    // Two stand-ins for the OS store: one holding the test CA, one holding another CA only.
    let (trusted, other) = (dir.0.join("os-trusted"), dir.0.join("os-other"));
    for (d, ca) in [(&trusted, "ca.crt"), (&other, "other-ca.crt")] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(pki.join(ca), d.join(ca)).unwrap();
    }
    let ca = pki.join("ca.crt").display().to_string();
    let missing = dir.0.join("no-such-bundle.pem").display().to_string();
    let untrusted = "\"CN=keycloak.test\" issued by \"CN=seedkeeper test ca\"";
    // (case, extra environment, None for trusted or the needles of the refusal)
    type Case<'a> = (&'a str, Vec<(String, String)>, Option<Vec<&'a str>>);
    let cases: Vec<Case> = vec![
        (
            "the test CA in the OS store",
            vec![e("SSL_CERT_DIR", &trusted.display().to_string())],
            None,
        ),
        (
            "another CA in the OS store",
            vec![e("SSL_CERT_DIR", &other.display().to_string())],
            Some(vec![
                "not trusted",
                untrusted,
                "the OS trust store (SSL_CERT_DIR=",
                "update-ca-certificates",
                "keycloak.ca_file",
            ]),
        ),
        (
            "keycloak.ca_file trusts it beside the OS store",
            vec![
                e("SSL_CERT_DIR", &other.display().to_string()),
                e("SEEDKEEPER_KEYCLOAK__CA_FILE", &ca),
            ],
            None,
        ),
        (
            "no OS store found: the built-in Mozilla roots, said once",
            vec![e("SSL_CERT_FILE", &missing)],
            Some(vec![
                "no OS trust store found",
                "not trusted",
                untrusted,
                "the built-in Mozilla roots",
            ]),
        ),
    ];
    for (case, extra, refused) in cases {
        let db = TestDb::new().await;
        let mut env = db.env();
        env.extend(kc_env(&kc));
        env.push(e("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "20s"));
        env.extend(extra);
        let started = std::time::Instant::now();
        let out = run_bin(&["--once"], &env);
        let t = text(&out);
        assert!(!t.contains("seedkeeper-dev-secret"), "{case}: {t}");
        match refused {
            None => {
                assert_eq!(out.status.code(), Some(0), "{case}: {t}");
                let c = db.client().await;
                let users: i64 = c
                    .query_one("SELECT count(*) FROM users", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert!(users > 0, "{case}: users written from Keycloak");
            }
            Some(needles) => {
                assert_eq!(out.status.code(), Some(78), "{case}: {t}");
                for n in needles {
                    assert!(t.contains(n), "{case}: missing {n:?} in: {t}");
                }
                assert_eq!(
                    t.matches("no OS trust store found").count(),
                    usize::from(t.contains("no OS trust store found")),
                    "{case}: the fallback is logged once: {t}"
                );
                // Not waited out like an unreachable Keycloak: a certificate does not heal.
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(15),
                    "{case}: refused at once, not after the startup wait"
                );
            }
        }
    }
}
