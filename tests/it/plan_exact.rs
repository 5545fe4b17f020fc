//! `plan` is exact: what it lists is what the next apply on the same database and the same
//! source writes, item by item (each change with its key), for random sequences of lifecycle
//! steps: provision, change, role gained and lost (directly, through a composite, through a
//! group), disable, enable, delete, back again, re-import with a new sub, seed drift, rows
//! removed or changed by hand. After each apply, a plan is in sync (one run converges).
//!
//! The sequences come from a seeded generator: a failure prints the sequence's seed and steps,
//! and `SEEDKEEPER_TEST_PLAN_SEED=<seed>` replays that one. `SEEDKEEPER_TEST_PLAN_SEQUENCES`
//! sets how many (default 200).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::harness::*;
use crate::identities::{realm_file_env, refs, test_realm, user};
use seedkeeper::reconcile::{Outcome, RunReport, Unit};

/// The users a sequence adds, changes and removes, beside the six personas of the dev realm.
const POOL: usize = 5;

/// SplitMix64: small, seedable, and enough to walk the lifecycle at random.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One pool user as the realm has it (or not).
#[derive(Clone, Debug)]
struct PoolUser {
    present: bool,
    /// Bumped by a re-import: the user comes back under a new id (sub).
    generation: u32,
    enabled: bool,
    /// Bumped by a change of email and names.
    version: u32,
    roles: &'static [&'static str],
    groups: &'static [&'static str],
}

const ROLE_SETS: &[&[&str]] = &[&[], &["admin"], &["ops"], &["super"], &["admin", "ops"]];
const GROUP_SETS: &[&[&str]] = &[&[], &["/admins"], &["/admins/emea"]];

impl PoolUser {
    fn sub(&self, i: usize) -> String {
        format!("c0{:06}-0000-4000-8000-{i:012}", self.generation)
    }

    fn json(&self, i: usize) -> Value {
        let name = format!("pool{i}");
        let mut u = user(&self.sub(i), &name, self.roles, self.groups);
        u["enabled"] = json!(self.enabled);
        u["email"] = json!(format!("{name}.v{}@example.test", self.version));
        u["firstName"] = json!(format!("First{}", self.version));
        u
    }
}

/// A step of a sequence, as the failure message shows it.
#[derive(Clone, Debug)]
enum Step {
    Provision(usize),
    Change(usize),
    Roles(usize, usize, usize),
    Disable(usize),
    Enable(usize),
    Delete(usize),
    Reimport(usize),
    SeedDrift(usize),
    ByHand(usize),
}

fn random_step(rng: &mut Rng) -> Step {
    let i = rng.below(POOL);
    match rng.below(9) {
        0 => Step::Provision(i),
        1 => Step::Change(i),
        2 => Step::Roles(i, rng.below(ROLE_SETS.len()), rng.below(GROUP_SETS.len())),
        3 => Step::Disable(i),
        4 => Step::Enable(i),
        5 => Step::Delete(i),
        6 => Step::Reimport(i),
        7 => Step::SeedDrift(rng.below(3)),
        _ => Step::ByHand(rng.below(4)),
    }
}

/// Changes made to the database by hand, as an admin or an accident would.
const BY_HAND: &[&str] = &[
    "DELETE FROM project_memberships WHERE user_id = (SELECT id FROM users WHERE username = 'dev-ops')",
    "UPDATE tenant_memberships SET status = 'suspended' WHERE user_id = (SELECT id FROM users WHERE username = 'dev-user')",
    "DELETE FROM platform_role_bindings WHERE granted_by = 'seedkeeper' AND status = 'active' AND user_id = (SELECT id FROM users WHERE username = 'dev-admin')",
    "UPDATE users SET email = 'edited@by.hand' WHERE username = 'dev-tenant-admin'",
];

