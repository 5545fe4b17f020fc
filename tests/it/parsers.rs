//! Hardening. Property tests of the two input parsers: the reference seed and the realm
//! file. Mangled input never panics and is refused naming the input; generated valid realms come
//! out of the stream exactly as they went in.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use seedkeeper::config::Settings;
use seedkeeper::error::Error;
use seedkeeper::identity::realm_file::{RealmFileSource, RealmInput, EMBEDDED_REALM};
use seedkeeper::identity::{Identity, IdentityProvider, RoleFilter, Staged};
use seedkeeper::seed::{ReferenceSeed, EMBEDDED_SEED};
use serde_json::json;

use crate::harness::TempDir;

/// One edit of a text: cut a range, insert a snippet, or truncate.
#[derive(Debug, Clone)]
enum Edit {
    Cut(usize, usize),
    Insert(usize, String),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        Just("\"".to_string()),
        Just("[[".to_string()),
        Just("= -1".to_string()),
        Just("{\"x\": [1, {}]}".to_string()),
        Just("\u{0}".to_string()),
        Just("\n[extra]\n".to_string()),
        Just("null".to_string()),
        "\\PC{0,12}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..64).prop_map(|(a, n)| Edit::Cut(a, n)),
        (any::<usize>(), snippet).prop_map(|(a, s)| Edit::Insert(a, s)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply_edit(text: &str, e: &Edit) -> String {
    let at = |i: usize| {
        let mut i = i % (text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match e {
        Edit::Cut(a, n) => {
            let start = at(*a);
            let end = at((start + n).min(text.len()));
            let end = end.max(start);
            format!("{}{}", &text[..start], &text[end..])
        }
        Edit::Insert(a, s) => {
            let i = at(*a);
            format!("{}{s}{}", &text[..i], &text[i..])
        }
        Edit::Truncate(a) => text[..at(*a)].to_string(),
    }
}

fn realm_source(path: &std::path::Path) -> Arc<RealmFileSource> {
    let settings = Settings::default();
    Arc::new(RealmFileSource::new(
        RealmInput::File(path.to_path_buf()),
        RoleFilter::new(&settings.identity),
        1000,
    ))
}

fn stream_all(src: Arc<RealmFileSource>) -> Result<Vec<Identity>, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        src.clone().preflight(Default::default()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let producer = tokio::spawn(src.stream(tx, Default::default(), Default::default()));
        let mut out = Vec::new();
        while let Some(staged) = rx.recv().await {
            match staged {
                Staged::Identities(batch) => out.extend(batch),
                Staged::Grants(g) => panic!("a realm file sends no grants: {g:?}"),
            }
        }
        producer.await.unwrap()?;
        Ok(out)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_mangled_seed_never_panics_and_is_refused_naming_the_file(edits in prop::collection::vec(edit(), 1..4)) {
        let mut text = EMBEDDED_SEED.to_string();
        for e in &edits {
            text = apply_edit(&text, e);
        }
        match ReferenceSeed::parse("mangled.toml", &text) {
            Ok(seed) => {
                // An edit that kept the seed valid (a cut comment, say): it still holds the data.
                prop_assert_eq!(seed.data.sku_catalog.items.len(), 7);
            }
            Err(Error::Seed { source_name, problems }) => {
                prop_assert_eq!(source_name, "mangled.toml");
                prop_assert!(!problems.0.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
    }

    #[test]
    fn a_mangled_realm_file_never_panics_and_is_refused_naming_the_file(edits in prop::collection::vec(edit(), 1..4)) {
        let mut text = EMBEDDED_REALM.to_string();
        for e in &edits {
            text = apply_edit(&text, e);
        }
        let dir = TempDir::new();
        let path = dir.write("mangled-realm.json", &text);
        match stream_all(realm_source(&path)) {
            Ok(ids) => prop_assert!(ids.len() <= 7),
            Err(Error::RealmFile { path: p, message }) => {
                prop_assert!(p.ends_with("mangled-realm.json"), "{p}");
                prop_assert!(!message.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
    }
}

/// A generated user: opaque id, username, enabled, direct realm roles.
fn gen_user() -> impl Strategy<Value = (String, String, bool, BTreeSet<String>)> {
    (
        prop_oneof![
            "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-8[0-9a-f]{3}-[0-9a-f]{12}",
            "f:[a-z0-9-]{1,20}:[a-zA-Z0-9._@-]{1,20}",
            "[^\\p{C}]{1,40}",
        ],
        "[^\\p{C}]{1,30}",
        any::<bool>(),
        prop::collection::btree_set(
            prop_oneof![
                Just("admin"),
                Just("ops"),
                Just("platform-admin"),
                Just("unrelated")
            ]
            .prop_map(str::to_string),
            0..3,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn generated_realms_stream_back_exactly(users in prop::collection::vec(gen_user(), 0..40)) {
        // Keycloak keeps ids and lower-cased usernames unique: so does the generator.
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        let users: Vec<_> = users
            .into_iter()
            .filter(|(id, name, _, _)| ids.insert(id.clone()) && names.insert(name.to_lowercase()))
            .collect();
        let realm = json!({
            "realm": "gen",
            "roles": {"realm": [{"name": "admin"}, {"name": "ops"}, {"name": "platform-admin"}, {"name": "unrelated"}]},
            "groups": [],
            "users": users.iter().map(|(id, name, enabled, roles)| json!({
                "id": id, "username": name, "enabled": enabled, "realmRoles": roles,
            })).collect::<Vec<_>>(),
        });
        let dir = TempDir::new();
        let path = dir.write("gen-realm.json", &realm.to_string());
        let mut got = stream_all(realm_source(&path)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        got.sort_by(|a, b| a.sub.cmp(&b.sub));
        let mut want: Vec<(String, String, bool, Vec<String>)> = users
            .iter()
            .map(|(id, name, enabled, roles)| {
                (id.clone(), name.to_lowercase(), *enabled, roles.iter().filter(|r| *r != "unrelated").cloned().collect())
            })
            .collect();
        want.sort();
        let got: Vec<(String, String, bool, Vec<String>)> = got
            .into_iter()
            .map(|i| (i.sub, i.username, i.enabled, i.realm_roles))
            .collect();
        prop_assert_eq!(got, want);
    }
}
