//! TLS to PostgreSQL with libpq's URL parameters (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`). The server is a cluster of the test's own that accepts TCP only through `hostssl`
//! (its checks go through a `local` line), with a server certificate for `localhost` signed by a
//! private CA made here with openssl. The production guard is checked at config load.

use std::path::{Path, PathBuf};
use std::process::Command;

use seedkeeper::config::{split_libpq_tls, RootCert, SslMode};

use crate::harness::cluster::OwnCluster;
use crate::harness::*;

fn e(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("the openssl command is needed for this test: install Debian's openssl package (apt-get install openssl): {e}")
        });
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

/// `openssl req` options for a new P-256 key, unencrypted.
const NEW_P256_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA (`{name}.crt`, `{name}.key`) in `dir`.
pub(crate) fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &NEW_P256_KEY,
            &[
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &format!("/CN=seedkeeper test {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    dir.join(crt)
}

/// A key and a certificate (`{name}.key`, `{name}.crt`) in `dir` for `subject`, signed by the
/// CA `ca`, with the X.509 extensions `ext`.
pub(crate) fn sign(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    openssl(
        dir,
        &[
            &["req"][..],
            &NEW_P256_KEY,
            &["-keyout", &key, "-out", &csr, "-subj", subject],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    );
}

/// A PostgreSQL cluster of its own: `ssl = on`, TCP only through `hostssl` on 127.0.0.1, a
/// `local` line for the test's own connections; its certificate names `localhost` only.
struct TlsCluster {
    pg: OwnCluster,
}

impl TlsCluster {
    fn new() -> TlsCluster {
        let pg = OwnCluster::init();
        let (pki, pgdata) = (pg.dir.0.join("pki"), pg.pgdata());
        std::fs::create_dir_all(&pki).unwrap();

        make_ca(&pki, "ca");
        make_ca(&pki, "other-ca");
        sign(
            &pki,
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        // A client certificate for the role postgres, for the databases that want one.
        sign(
            &pki,
            "client",
            "/CN=postgres",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        );

        for f in ["server.crt", "server.key", "ca.crt"] {
            std::fs::copy(pki.join(f), pgdata.join(f)).unwrap();
        }
        std::fs::write(
            pgdata.join("pg_hba.conf"),
            "local all all trust\nhostssl c9,c10 all 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pgdata.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n",
        )
        .unwrap();
        pg.chown();
        let _ = Command::new("chmod")
            .arg("600")
            .arg(pgdata.join("server.key"))
            .status();

        pg.start();
        TlsCluster { pg }
    }

    fn file(&self, name: &str) -> String {
        self.pg.dir.0.join("pki").join(name).display().to_string()
    }

    /// The test's own connection string: the Unix socket, through the `local` line.
    fn socket(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.pg.pgdata().display(),
            self.pg.port
        )
    }

    /// A URL for seedkeeper, with a canary password that must never be printed.
    fn url(&self, host: &str, db: &str, params: &str) -> String {
        let q = if params.is_empty() {
            String::new()
        } else {
            format!("?{params}")
        };
        format!(
            "postgres://postgres:canary-pw-Zx9@{host}:{}/{db}{q}",
            self.pg.port
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_a_hostssl_only_postgresql_follows_libpq_sslmode() {
    seedkeeper::telemetry::install_crypto();
    let cluster = tokio::task::spawn_blocking(TlsCluster::new).await.unwrap();
    let admin = connect(&cluster.socket("postgres")).await;
    let ca = cluster.file("ca.crt");
    let other_ca = cluster.file("other-ca.crt");

    // (case, URL, Ok(users written) or Err(needles of the refusal))
    type Expect = Result<i64, Vec<&'static str>>;
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "verify-full with sslrootcert (TLS verified)",
            cluster.url(
                "localhost",
                "c0",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Ok(6),
        ),
        (
            "verify-full without the CA (TLS refused: unknown issuer)",
            cluster.url("localhost", "c1", "sslmode=verify-full"),
            Err(vec![
                "TLS to PostgreSQL at localhost:",
                "certificate",
                "unknown issuer",
                "sslrootcert=",
            ]),
        ),
        (
            "plaintext (sslmode=disable) refused by the hostssl-only server",
            cluster.url("127.0.0.1", "c2", "sslmode=disable"),
            Err(vec![
                "no pg_hba.conf entry",
                "no encryption",
                "accepts only TLS",
                "sslmode=disable",
            ]),
        ),
        (
            "require without the CA encrypts without verifying",
            cluster.url("127.0.0.1", "c3", "sslmode=require"),
            Ok(6),
        ),
        (
            "verify-full against a certificate for another name",
            cluster.url(
                "127.0.0.1",
                "c4",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Err(vec![
                "TLS to PostgreSQL",
                "not valid for the host name 127.0.0.1",
                "localhost",
                "verify-ca",
            ]),
        ),
        (
            "verify-ca checks the chain, not the name",
            cluster.url(
                "127.0.0.1",
                "c5",
                &format!("sslmode=verify-ca&sslrootcert={ca}"),
            ),
            Ok(6),
        ),
        (
            "require with an sslrootcert verifies the chain, as libpq does",
            cluster.url(
                "localhost",
                "c6",
                &format!("sslmode=require&sslrootcert={other_ca}"),
            ),
            Err(vec!["TLS to PostgreSQL", "unknown issuer", "other-ca.crt"]),
        ),
        (
            "no sslmode: prefer, which uses the server's TLS",
            cluster.url("localhost", "c7", ""),
            Ok(6),
        ),
        (
            "a Unix socket ignores sslmode=require, as libpq does (key=value form)",
            format!("{} sslmode=require", cluster.socket("c8")),
            Ok(6),
        ),
        (
            "a client certificate (sslcert, sslkey) where pg_hba.conf says cert",
            cluster.url(
                "localhost",
                "c9",
                &format!(
                    "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                    cluster.file("client.crt"),
                    cluster.file("client.key")
                ),
            ),
            Ok(6),
        ),
        (
            "no client certificate where pg_hba.conf says cert",
            cluster.url(
                "localhost",
                "c10",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Err(vec!["certificate", "sslcert=", "sslkey="]),
        ),
    ];
    for (i, (case, url, expect)) in cases.into_iter().enumerate() {
        let db = format!("c{i}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let out = run_bin(
            &["--once"],
            &[
                e("SEEDKEEPER_DATABASE__URL", &url),
                e("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "3s"),
            ],
        );
        let t = text(&out);
        assert!(
            !t.contains("canary-pw"),
            "{case}: the URL's password was printed: {t}"
        );
        let c = connect(&cluster.socket(&db)).await;
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        match expect {
            Ok(users) => {
                assert_eq!(out.status.code(), Some(0), "{case}: {t}");
                let n: i64 = c
                    .query_one("SELECT count(*) FROM users", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, users, "{case}: users written");
            }
            Err(needles) => {
                assert_eq!(out.status.code(), Some(78), "{case}: {t}");
                for n in needles {
                    assert!(t.contains(n), "{case}: missing {n:?} in: {t}");
                }
                assert!(!t.contains("not a valid PostgreSQL URL"), "{case}: {t}");
                assert_eq!(tables, 0, "{case}: nothing written");
            }
        }
    }
}

/// `sslrootcert=system` is the OS trust store. `SSL_CERT_FILE` stands for it here (it
/// replaces the OS locations, as for OpenSSL), naming a bundle with only the test's CA, so no
/// root access is needed and the machine's own store is not touched.
#[tokio::test(flavor = "multi_thread")]
async fn sslrootcert_system_trusts_a_ca_that_only_the_os_trust_store_holds() {
    seedkeeper::telemetry::install_crypto();
    let cluster = TlsCluster::new();
    let admin = connect(&cluster.socket("postgres")).await;
    let cases = [
        ("the test CA in the OS store", cluster.file("ca.crt"), None),
        (
            "another CA in the OS store",
            cluster.file("other-ca.crt"),
            Some(vec![
                "TLS to PostgreSQL at localhost:",
                "not trusted",
                "\"CN=localhost\" issued by \"CN=seedkeeper test ca\"",
                "the OS trust store (SSL_CERT_FILE=",
                "sslrootcert=",
            ]),
        ),
    ];
    for (i, (case, bundle, refused)) in cases.into_iter().enumerate() {
        let db = format!("s{i}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let out = run_bin(
            &["--once"],
            &[
                e(
                    "SEEDKEEPER_DATABASE__URL",
                    &cluster.url("localhost", &db, "sslmode=verify-full&sslrootcert=system"),
                ),
                e("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "3s"),
                e("SSL_CERT_FILE", &bundle),
            ],
        );
        let t = text(&out);
        assert!(!t.contains("canary-pw"), "{case}: {t}");
        let c = connect(&cluster.socket(&db)).await;
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        match refused {
            None => {
                assert_eq!(out.status.code(), Some(0), "{case}: {t}");
                assert!(tables > 0, "{case}: the schema was written");
            }
            Some(needles) => {
                assert_eq!(out.status.code(), Some(78), "{case}: {t}");
                for n in needles {
                    assert!(t.contains(n), "{case}: missing {n:?} in: {t}");
                }
                assert_eq!(tables, 0, "{case}: nothing written");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn production_refuses_a_remote_database_without_tls_at_config_load() {
    let base = [
        e("SEEDKEEPER_ENVIRONMENT", "production"),
        e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        e("SEEDKEEPER_KEYCLOAK__BASE_URL", "https://kc.example"),
        e("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
    ];
    let cases: [(&str, bool); 7] = [
        (
            "postgres://sk:pw-canary@db.example.com:5432/platform?sslmode=prefer",
            false,
        ),
        (
            "postgres://sk:pw-canary@db.example.com:5432/platform",
            false,
        ),
        (
            "postgres://sk:pw-canary@10.1.2.3/platform?sslmode=disable",
            false,
        ),
        (
            "postgres://sk:pw-canary@db.example.com/platform?sslmode=require",
            true,
        ),
        (
            "postgres://sk:pw-canary@db.example.com/platform?sslmode=verify-full",
            true,
        ),
        (
            "postgres://sk:pw-canary@127.0.0.1/platform?sslmode=disable",
            true,
        ),
        ("host=/run/postgresql user=sk dbname=platform", true),
    ];
    for (url, accepted) in cases {
        let mut env = base.to_vec();
        env.push(e("SEEDKEEPER_DATABASE__URL", url));
        let out = run_bin(&["config"], &env);
        let t = text(&out);
        assert!(!t.contains("pw-canary"), "{url}: {t}");
        if accepted {
            assert_eq!(out.status.code(), Some(0), "{url}: {t}");
        } else {
            assert_eq!(out.status.code(), Some(78), "{url}: {t}");
            for n in [
                "production",
                "database.url's sslmode=",
                "sslmode=verify-full",
                "SEEDKEEPER_DATABASE__URL",
            ] {
                assert!(t.contains(n), "{url}: missing {n:?}: {t}");
            }
        }
    }
}

#[test]
fn libpq_tls_parameters_are_split_off_the_url_with_libpq_defaults() {
    let (rest, tls) = split_libpq_tls(
        "postgres://u:p%3Fw@h:5433/db?application_name=x&sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
    )
    .unwrap();
    assert_eq!(
        rest,
        "postgres://u:p%3Fw@h:5433/db?application_name=x&connect_timeout=3"
    );
    assert_eq!(tls.mode, SslMode::VerifyCa);
    assert_eq!(tls.root_cert, RootCert::File("/etc/ca.pem".into()));

    // A '?' in the password is not the start of the parameters.
    let (rest, tls) = split_libpq_tls("postgres://u:a?b@h/db?sslmode=require").unwrap();
    assert_eq!(
        (rest.as_str(), tls.mode),
        ("postgres://u:a?b@h/db", SslMode::Require)
    );

    // Defaults and implications, as libpq.
    let mode = |s: &str| split_libpq_tls(s).map(|(_, t)| t.mode);
    assert_eq!(mode("postgres://h/db"), Ok(SslMode::Prefer));
    assert_eq!(
        mode("postgres://h/db?sslrootcert=/ca.pem&sslmode=require"),
        Ok(SslMode::VerifyCa)
    );
    assert_eq!(
        mode("postgres://h/db?sslrootcert=system"),
        Ok(SslMode::VerifyFull)
    );
    assert!(mode("postgres://h/db?sslrootcert=system&sslmode=require").is_err());
    assert!(mode("postgres://h/db?sslmode=allow")
        .unwrap_err()
        .contains("sslmode=allow"));
    assert!(split_libpq_tls("postgres://h/db?sslcert=/c.pem")
        .unwrap_err()
        .contains("sslkey"));

    // key=value form, quoting kept for the rest.
    let (rest, tls) = split_libpq_tls(
        "host=h password='a b\\'c' sslmode = verify-full sslrootcert='/x y/ca.pem' dbname=d",
    )
    .unwrap();
    assert_eq!(rest, "host=h password='a b\\'c' dbname=d");
    assert_eq!(tls.mode, SslMode::VerifyFull);
    assert_eq!(tls.root_cert, RootCert::File("/x y/ca.pem".into()));

    // What tokio-postgres would refuse is left to it (and its message names only the option).
    let err = seedkeeper::config::load(&seedkeeper::config::ConfigLayers {
        file: None,
        env: vec![e(
            "SEEDKEEPER_DATABASE__URL",
            "postgres://u:secret-pw@h/db?sslcrl=/x",
        )],
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown option `sslcrl`") && !err.contains("secret-pw"),
        "{err}"
    );
}