/// Drift of the reference seed: a converge row changed, an insert-missing row removed, a
/// superseded app version made active.
const DRIFT: &[&str] = &[
    "UPDATE sku_catalog SET gpu_hourly_price_minor = gpu_hourly_price_minor + 1 WHERE sku = 'h100'",
    "DELETE FROM policy_values WHERE policy_key = 'maas.enabled'",
    "UPDATE app_catalog SET runtime_backend = 'slurm' WHERE slug = 'nginx'",
];

struct Sequence {
    seed: u64,
    pool: Vec<PoolUser>,
    steps: Vec<Step>,
}

impl Sequence {
    fn realm(&self) -> Value {
        let users = self
            .pool
            .iter()
            .enumerate()
            .filter(|(_, u)| u.present)
            .map(|(i, u)| u.json(i))
            .collect();
        test_realm(users)
    }

    /// Applies a step to the realm, or returns the SQL it runs against the database.
    fn take(&mut self, step: &Step) -> Option<&'static str> {
        match *step {
            Step::Provision(i) => self.pool[i].present = true,
            Step::Change(i) => self.pool[i].version += 1,
            Step::Roles(i, r, g) => {
                self.pool[i].roles = ROLE_SETS[r];
                self.pool[i].groups = GROUP_SETS[g];
            }
            Step::Disable(i) => self.pool[i].enabled = false,
            Step::Enable(i) => self.pool[i].enabled = true,
            Step::Delete(i) => self.pool[i].present = false,
            Step::Reimport(i) => self.pool[i].generation += 1,
            Step::SeedDrift(k) => return Some(DRIFT[k]),
            Step::ByHand(k) => return Some(BY_HAND[k]),
        }
        None
    }
}

fn listed(r: &RunReport) -> Vec<String> {
    r.changes_sorted()
        .iter()
        .map(|(u, c)| format!("{u} {c}"))
        .collect()
}

fn writes(r: &RunReport) -> Vec<(Unit, i64)> {
    r.units.iter().map(|u| (u.unit, u.writes())).collect()
}

/// One sequence on a database of its own, dropped off the runtime's workers (its `Drop` blocks,
/// and the sessions it waits for are driven by those workers).
async fn check_sequence(seed: u64) -> Result<usize, String> {
    let db = TestDb::new().await;
    let result = walk(&db, seed).await;
    tokio::task::spawn_blocking(move || drop(db))
        .await
        .map_err(|e| format!("dropping the database: {e}"))?;
    result
}

