//! Property: no fragment of a password written into a URL (percent-encoded or not) reaches any
//! message or rendering of the settings: the validation errors (Display and Debug), the
//! connection config's error, the settings' `Debug` (what a panic prints), `seedkeeper config`'s
//! TOML and the `host:port/db` target.

use proptest::prelude::*;

use super::*;

/// Characters a password is made of. Letters and digits are ones no fixed text of seedkeeper's
/// output forms four-long runs with (so a hit is a leak, not a coincidence); the rest are every
/// character that changes how a URL reads.
const ALPHABET: &[char] = &[
    'Q', 'X', 'Z', 'J', 'K', '7', '9', '@', ':', '/', '%', '#', '?', '!', '$', '&', '\'', '(', ')',
    '+', ',', ';', '=', '~', '.', '_', '-', ' ', '[', ']', '"', '\\', 'é',
];

fn password() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), 6..24)
        .prop_map(|cs| cs.into_iter().collect())
}

/// Every substring of at least four characters of `secret` that occurs in `text`.
fn leaked(secret: &str, text: &str) -> Option<String> {
    let cs: Vec<char> = secret.chars().collect();
    (0..cs.len().saturating_sub(3))
        .map(|i| cs[i..i + 4].iter().collect::<String>())
        .find(|w| text.contains(w.as_str()))
}

fn load_with(vars: &[(&str, String)]) -> Result<Settings> {
    load(&ConfigLayers {
        file: None,
        env: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    })
}

/// Everything the settings, or their refusal, show.
fn outputs(r: &Result<Settings>) -> Vec<String> {
    match r {
        Ok(s) => vec![
            s.redacted_toml(),
            format!("{s:?}"),
            s.database.target(),
            match s.database.connection() {
                Ok((cfg, _)) => crate::config::database_url::describe_target(&cfg),
                Err(e) => format!("{e} {e:?}"),
            },
        ],
        Err(e) => vec![e.to_string(), format!("{e:?}")],
    }
}

fn encode(pw: &str) -> String {
    percent_encoding::utf8_percent_encode(pw, percent_encoding::NON_ALPHANUMERIC).to_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_fragment_of_a_url_password_reaches_any_output(pw in password()) {
        let raw = format!("postgres://seedkeeper:{pw}@db.example:5432/app");
        let encoded = format!("postgres://seedkeeper:{}@db.example:5432/app", encode(&pw));
        let mut shown = Vec::new();
        let as_written = load_with(&[("SEEDKEEPER_DATABASE__URL", raw.clone())]);
        shown.extend(outputs(&as_written));
        // Percent-encoded, the same password is accepted.
        let encoded_ok = load_with(&[("SEEDKEEPER_DATABASE__URL", encoded)]);
        prop_assert!(encoded_ok.is_ok(), "{:?}", encoded_ok.err().map(|e| e.to_string()));
        shown.extend(outputs(&encoded_ok));
        // The connection config refuses it too, when settings were built without validation.
        let mut direct = Settings::default().database;
        direct.url = Some(SecretString::from(raw.clone()));
        shown.push(match direct.connection() {
            Ok((cfg, _)) => crate::config::database_url::describe_target(&cfg),
            Err(e) => format!("{e} {e:?}"),
        });
        shown.push(direct.target());
        shown.push(crate::config::database_url::redact_url(&raw));
        // In a Keycloak URL, as written and encoded.
        for base in [
            format!("https://seedkeeper:{pw}@kc.example/"),
            format!("https://seedkeeper:{}@kc.example/", encode(&pw)),
        ] {
            let r = load_with(&[
                ("SEEDKEEPER_DATABASE__URL", "postgres://u@db.example/app".to_string()),
                ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak".to_string()),
                ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "lowercase-client-secret".to_string()),
                ("SEEDKEEPER_KEYCLOAK__BASE_URL", base.clone()),
            ]);
            prop_assert!(r.is_err(), "a user or password in keycloak.base_url must be refused");
            shown.extend(outputs(&r));
            // Refused with the realm-file source too: `config` and `Debug` would show it.
            let r = load_with(&[
                ("SEEDKEEPER_DATABASE__URL", "postgres://u@db.example/app".to_string()),
                ("SEEDKEEPER_KEYCLOAK__BASE_URL", base),
            ]);
            prop_assert!(r.is_err(), "a user or password in keycloak.base_url must be refused");
            shown.extend(outputs(&r));
        }
        for text in &shown {
            prop_assert!(leaked(&pw, text).is_none(), "{:?} of {pw:?} in {text}", leaked(&pw, text));
        }
        // A password that needs encoding is refused as written, naming the fix.
        if crate::config::database_url::userinfo_refusal(&raw).is_some() {
            let e = as_written.err().map(|e| e.to_string()).unwrap_or_default();
            prop_assert!(e.contains("percent-encode"), "{e}");
            prop_assert!(e.contains("SEEDKEEPER_DATABASE__PASSWORD_FILE"), "{e}");
        }
    }
}