/// A cold run, then each step; after each, the plan's list equals the apply's, and a plan after
/// the apply lists nothing.
async fn walk(db: &TestDb, seed: u64) -> Result<usize, String> {
    let mut rng = Rng(seed);
    let mut seq = Sequence {
        seed,
        pool: (0..POOL)
            .map(|_| PoolUser {
                present: rng.below(2) == 0,
                generation: 0,
                enabled: true,
                version: 0,
                roles: ROLE_SETS[rng.below(ROLE_SETS.len())],
                groups: GROUP_SETS[rng.below(GROUP_SETS.len())],
            })
            .collect(),
        steps: Vec::new(),
    };
    let dir = TempDir::new();
    let mut compared = 0;
    let n = 3 + rng.below(4);
    for k in 0..=n {
        if k > 0 {
            let step = random_step(&mut rng);
            seq.steps.push(step.clone());
            if let Some(sql) = seq.take(&step) {
                db.client()
                    .await
                    .batch_execute(sql)
                    .await
                    .map_err(|e| format!("seed {seed}: {sql}: {e}"))?;
            }
        }
        let env = realm_file_env(&dir, &seq.realm());
        let mut engine = db.engine(&refs(&env));
        let planned = plan(&engine).await;
        engine.list_changes = true;
        let applied = apply(&engine).await;
        let context = || format!("seed {} after steps {:?}", seq.seed, seq.steps);
        if planned.error.is_some()
            && planned.outcome == Outcome::Failed
            && applied.outcome != Outcome::Failed
        {
            return Err(format!(
                "{}: the plan failed ({:?}) and the apply did not",
                context(),
                planned.error
            ));
        }
        // Plan and apply could agree and both be wrong: the rows themselves hold what the
        // realm says (a NULL email written by both would pass every comparison above).
        if applied.outcome == Outcome::Succeeded {
            for (i, u) in seq.pool.iter().enumerate().filter(|(_, u)| u.present) {
                let name = format!("pool{i}");
                let want = (
                    Some(u.sub(i)),
                    Some(format!("{name}.v{}@example.test", u.version)),
                    Some(format!("First{}", u.version)),
                    u.enabled,
                );
                let row = db
                    .client()
                    .await
                    .query_one(
                        "SELECT keycloak_sub, email, first_name, is_active FROM users WHERE username = $1",
                        &[&name],
                    )
                    .await
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                    .map_err(|e| format!("{}: the row of {name}: {e}", context()))?;
                if row != want {
                    return Err(format!(
                        "{}: {name} is {row:?}, the realm says {want:?}",
                        context()
                    ));
                }
            }
        }
        if listed(&planned) != listed(&applied) {
            return Err(format!(
                "{}: plan listed\n{:#?}\nthe apply wrote\n{:#?}",
                context(),
                listed(&planned),
                listed(&applied)
            ));
        }
        if writes(&planned) != writes(&applied) {
            return Err(format!(
                "{}: plan counted {:?}, the apply {:?}",
                context(),
                writes(&planned),
                writes(&applied)
            ));
        }
        let (would, did) = (
            planned.error.as_ref().map(ToString::to_string),
            applied.error.as_ref().map(ToString::to_string),
        );
        if would != did {
            return Err(format!(
                "{}: plan would end with {would:?}, the apply ended with {did:?}",
                context(),
            ));
        }
        let again = plan(&db.engine(&refs(&env))).await;
        if again.changes_pending() {
            return Err(format!(
                "{}: a plan after the apply still lists {:#?}",
                context(),
                listed(&again)
            ));
        }
        compared += listed(&planned).len();
    }
    Ok(compared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plan_lists_exactly_what_the_next_apply_writes_over_random_lifecycle_sequences() {
    let sequences: u64 = std::env::var("SEEDKEEPER_TEST_PLAN_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seeds: Vec<u64> = match std::env::var("SEEDKEEPER_TEST_PLAN_SEED") {
        Ok(s) => vec![s.parse().expect("SEEDKEEPER_TEST_PLAN_SEED is a number")],
        Err(_) => (0..sequences).map(|i| 0x5eed_0000 + i).collect(),
    };
    let total = seeds.len();
    let next = Arc::new(AtomicUsize::new(0));
    let seeds = Arc::new(seeds);
    let mut workers = Vec::new();
    // Four sequences at a time: each on a database of its own.
    for _ in 0..4 {
        let (next, seeds) = (next.clone(), seeds.clone());
        workers.push(tokio::spawn(async move {
            let mut items = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else {
                    return Ok::<usize, String>(items);
                };
                items += check_sequence(seed).await?;
            }
        }));
    }
    let mut items = 0;
    for w in workers {
        items += w.await.expect("worker").unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        items > total,
        "the sequences changed almost nothing: {items} items"
    );
    println!("plan = apply on {total} sequences, {items} changes compared item by item");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_by_a_role_that_cannot_write_names_the_missing_privilege_instead_of_in_sync() {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    let (role, url) = db.login_role("sk_ro", "SELECT").await;
    let out = run_bin(&["plan"], &[("SEEDKEEPER_DATABASE__URL".into(), url)]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("permission denied for table")
            && t.contains("plan runs the apply's own statements"),
        "{t}"
    );
    assert!(t.contains("could not plan"), "{t}");
    assert!(!t.contains("in sync (exit 0)"), "{t}");
    db.drop_role(&role).await;
}
