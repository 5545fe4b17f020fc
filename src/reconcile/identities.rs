//! Unit `identities`: realm users become `users` rows keyed by `keycloak_sub`, a username is never
//! taken over, and a user gone from the realm is offboarded, never deleted (docs/seeding.md,
//! the lifecycle table).
//!
//! The source streams batches into a temporary staging table with binary `COPY` while pages are
//! still arriving, so client memory stays flat; the comparison and the writes are then a handful
//! of set-based statements over the whole realm. Order inside the one transaction:
//! de-duplicate the stage, re-align rows whose username matches and whose old sub left the realm
//! (never an offboarded row: that name was reused by another person), mark username clashes
//! (never a takeover), update differing rows (reactivating offboarded users who came back),
//! insert new ones, then offboard the users gone from the realm (row kept, `is_active = false`,
//! `offboarded_at` set; the `role_bindings` unit then revokes their bindings).
//!
//! Only a complete listing knows who is gone. An event batch, or a Keycloak listing shorter than
//! `users/count`, is *narrowed*: what its listed users say is applied, and nothing that rests on
//! absence is done (no offboarding, no re-alignment away from an unlisted row); a batch offboards
//! only the users Keycloak answered 404 for. Plan runs the same classification and counts
//! instead of writing; only the temporary table is written, and the transaction is rolled back.

use std::sync::Arc;

use futures_util::pin_mut;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Settings;
use crate::error::{Error, ErrorKind, Result};
use crate::identity::{
    check_identity, printable, Duplicate, DuplicateKey, IdentityProvider, Origin, Shortfall,
    SourceStats, Staged, UniqueKeys,
};
use crate::progress::Progress;
use crate::reconcile::{Action, FindingKind, Tally, Unit, UnitReport};
use crate::store::db_error;

const UNIT: Unit = Unit::Identities;

/// Batches the source may queue ahead of the COPY.
const STAGE_QUEUE: usize = 2;

/// The stage's column types, in `COPY` order.
const STAGE_TYPES: [Type; 14] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::INT8,
    Type::INT4,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
];

/// `sub` is null only for a realm-file user without id, staged for the duplicate checks and
/// removed right after them. `origin_*`, `file_username` and `name_key` are a realm file's
/// (see [`crate::identity::Origin`]), null from Keycloak. A `granted` row is not a user: it
/// says that the user `sub` holds the one role in its `realm_roles` (a
/// [`crate::identity::Staged::Grants`] of the keycloak source), and is folded into that user's
/// row and removed once the listing is complete.
const STAGE: &str = "CREATE TEMP TABLE sk_stage (
    sub          text,
    username     text NOT NULL,
    email        text,
    first_name   text,
    last_name    text,
    is_active    boolean NOT NULL,
    role         text NOT NULL,
    realm_roles  text[] NOT NULL,
    ord          bigint NOT NULL,
    skip         boolean NOT NULL DEFAULT false,
    realigned    boolean NOT NULL DEFAULT false,
    origin_part  int4,
    origin_entry int4,
    file_username text,
    name_key     text,
    granted      boolean NOT NULL
) ON COMMIT DROP";

/// Rows whose username a realm user holds while their own sub is gone from the realm, and whose
/// new sub has no row yet: the realm was re-imported with new ids.
const REALIGN_CANDIDATES: &str =
    "SELECT u.id, s.sub AS new_sub, u.keycloak_sub AS old_sub, s.username
    FROM sk_stage s JOIN users u ON u.username = s.username
    WHERE u.keycloak_sub IS DISTINCT FROM s.sub AND u.keycloak_sub IS NOT NULL AND NOT s.skip
      AND u.offboarded_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM sk_stage s2 WHERE s2.sub = u.keycloak_sub)
      AND NOT EXISTS (SELECT 1 FROM users u2 WHERE u2.keycloak_sub = s.sub)";

/// Realm users whose username is held by a row that is not theirs and cannot be re-aligned:
/// a row without a sub, an offboarded row (another person reused the name), or a stale row
/// while the user already has its own row.
const CLASHES: &str = "SELECT s.sub, s.username, u.keycloak_sub AS holder_sub,
        to_char(u.offboarded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS offboarded_on
    FROM sk_stage s JOIN users u ON u.username = s.username
    WHERE NOT s.realigned AND NOT s.skip AND u.keycloak_sub IS DISTINCT FROM s.sub
      AND (u.keycloak_sub IS NULL
           OR (NOT EXISTS (SELECT 1 FROM sk_stage s2 WHERE s2.sub = u.keycloak_sub)
               AND (u.offboarded_at IS NOT NULL
                    OR EXISTS (SELECT 1 FROM users u2 WHERE u2.keycloak_sub = s.sub))))";

const DIFFERS: &str = "u.keycloak_sub = s.sub AND NOT s.skip
    AND (u.username, u.email, u.first_name, u.last_name, u.is_active, u.role, u.realm_roles, u.offboarded_at IS NULL)
        IS DISTINCT FROM (s.username, s.email, s.first_name, s.last_name, s.is_active, s.role, s.realm_roles, true)";

const NEW: &str = "NOT s.skip AND NOT s.realigned AND NOT EXISTS (SELECT 1 FROM users u WHERE u.keycloak_sub = s.sub)";

const MISSING: &str = "u.keycloak_sub IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM sk_stage s WHERE s.sub = u.keycloak_sub)
    AND NOT EXISTS (SELECT 1 FROM sk_stage s WHERE s.realigned AND s.username = u.username)";

/// How the run steers the source's listing: `cancel` ends it when the run is stopped, `progress`
/// counts the users listed, `started` holds the listing when the run started it before the unit
/// (see [`Listing::start`]).
#[derive(Clone, Copy)]
pub(crate) struct ListingControls<'a> {
    pub cancel: &'a CancellationToken,
    pub progress: &'a Progress,
    pub started: &'a std::sync::Mutex<Option<Listing>>,
}

/// A source's listing under way on a task of its own: the batches it sends, at most
/// `STAGE_QUEUE` of them waiting for the stage's COPY, and the task.
pub(crate) struct Listing {
    rx: mpsc::Receiver<Staged>,
    producer: tokio::task::JoinHandle<Result<SourceStats>>,
}

impl Listing {
    /// Starts the listing of `source`. The run starts a Keycloak listing as soon as it holds the
    /// run lock, so that its first pages are on their way while the schema and reference seed
    /// units run (tens of milliseconds of every run); the bounded queue holds it back until the
    /// identities unit takes the batches. The task runs in `span`: the unit's, so that the
    /// source's lines carry the run id and the unit.
    pub(crate) fn start(
        source: Arc<dyn IdentityProvider>,
        controls: ListingControls<'_>,
        span: tracing::Span,
    ) -> Self {
        let (sender, rx) = mpsc::channel(STAGE_QUEUE);
        let stream = source.stream(sender, controls.cancel.clone(), controls.progress.clone());
        let producer = tokio::spawn(stream.instrument(span));
        Listing { rx, producer }
    }
}

/// What the unit is asked to keep to: the settings (`identity.admin_roles`,
/// `identity.offboard_limit`), an operator's `--allow-offboard N`, and how many changes each
/// statement lists by key.
#[derive(Clone, Copy)]
pub(crate) struct Rules<'a> {
    pub settings: &'a Settings,
    pub allow_offboard: Option<i64>,
    pub listed: i64,
    /// Whether the unit records its state for the next run (an apply's; see [`state_key`]).
    pub record: bool,
}

/// Applies the identities of `source` inside `tx` (a plan's is rolled back), phase by phase.
pub(crate) async fn reconcile(
    tx: &Transaction<'_>,
    source: Arc<dyn IdentityProvider>,
    listing: ListingControls<'_>,
    rules: Rules<'_>,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    // Re-alignments and renames may swap usernames within the unit: checked once it is done.
    tx.batch_execute("SET CONSTRAINTS users_username_key DEFERRED")
        .await
        .map_err(db_error("deferring the username check"))?;
    let admin_roles = &rules.settings.identity.admin_roles;
    let key = state_key(&*source, admin_roles);
    let applied = match &key {
        Some((key, users)) => applied_before(tx, key, *users, listing.progress).await?,
        None => None,
    };
    let (narrowed, cmp) = match applied {
        Some(cmp) => {
            report.bump(Tally::Listed, cmp.staged);
            report.bump(Tally::Rejected, 0);
            (false, cmp)
        }
        None => {
            // The stage is de-duplicated inside `stage`: the count check needs the repeats removed.
            let shortfall = stage(tx, source.clone(), listing, admin_roles, &mut report).await?;
            let batch = source.batch().is_some();
            // Only a complete listing can tell who is gone from the realm.
            let narrowed = batch || shortfall.is_some();
            if let Some(short) = shortfall {
                note_shortfall(&short, &mut report);
            }
            if narrowed {
                let next = if batch {
                    "left to the full run this starts"
                } else {
                    "left to the next complete listing"
                };
                defer_held_usernames(tx, next, &mut report).await?;
            }
            let digest = key.is_some() && rules.record && !narrowed;
            (narrowed, compare(tx, !narrowed, digest).await?)
        }
    };
    // Re-alignment and clashes can only concern realm users whose sub has no row yet or whose
    // username changed; when there are none (every steady-state run) both checks are skipped.
    let (realigned, clashes) = if cmp.unsettled == 0 {
        (0, 0)
    } else {
        let realigned = realign(tx, rules.listed, &mut report).await?;
        (realigned, clash(tx, &mut report).await?)
    };
    report.bump(Action::Realigned, realigned);
    report.bump(Tally::Clashes, clashes);
    let changes = if cmp.changed == 0 {
        Changes::default()
    } else {
        write_changes(tx, rules.listed, &mut report).await?
    };
    report.bump(Action::Updated, changes.updated);
    report.bump(Action::Inserted, changes.inserted);
    report.bump(Action::Reactivated, changes.reactivated);
    // A clash marks its stage row skipped after the comparison counted it.
    let staged = cmp.staged - clashes;
    let unchanged =
        (staged - changes.inserted - changes.updated - changes.reactivated - realigned).max(0);
    report.bump(Tally::Unchanged, unchanged);
    // Only a re-alignment moves a row from one sub to another after the comparison; updates and
    // inserts touch listed subs only, so without one the comparison's count of missing rows holds.
    let missing = match cmp.missing {
        Some(m) if realigned == 0 => m,
        _ if narrowed => (0, 0),
        _ => count_missing(tx).await?,
    };
    let deactivated = offboard_gone(tx, &*source, &rules, narrowed, missing, &mut report).await?;
    report.bump(Action::Deactivated, deactivated);
    tx.batch_execute("SET CONSTRAINTS users_username_key IMMEDIATE")
        .await
        .map_err(db_error("checking usernames are unique"))?;
    let wrote = realigned + changes.inserted + changes.updated + changes.reactivated + deactivated;
    if rules.record {
        // Before the comparison below, which a plan made from an empty table's statistics
        // (the first run's) took 1.8 s instead of 0.6 s at a million rows.
        super::analyze_if_written(
            tx,
            "users (id, keycloak_sub, username, offboarded_at, is_active, role)",
            wrote,
        )
        .await?;
    }
    let clean = report.findings.is_empty() && report.blocking.is_empty();
    if let Some((key, _)) = key.filter(|_| rules.record && clean && !narrowed) {
        let digest = if wrote == 0 {
            cmp.digest
        } else {
            let written = changes.written(&cmp, realigned + deactivated);
            settled_digest(tx, cmp.digest.as_deref().zip(written)).await?
        };
        report.state = digest.map(|d| format!("{key} {d}"));
    }
    Ok(report)
}

/// What decides the stage a listing makes, as one digest: the source's fingerprint (a realm
/// file's bytes, the realm read, the roles kept) and `identity.admin_roles` (the build is in
/// every recorded state's stamp, see `store::runs`). With it, the users the listing sends.
/// `None` for a source that has no fingerprint (it must be listed to be known).
///
/// A run whose key and users rows match the state the latest settled run recorded skips its
/// stage ([`super::settled_row`]): the state is recorded only when the unit ends with nothing
/// left to change and nothing to report ([`settled_digest`]), so the same listing over the same
/// rows would change nothing again, and its counts are known without it ([`applied_before`]).
/// "A no-op that reads and compares": 3.6 s of a 6.3 s no-op at a million users was staging and
/// comparing what both digests prove unchanged (docs/benchmark.md).
fn state_key(source: &dyn IdentityProvider, admin_roles: &[String]) -> Option<(String, u64)> {
    use sha2::{Digest, Sha256};
    let fp = source.fingerprint()?;
    let mut d = Sha256::new();
    d.update(fp.digest.as_bytes());
    d.update([0]);
    let mut roles: Vec<&str> = admin_roles.iter().map(String::as_str).collect();
    roles.sort_unstable();
    for r in roles {
        d.update(r.as_bytes());
        d.update([0]);
    }
    d.update(fp.users.to_be_bytes());
    Some((crate::seed::hex(&d.finalize()), fp.users))
}

/// The 64-bit hash [`USERS_DIGEST`] sums, of the users row `$t`: what the unit compares.
macro_rules! users_hash {
    ($t:literal) => {
        concat!(
            "hash_record_extended((", $t, ".keycloak_sub, ", $t, ".username, ", $t, ".email, ",
            $t, ".first_name, ", $t, ".last_name, ", $t, ".is_active, ", $t, ".role, ",
            $t, ".realm_roles, ", $t, ".offboarded_at IS NULL), 0)"
        )
    };
}

/// Every users row as the unit compares it, in one digest of the table `u` (rows where `u.id` is
/// null, a full join's unmatched stage rows, left out): the count and the sum of the rows'
/// 64-bit hashes (0.2 s at a million rows).
const USERS_DIGEST: &str = concat!(
    "count(u.id)::text || ' ' || coalesce(sum(",
    users_hash!("u"),
    ") FILTER (WHERE u.id IS NOT NULL), 0)::text"
);

/// Whether the listing named by `key` was applied, with nothing left to change, to users rows
/// that have not changed since: the latest recorded state is this key's and the rows' digest
/// is the one recorded. Then the listing's comparison is known without staging it: every user
/// listed has its row, unchanged, and every other row with a sub is offboarded already. The
/// progress is told the listing as the stream would tell it.
async fn applied_before(
    tx: &Transaction<'_>,
    key: &str,
    users: u64,
    progress: &Progress,
) -> Result<Option<Comparison>> {
    let sql = format!("SELECT {USERS_DIGEST}, count(u.keycloak_sub) FROM users u");
    let context = "reading the digest of the users rows";
    let prefix = format!("{key} ");
    let Some(now) = super::settled_row(tx, UNIT, &prefix, (&sql, &[]), context).await? else {
        return Ok(None);
    };
    let (digest, with_sub): (String, i64) = (now.get(0), now.get(1));
    progress.listing_started(Some(users));
    progress.listed(users);
    progress.listing_done();
    let staged = users as i64;
    Ok(Some(Comparison {
        unsettled: 0,
        changed: 0,
        staged,
        missing: Some(((with_sub - staged).max(0), 0)),
        digest: Some(digest),
    }))
}

/// The users rows' digest once the unit's writes are done, when they left nothing to change.
/// `None` when something is still left (the state is then not recorded).
///
/// `accounted`: the comparison's digest from before the writes, and what the writes changed in
/// it, when they wrote every change the comparison found and nothing else
/// ([`Changes::written`]): one scan of the table then proves the rows settled
/// ([`super::settled_as_written`]; 0.2 s at a million rows). Otherwise, or when the digest is
/// not the one expected, a second comparison of the whole stage (0.9 s), in one snapshot with
/// the digest.
async fn settled_digest(
    tx: &Transaction<'_>,
    accounted: Option<(&str, (i64, i128))>,
) -> Result<Option<String>> {
    if let Some(expected) = accounted.and_then(|(before, added)| super::digest_with(before, &[added])) {
        let sql = format!("SELECT {USERS_DIGEST} FROM users u");
        let context = "reading the digest of the users rows";
        let now = super::settled_as_written(tx, UNIT, &sql, &expected, context).await?;
        if now.is_some() {
            return Ok(now);
        }
    }
    let cmp = compare(tx, true, true).await?;
    let settled = cmp.unsettled == 0 && cmp.changed == 0 && cmp.missing.is_some_and(|m| m.1 == 0);
    Ok(cmp.digest.filter(|_| settled))
}

/// Users gone from the realm: offboarded, never deleted, and never more than the limit at once.
/// A complete listing says it of every user it lacks (`missing`: all of them, those not
/// offboarded yet); a narrowed one only of the users Keycloak answered 404 for. Returns how many
/// were offboarded.
async fn offboard_gone(
    tx: &Transaction<'_>,
    source: &dyn IdentityProvider,
    rules: &Rules<'_>,
    narrowed: bool,
    (missing, to_offboard): (i64, i64),
    report: &mut UnitReport,
) -> Result<i64> {
    if !narrowed {
        report.bump(Tally::Missing, missing);
        let why = format!("not in the complete {} listing", source.name());
        let gone = Gone {
            which: MISSING,
            params: &[],
            why: &why,
            whole_realm: true,
        };
        return offboard_within_limit(tx, rules, to_offboard, gone, report).await;
    }
    let gone_subs = source.gone();
    if gone_subs.is_empty() {
        return Ok(0);
    }
    let only = "u.keycloak_sub = ANY ($1::text[])";
    let params: &[(&(dyn ToSql + Sync), Type)] = &[(&gone_subs, Type::TEXT_ARRAY)];
    let to_offboard = count_to_offboard(tx, only, params).await?;
    let gone = Gone {
        which: only,
        params,
        why: "GET users/{id} answered 404 (deleted in Keycloak)",
        whole_realm: false,
    };
    offboard_within_limit(tx, rules, to_offboard, gone, report).await
}

/// Users found gone from the realm: the rows (`which`, a condition on `users u`, with its
/// `params`), why they are known to be gone, and whether a complete listing found them (which
/// can find "everyone", where an event batch names users one by one).
struct Gone<'a> {
    which: &'a str,
    params: &'a [(&'a (dyn ToSql + Sync), Type)],
    why: &'a str,
    whole_realm: bool,
}

/// Offboards the users found gone, unless that is more than `identity.offboard_limit` allows,
/// or every user in the realm (a complete listing that looks empty): then nobody is offboarded,
/// the rest of the run is applied, and a finding that fails the run says so. `--allow-offboard N`
/// lets exactly N through; any other number rolls the unit back and stops the run. Returns how
/// many were offboarded.
async fn offboard_within_limit(
    tx: &Transaction<'_>,
    rules: &Rules<'_>,
    to_offboard: i64,
    gone: Gone<'_>,
    report: &mut UnitReport,
) -> Result<i64> {
    if let Some(allowed) = rules.allow_offboard {
        report.bump(Tally::OffboardAllowed, allowed);
        if allowed != to_offboard {
            return Err(Error::OffboardMismatch {
                allowed,
                would: to_offboard,
            });
        }
    }
    if to_offboard == 0 {
        return Ok(0);
    }
    if rules.allow_offboard.is_some() {
        return offboard(tx, &gone, rules.listed, report).await;
    }
    let in_realm: i64 = tx
        .query_typed_one(
            "SELECT count(*) FROM users WHERE keycloak_sub IS NOT NULL AND offboarded_at IS NULL",
            &[],
        )
        .await
        .map_err(db_error("counting the users in the realm"))?
        .get(0);
    let setting = rules.settings.identity.offboard_limit;
    let limit = setting.resolve(in_realm);
    report.bump(Tally::OffboardLimit, limit);
    let everyone = gone.whole_realm && to_offboard >= in_realm;
    if to_offboard <= limit && !everyone {
        return offboard(tx, &gone, rules.listed, report).await;
    }
    let why = if everyone {
        format!("every one of the {in_realm} user(s) in the realm would be offboarded (the listing has none of them): an input that looks empty is not evidence that everyone left")
    } else {
        format!("{to_offboard} of the {in_realm} user(s) in the realm would be offboarded, more than identity.offboard_limit ({setting}: {limit} user(s))")
    };
    let detail = format!(
        "{why}. Nobody was offboarded; everything else was applied. Check the source ({}); if these users did leave, run `seedkeeper --once --allow-offboard {to_offboard}` (exactly this number), or raise identity.offboard_limit (SEEDKEEPER_IDENTITY__OFFBOARD_LIMIT)",
        gone.why
    );
    tracing::error!(
        unit = UNIT.as_str(),
        would_offboard = to_offboard,
        limit,
        in_realm,
        "offboarding stopped"
    );
    report.find(FindingKind::OffboardStopped, "realm", detail.clone());
    report.bump(Tally::OffboardStopped, to_offboard);
    report.blocking.push((
        ErrorKind::OffboardLimit,
        format!("identities: offboarding stopped: {detail}"),
    ));
    Ok(0)
}

/// Streams the source into the temporary stage with binary `COPY`. The producer runs as its own
/// task so a blocking reader (the realm file) never stalls the COPY that drains it, and the
/// COPY takes each batch as it arrives. Identities with an invalid value are refused one by
/// one, as are the users the source could not give a sub (a realm-file user without id). Once
/// the listing is complete, what needs all of it runs over the stage (see [`settle`]): nothing
/// here holds more than a batch, whatever the size of the realm.
async fn stage(
    tx: &Transaction<'_>,
    source: Arc<dyn IdentityProvider>,
    listing: ListingControls<'_>,
    admin_roles: &[String],
    report: &mut UnitReport,
) -> Result<Option<Shortfall>> {
    tx.batch_execute(STAGE)
        .await
        .map_err(db_error("creating the identity stage"))?;
    // Batches in flight: this many queued, one being built, one being copied. Each holds up to
    // `database.batch_size` identities (about 0.5 MB at the default 1,000), the run's largest
    // holding; a deeper queue adds memory and no speed, as the COPY is the slower side. Smaller
    // batches cost nothing measurable: 1,000 against 5,000 took 14 instead of 22 MiB and no
    // longer at a million users (docs/benchmark.md).
    let started = listing.started.lock().ok().and_then(|mut l| l.take());
    let Listing { rx, producer } =
        started.unwrap_or_else(|| Listing::start(source.clone(), listing, tracing::Span::current()));
    // The COPY stays open for the whole listing, whose length is Keycloak's (bounded by
    // run.timeout, not by database.statement_timeout, which applies again right after it).
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(db_error("lifting statement_timeout for the identity stage"))?;
    let copied = copy_batches(tx, rx, admin_roles, report).await;
    // A failed COPY drops the receiver, which ends the producer at its next batch; the COPY's
    // error is then the one that says what went wrong.
    let produced = producer
        .await
        .map_err(|e| Error::Io(format!("identity source task failed: {e}")));
    let copied = copied?;
    let stats = produced??;
    tx.batch_execute("SET LOCAL statement_timeout TO DEFAULT")
        .await
        .map_err(db_error("restoring statement_timeout after the identity stage"))?;
    settle(tx, source.as_ref(), stats, copied, admin_roles, report).await
}

/// What the COPY took: rows received (`ord`'s last value), those refused, the users without
/// a sub that were staged for the duplicate checks only, and the grants (not users).
#[derive(Debug, Clone, Copy, Default)]
struct Copied {
    received: i64,
    rejected: i64,
    keyless: i64,
    grants: i64,
    /// Rows whose file username is not their username (see [`crate::identity::Origin`]).
    name_keys: i64,
}

const NO_TEXT: Option<&str> = None;
const NO_INT: Option<i32> = None;

/// The COPY into the stage, batch by batch as the source sends them.
async fn copy_batches(
    tx: &Transaction<'_>,
    mut rx: mpsc::Receiver<Staged>,
    admin_roles: &[String],
    report: &mut UnitReport,
) -> Result<Copied> {
    let sink = tx
        .copy_in("COPY sk_stage (sub, username, email, first_name, last_name, is_active, role, realm_roles, ord, origin_part, origin_entry, file_username, name_key, granted) FROM STDIN BINARY")
        .await
        .map_err(db_error("starting COPY into the identity stage"))?;
    let writer = BinaryCopyInWriter::new(sink, &STAGE_TYPES);
    pin_mut!(writer);
    let mut copied = Copied::default();
    while let Some(staged) = rx.recv().await {
        let batch = match staged {
            Staged::Identities(batch) => batch,
            Staged::Grants(grants) => {
                copied.grants += grants.len() as i64;
                for g in grants {
                    // Its sub and its one role; `ord` 0, as it is not a listed user.
                    let roles: &[&str] = &[g.role.as_str()];
                    let row: [&(dyn ToSql + Sync); 14] = [
                        &g.sub, &"", &NO_TEXT, &NO_TEXT, &NO_TEXT, &false, &"user", &roles, &0i64,
                        &NO_INT, &NO_INT, &NO_TEXT, &NO_TEXT, &true,
                    ];
                    writer
                        .as_mut()
                        .write(&row)
                        .await
                        .map_err(db_error("writing the identity stage"))?;
                }
                continue;
            }
        };
        for ident in batch {
            copied.received += 1;
            // A realm-file user without id: staged without a sub, for the username check.
            let keyless = ident.origin.is_some() && ident.sub.is_empty();
            if keyless {
                copied.keyless += 1;
            } else if let Err(why) = check_identity(&ident) {
                copied.rejected += 1;
                let sub = printable(&ident.sub);
                tracing::warn!(unit = UNIT.as_str(), user.sub = %sub, reason = %why, "identity refused");
                report.find(FindingKind::Rejected, format!("sub:{sub}"), why);
                continue;
            }
            let admin = ident.realm_roles.iter().any(|r| admin_roles.contains(r));
            let role = if admin { "admin" } else { "user" };
            let sub = (!keyless).then_some(&ident.sub);
            let origin = ident.origin.as_ref();
            let part = origin.map(|o| o.part as i32);
            let entry = origin.map(|o| o.entry as i32);
            let file_username = origin.map(|o| o.username.as_str());
            let name_key = origin.and_then(|o| o.name_key.as_deref());
            copied.name_keys += i64::from(name_key.is_some());
            let row: [&(dyn ToSql + Sync); 14] = [
                &sub,
                &ident.username,
                &ident.email,
                &ident.first_name,
                &ident.last_name,
                &ident.enabled,
                &role,
                &ident.realm_roles,
                &copied.received,
                &part,
                &entry,
                &file_username,
                &name_key,
                &false,
            ];
            writer
                .as_mut()
                .write(&row)
                .await
                .map_err(db_error("writing the identity stage"))?;
        }
    }
    writer
        .finish()
        .await
        .map_err(db_error("finishing COPY into the identity stage"))?;
    Ok(copied)
}

/// What needs the whole listing, over the stage: the source's duplicate checks (a realm file's
/// duplicates refuse it, naming both users), the roles resolved beside the listing, the
/// de-duplication of paging repeats, and the count check against the source's own count.
async fn settle(
    tx: &Transaction<'_>,
    source: &dyn IdentityProvider,
    stats: SourceStats,
    copied: Copied,
    admin_roles: &[String],
    report: &mut UnitReport,
) -> Result<Option<Shortfall>> {
    if copied.grants > 0 {
        apply_grants(tx, admin_roles).await?;
    }
    let keys = source.unique_keys();
    let built = if keys.any() {
        check_unique(tx, source, keys, copied.name_keys == 0).await?
    } else {
        Built::default()
    };
    if copied.keyless > 0 {
        tx.execute_typed("DELETE FROM sk_stage WHERE sub IS NULL", &[])
            .await
            .map_err(db_error("clearing the stage's users without id"))?;
    }

    let repeats = dedupe(tx, built, report).await?;
    report.bump(Tally::Listed, stats.listed.saturating_sub(repeats) as i64);
    for r in stats.rejections {
        tracing::warn!(unit = UNIT.as_str(), entity = %r.entity, reason = %r.detail, "identity refused");
        report.find(FindingKind::Rejected, r.entity, r.detail);
    }
    report.bump(Tally::Rejected, copied.rejected + stats.rejected as i64);
    // Distinct users listed: every row received but the repeats and the id-less users (a
    // realm file's, which has no count), and the users the source never sent.
    let staged = (copied.received - copied.keyless).max(0) as u64;
    let distinct = staged.saturating_sub(repeats) + stats.unsent;
    let short = stats
        .counted
        .filter(|&c| distinct < c)
        .map(|counted| Shortfall {
            listed: distinct,
            counted,
        });
    Ok(stats.shortfall.or(short))
}

/// Users sharing an id, a file username (case aside) or an email with an earlier user of the
/// listing, each paired with the closest earlier one: the first [`DUPLICATES_SHOWN`] in
/// listing order (ids and usernames user by user, then emails, as the realm file's own check
/// lists them), and how many in all.
const DUPLICATES: &str = "WITH k AS (
        SELECT 0 AS key, sub AS v, ord FROM sk_stage WHERE $1 AND sub IS NOT NULL
        UNION ALL
        SELECT 1, coalesce(name_key, username), ord FROM sk_stage WHERE $2
        UNION ALL
        SELECT 2, email, ord FROM sk_stage WHERE $3 AND email IS NOT NULL
    ), d AS (
        SELECT key, v, ord, lag(ord) OVER (PARTITION BY key, v ORDER BY ord) AS prev FROM k
    )
    SELECT d.key, d.v, a.origin_part, a.origin_entry, coalesce(a.file_username, a.username),
           b.origin_part, b.origin_entry, coalesce(b.file_username, b.username), count(*) OVER ()
    FROM d JOIN sk_stage a ON a.ord = d.ord JOIN sk_stage b ON b.ord = d.prev
    WHERE d.prev IS NOT NULL
    ORDER BY d.key = 2, d.ord, d.key
    LIMIT $4";

/// How many duplicates the refusal names; the rest are counted.
const DUPLICATES_SHOWN: i64 = 20;

/// The stage's unique indexes already built, which [`dedupe`] then need not build.
#[derive(Debug, Clone, Copy, Default)]
struct Built {
    sub: bool,
    username: bool,
}

const BY_SUB: &str = "CREATE UNIQUE INDEX sk_stage_sub ON sk_stage (sub)";
const BY_USERNAME: &str = "CREATE UNIQUE INDEX sk_stage_username ON sk_stage (username)";

/// Proves the keys the source says must be unique are so with unique indexes over the stage
/// (a sort each, where finding and naming the duplicates is a sort of all three keys at once):
/// only when one fails are the duplicates looked for, and the input refused naming them. Subs
/// are indexed as [`dedupe`] indexes them, and so are usernames when each user's username is its
/// file username (`names_are_usernames`); those indexes are kept for it. Keyless rows have no
/// sub, so the id index passes over them as the duplicate check does.
async fn check_unique(
    tx: &Transaction<'_>,
    source: &dyn IdentityProvider,
    keys: UniqueKeys,
    names_are_usernames: bool,
) -> Result<Built> {
    let mut built = Built::default();
    let mut unique = true;
    if keys.ids {
        built.sub = try_unique_index(tx, BY_SUB).await?;
        unique = built.sub;
    }
    if unique && keys.usernames {
        unique = if names_are_usernames {
            built.username = try_unique_index(tx, BY_USERNAME).await?;
            built.username
        } else {
            try_unique_index(
                tx,
                "CREATE UNIQUE INDEX sk_stage_name_key ON sk_stage ((coalesce(name_key, username)))",
            )
            .await?
        };
    }
    if unique && keys.emails {
        unique = try_unique_index(tx, "CREATE UNIQUE INDEX sk_stage_email ON sk_stage (email)")
            .await?;
    }
    if !unique {
        refuse_duplicates(tx, source, keys).await?;
    }
    Ok(built)
}

/// Refuses the listing when it holds a key twice that the source says must be unique: the
/// source's own error (a realm file's names both users and the fix), and the unit's
/// transaction rolled back with it, so nothing of the listing is written.
async fn refuse_duplicates(
    tx: &Transaction<'_>,
    source: &dyn IdentityProvider,
    keys: UniqueKeys,
) -> Result<()> {
    let rows = tx
        .query_typed(
            DUPLICATES,
            &[
                (&keys.ids, Type::BOOL),
                (&keys.usernames, Type::BOOL),
                (&keys.emails, Type::BOOL),
                (&DUPLICATES_SHOWN, Type::INT8),
            ],
        )
        .await
        .map_err(db_error("looking for duplicates in the identity stage"))?;
    let Some(total) = rows.first().map(|r| r.get::<_, i64>(8)) else {
        return Ok(());
    };
    let origin = |r: &tokio_postgres::Row, at: usize| Origin {
        part: r.get::<_, Option<i32>>(at).unwrap_or(0) as u32,
        entry: r.get::<_, Option<i32>>(at + 1).unwrap_or(0) as u32,
        username: r.get(at + 2),
        name_key: None,
    };
    let found = rows
        .iter()
        .map(|r| Duplicate {
            key: match r.get::<_, i32>(0) {
                0 => DuplicateKey::Id,
                1 => DuplicateKey::Username,
                _ => DuplicateKey::Email,
            },
            value: r.get(1),
            at: origin(r, 2),
            prev: origin(r, 5),
        })
        .collect();
    Err(source.refuse_duplicates(found, total as u64))
}

/// Gives the staged users the roles granted beside the listing (they were sent without any),
/// then removes the grants. Roles are ordered by bytes, as the sources order them
/// (`COLLATE "C"`), so an unchanged row compares equal.
async fn apply_grants(tx: &Transaction<'_>, admin_roles: &[String]) -> Result<()> {
    tx.execute_typed(
        "UPDATE sk_stage s SET realm_roles = g.roles,
                role = CASE WHEN g.roles && $1::text[] THEN 'admin' ELSE 'user' END
         FROM (SELECT sub, array_agg(DISTINCT r COLLATE \"C\" ORDER BY r COLLATE \"C\") AS roles
               FROM sk_stage, unnest(realm_roles) AS r WHERE granted GROUP BY sub) g
         WHERE s.sub = g.sub AND NOT s.granted",
        &[(&admin_roles, Type::TEXT_ARRAY)],
    )
    .await
    .map_err(db_error("giving the identity stage its granted roles"))?;
    tx.execute_typed("DELETE FROM sk_stage WHERE granted", &[])
        .await
        .map_err(db_error("clearing the grants from the identity stage"))?;
    Ok(())
}

/// A listing shorter than the source's count: the run goes on, narrowed to the listed users,
/// and says so where an operator looks (a finding under `!` in `plan`, the `unlisted` count,
/// the `seedkeeper_identities_unlisted` gauge).
fn note_shortfall(short: &Shortfall, report: &mut UnitReport) {
    let unlisted = short.unlisted();
    tracing::warn!(
        unit = UNIT.as_str(),
        users.listed = short.listed,
        users.count = short.counted,
        unlisted,
        "the user listing is short of users/count; the run is narrowed to the listed users"
    );
    report.find(
        FindingKind::Unlisted,
        "realm".to_string(),
        format!(
            "the user listing returned {} distinct users but GET users/count reported {} ({unlisted} unlisted): the listed users were applied, and nothing was concluded from absence (no user offboarded, no username re-aligned away from an unlisted row). Likely causes: users of a user storage provider the realm no longer has (a removed LDAP or Kerberos federation, or ids naming one), fine-grained admin permissions hiding users from the service account, a federation provider capping its results, or users created and deleted while the listing ran",
            short.listed, short.counted
        ),
    );
    report.bump(Tally::Unlisted, unlisted as i64);
}

/// Paging can repeat a user when the realm changes during the listing. The unique indexes
/// prove there is none in the common case; only when one fails is the stage de-duplicated
/// (first copy kept) and the index built again. A username listed for two subs is refused.
/// The indexes [`check_unique`] already built (`built`) prove the same. Returns how many
/// repeated subs were removed.
async fn dedupe(tx: &Transaction<'_>, built: Built, report: &mut UnitReport) -> Result<u64> {
    // A small sample (3,000 rows, not 30,000): the row count and the keys' spread are all the
    // comparison's plans need of a table dropped at commit (0.14 s less at 100,000 users).
    tx.batch_execute(
        "SET LOCAL default_statistics_target = 10; ANALYZE sk_stage;
         SET LOCAL default_statistics_target TO DEFAULT",
    )
        .await
        .map_err(db_error("analyzing the identity stage"))?;
    let mut repeats = 0;
    if !built.sub && !try_unique_index(tx, BY_SUB).await? {
        let dup = tx
            .execute_typed(
                "DELETE FROM sk_stage a USING sk_stage b WHERE a.sub = b.sub AND a.ord > b.ord",
                &[],
            )
            .await
            .map_err(db_error("de-duplicating the identity stage"))?;
        report.bump(Tally::Duplicates, dup as i64);
        repeats = dup;
        tx.batch_execute(BY_SUB)
            .await
            .map_err(db_error("indexing the identity stage"))?;
    }
    if !built.username && !try_unique_index(tx, BY_USERNAME).await? {
        let rows = tx
            .query_typed("DELETE FROM sk_stage a USING sk_stage b WHERE a.username = b.username AND a.ord > b.ord RETURNING a.sub, a.username", &[])
            .await
            .map_err(db_error("checking usernames in the identity stage"))?;
        for r in &rows {
            let (sub, username): (String, String) = (r.get(0), r.get(1));
            let why = format!("username {username:?} is listed for two subs by the source");
            report.find(FindingKind::Rejected, format!("sub:{sub}"), why);
        }
        report.bump(Tally::Rejected, rows.len() as i64);
        tx.batch_execute(BY_USERNAME)
            .await
            .map_err(db_error("indexing the identity stage"))?;
    }
    Ok(repeats)
}

/// A narrowed stage (an event batch, a short listing) cannot tell whether a username held by a
/// sub it does not list belongs to a user who left the realm (re-align) or to one who is still
/// in it, unlisted or under another name (a clash): such users are left to a complete listing
/// (`next` says which). A holder the stage lists is renaming too, and settles at commit.
async fn defer_held_usernames(
    tx: &Transaction<'_>,
    next: &str,
    report: &mut UnitReport,
) -> Result<()> {
    let rows = tx
        .query_typed(
            "UPDATE sk_stage s SET skip = true FROM users u
             WHERE u.username = s.username AND u.keycloak_sub IS DISTINCT FROM s.sub
               AND NOT EXISTS (SELECT 1 FROM sk_stage s2 WHERE s2.sub = u.keycloak_sub)
             RETURNING s.username",
            &[],
        )
        .await
        .map_err(db_error("checking the event batch against held usernames"))?;
    for r in &rows {
        let username: String = r.get(0);
        report.find(
            FindingKind::Deferred,
            format!("user:{username}"),
            format!("the username is held by a row this listing does not list; {next}"),
        );
    }
    report.bump(Tally::Deferred, rows.len() as i64);
    Ok(())
}

/// What [`compare`] found in its one pass.
struct Comparison {
    /// Realm users with no row yet or a changed username: the only ones re-alignment and
    /// clashes concern.
    unsettled: i64,
    /// Realm users who are new or differ at all: when none does, the update and insert
    /// statements are skipped.
    changed: i64,
    /// Stage rows not skipped.
    staged: i64,
    /// For a complete listing, the rows with a sub it lacks: `(all, not offboarded yet)`.
    missing: Option<(i64, i64)>,
    /// The users rows' digest ([`USERS_DIGEST`]), in the comparison's snapshot, when asked.
    digest: Option<String>,
}

/// One pass over the stage against `users`. For a complete listing (`whole`) the join is a full
/// one, so the same pass counts the rows the listing lacks, and can take the users rows'
/// `digest`; an event batch's few stage rows are looked up by sub instead, never a scan of the
/// whole table.
async fn compare(tx: &Transaction<'_>, whole: bool, digest: bool) -> Result<Comparison> {
    let (join, missing) = if whole {
        (
            "FULL JOIN",
            "count(*) FILTER (WHERE s.sub IS NULL AND u.keycloak_sub IS NOT NULL),
             count(*) FILTER (WHERE s.sub IS NULL AND u.keycloak_sub IS NOT NULL AND u.offboarded_at IS NULL)",
        )
    } else {
        ("LEFT JOIN", "0::bigint, 0::bigint")
    };
    let sql = format!(
        "SELECT count(*) FILTER (WHERE s.sub IS NOT NULL AND (u.id IS NULL OR u.username <> s.username)),
                count(*) FILTER (WHERE s.sub IS NOT NULL AND (u.id IS NULL OR ({DIFFERS}))),
                count(*) FILTER (WHERE s.sub IS NOT NULL AND NOT s.skip),
                {missing}, {digest}
         FROM sk_stage s {join} users u ON u.keycloak_sub = s.sub",
        digest = if whole && digest { USERS_DIGEST } else { "NULL::text" },
    );
    let row = tx
        .query_typed_one(&sql, &[])
        .await
        .map_err(db_error("comparing the identity stage"))?;
    Ok(Comparison {
        unsettled: row.get(0),
        changed: row.get(1),
        staged: row.get(2),
        missing: whole.then(|| (row.get(3), row.get(4))),
        digest: row.get(5),
    })
}

/// Rows whose username a realm user holds while their old sub left the realm move to the new
/// sub (the realm was re-imported with new ids). Returns how many.
async fn realign(tx: &Transaction<'_>, listed: i64, report: &mut UnitReport) -> Result<i64> {
    let sql = format!(
        "WITH cand AS ({REALIGN_CANDIDATES}),
         upd AS (UPDATE users u SET keycloak_sub = c.new_sub, updated_at = now(), synced_at = now()
                 FROM cand c WHERE u.id = c.id RETURNING c.new_sub, c.old_sub, c.username),
         mark AS (UPDATE sk_stage s SET realigned = true FROM upd WHERE s.sub = upd.new_sub RETURNING 1)
         SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM mark), username, old_sub, new_sub
         FROM upd ORDER BY username LIMIT {listed}"
    );
    let rows = tx
        .query_typed(&sql, &[])
        .await
        .map_err(db_error("re-aligning users to new subs"))?;
    let realigned: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        let (username, old, new): (String, String, String) = (r.get(2), r.get(3), r.get(4));
        report.find(
            FindingKind::Realigned,
            format!("user:{username}"),
            format!("sub {old} is gone from the realm; row re-aligned to {new}"),
        );
        keys.push(format!("users:{username} (sub {old} -> {new})"));
    }
    report.add_changes("realign", realigned, keys);
    Ok(realigned)
}

/// Realm users whose username another row holds: reported one by one and skipped, never a
/// takeover; any makes the run fail. Returns how many.
async fn clash(tx: &Transaction<'_>, report: &mut UnitReport) -> Result<i64> {
    let rows = tx
        .query_typed(&format!("WITH c AS ({CLASHES}) UPDATE sk_stage s SET skip = true FROM c WHERE s.sub = c.sub RETURNING c.sub, c.username, c.holder_sub, c.offboarded_on"), &[])
        .await
        .map_err(db_error("checking username clashes"))?;
    for r in &rows {
        let (sub, username, holder, offboarded_on): (
            String,
            String,
            Option<String>,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let detail = match (holder, offboarded_on) {
            (Some(h), Some(on)) => format!("username {username:?} belongs to the row of sub {h}, offboarded on {on} (gone from the realm); realm user {sub} is another person reusing the name and was not stored, so it inherits none of that row's tenant and data. Decide by hand: rename one of them in Keycloak, or, if it is the same person, set that row's keycloak_sub to {sub} (the next run reactivates it)"),
            (None, _) => format!("username {username:?} belongs to a users row without a keycloak_sub (not created by sync); realm user {sub} was not stored. Rename one of them, or set that row's keycloak_sub to {sub} if it is the same person"),
            (Some(h), None) => format!("username {username:?} belongs to the row of sub {h}, which left the realm, while realm user {sub} already has its own row; resolve by hand (rename or retire the old row)"),
        };
        report.find(FindingKind::Clash, format!("user:{username}"), detail);
    }
    if !rows.is_empty() {
        report.blocking.push((
            ErrorKind::IdentityClash,
            format!(
                "identities: {} username clash(es) left unresolved (see the run's findings); no row was taken over",
                rows.len()
            ),
        ));
    }
    Ok(rows.len() as i64)
}

/// What [`write_changes`] wrote.
#[derive(Debug, Default, Clone, Copy)]
struct Changes {
    /// Rows that differed, re-aligned and reactivated ones aside.
    updated: i64,
    inserted: i64,
    /// Offboarded rows whose sub the source lists again.
    reactivated: i64,
    /// What the writes changed in the sum of [`USERS_DIGEST`]: the hashes of the rows written
    /// less those of the rows they replaced (`None` if PostgreSQL's sums could not be read).
    hashes: Option<i128>,
}

impl Changes {
    /// The rows the writes added to the users table and their hashes' sum, when every change
    /// the comparison `cmp` found was written and the unit wrote nothing else (`other`: rows
    /// re-aligned or offboarded), so that the rows now are the compared ones with those
    /// changes (see [`settled_digest`]).
    fn written(&self, cmp: &Comparison, other: i64) -> Option<(i64, i128)> {
        let all = self.inserted + self.updated + self.reactivated == cmp.changed;
        let none_gone = cmp.missing.is_some_and(|m| m.1 == 0);
        let hashes = self.hashes.filter(|_| all && none_gone && other == 0)?;
        Some((self.inserted, hashes))
    }
}

/// Updates the rows that differ (reactivating offboarded users who came back under their sub)
/// and inserts the new users, listing up to `listed` of each. A re-aligned row that also
/// changed counts as re-aligned only.
async fn write_changes(
    tx: &Transaction<'_>,
    listed: i64,
    report: &mut UnitReport,
) -> Result<Changes> {
    // `prev` is the row before this statement: whether it was offboarded.
    let sql = format!(
        "WITH upd AS (UPDATE users u SET username = s.username, email = s.email, first_name = s.first_name,
                last_name = s.last_name, is_active = s.is_active, role = s.role, realm_roles = s.realm_roles,
                offboarded_at = NULL, updated_at = now(), synced_at = now()
            FROM sk_stage s, users prev WHERE prev.id = u.id AND {DIFFERS}
            RETURNING s.realigned, prev.offboarded_at IS NOT NULL AS back, u.username, u.keycloak_sub,
                {new}::numeric - {old}::numeric AS hashed)
         SELECT (SELECT coalesce(sum(hashed), 0)::text FROM upd),
                (SELECT count(*) FROM upd WHERE NOT realigned AND NOT back),
                (SELECT count(*) FROM upd WHERE back),
                ARRAY(SELECT username FROM upd WHERE back ORDER BY username LIMIT {listed}),
                ARRAY(SELECT keycloak_sub FROM upd WHERE back ORDER BY username LIMIT {listed}),
                ARRAY(SELECT username FROM upd WHERE NOT realigned AND NOT back ORDER BY username LIMIT {listed}),
                ARRAY(SELECT keycloak_sub FROM upd WHERE NOT realigned AND NOT back ORDER BY username LIMIT {listed})",
        new = users_hash!("u"),
        old = users_hash!("prev"),
    );
    let row = tx
        .query_typed_one(&sql, &[])
        .await
        .map_err(db_error("updating users"))?;
    let updates_hashed = super::hash_sum(row.get(0));
    let (updated, reactivated): (i64, i64) = (row.get(1), row.get(2));
    let (usernames, subs): (Vec<String>, Vec<String>) = (row.get(3), row.get(4));
    for (username, sub) in usernames.iter().zip(&subs) {
        report.find(
            FindingKind::Reactivated,
            format!("user:{username}"),
            format!("sub {sub} is back in the realm: reactivated (is_active follows Keycloak's enabled), its bindings granted again"),
        );
    }
    report.add_changes("reactivate", reactivated, user_keys(usernames, subs));
    report.add_changes("update", updated, user_keys(row.get(5), row.get(6)));
    // Ids that grow with the listing order (`ord`, unique in the stage, is their counter): the
    // primary key is appended to, not written at random (see `tenants::ordered_id`). The stage
    // is in listing order already (the COPY wrote it so), and the rows are inserted as it is
    // read, unsorted: sorting a million of them by `ord` took 0.5 s, on disk. The users listed
    // are the first in listing order, as the ids sort.
    let id = crate::reconcile::tenants::ordered_id("s.ord");
    let sql = format!(
        "WITH ins AS (INSERT INTO users (id, keycloak_sub, username, email, first_name, last_name, is_active, role, realm_roles, synced_at)
                      SELECT {id}, s.sub, s.username, s.email, s.first_name, s.last_name, s.is_active, s.role, s.realm_roles, now()
                      FROM sk_stage s WHERE {NEW}
                      RETURNING id, username, keycloak_sub, {hash} AS hashed)
         SELECT c.n, c.sum, k.usernames, k.subs
         FROM (SELECT count(*) AS n, coalesce(sum(hashed), 0)::text AS sum FROM ins) c,
              (SELECT coalesce(array_agg(username ORDER BY id), '{{}}') AS usernames,
                      coalesce(array_agg(keycloak_sub ORDER BY id), '{{}}') AS subs
               FROM (SELECT id, username, keycloak_sub FROM ins ORDER BY id LIMIT {listed}) f) k",
        hash = users_hash!("users"),
    );
    let row = tx
        .query_typed_one(&sql, &[])
        .await
        .map_err(db_error("inserting users"))?;
    let inserted: i64 = row.get(0);
    report.add_changes("insert", inserted, user_keys(row.get(2), row.get(3)));
    Ok(Changes {
        updated,
        inserted,
        reactivated,
        hashes: updates_hashed.zip(super::hash_sum(row.get(1))).map(|(u, i)| u + i),
    })
}

/// The keys of users rows a statement wrote: `users:<username> (sub <sub>)`.
fn user_keys(usernames: Vec<String>, subs: Vec<String>) -> Vec<String> {
    usernames
        .into_iter()
        .zip(subs)
        .map(|(u, s)| format!("users:{u} (sub {s})"))
        .collect()
}

/// Rows with a sub the complete listing lacks: `(all of them, those not offboarded yet)`.
async fn count_missing(tx: &Transaction<'_>) -> Result<(i64, i64)> {
    let row = tx
        .query_typed_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE u.offboarded_at IS NULL) FROM users u WHERE {MISSING}"),
            &[],
        )
        .await
        .map_err(db_error("counting users missing from the source"))?;
    Ok((row.get(0), row.get(1)))
}

/// Rows matching `which` that are not offboarded yet.
async fn count_to_offboard(
    tx: &Transaction<'_>,
    which: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM users u WHERE ({which}) AND u.offboarded_at IS NULL");
    Ok(tx
        .query_typed_one(&sql, params)
        .await
        .map_err(db_error("counting the users to offboard"))?
        .get(0))
}

/// Offboards the rows `gone` names that are not offboarded yet: kept, `is_active = false`,
/// `offboarded_at` set (the `role_bindings` unit revokes their bindings). Returns how many.
async fn offboard(
    tx: &Transaction<'_>,
    gone: &Gone<'_>,
    listed: i64,
    report: &mut UnitReport,
) -> Result<i64> {
    let (which, why) = (gone.which, gone.why);
    let target = format!("SELECT u.id FROM users u WHERE ({which}) AND u.offboarded_at IS NULL");
    let sql = format!(
        "WITH off AS (UPDATE users u SET is_active = false, offboarded_at = now(), updated_at = now()
                      WHERE u.id IN ({target}) RETURNING u.username, u.keycloak_sub)
         SELECT count(*) OVER (), username, keycloak_sub FROM off ORDER BY username LIMIT {listed}"
    );
    let rows = tx
        .query_typed(&sql, gone.params)
        .await
        .map_err(db_error("offboarding users gone from the realm"))?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        let (username, sub): (String, String) = (r.get(1), r.get(2));
        tracing::info!(unit = UNIT.as_str(), user.sub = %printable(&sub), reason = why, "user offboarded");
        report.find(
            FindingKind::Offboarded,
            format!("user:{username}"),
            format!("sub {sub}: {why}; offboarded: row kept, is_active = false, its seedkeeper bindings revoked"),
        );
        keys.push(format!("users:{username} (sub {sub})"));
    }
    let n = rows.first().map(|r| r.get(0)).unwrap_or(0);
    report.add_changes("offboard", n, keys);
    Ok(n)
}

/// Builds a unique index inside a savepoint; `false` when the stage holds duplicates.
async fn try_unique_index(tx: &Transaction<'_>, sql: &str) -> Result<bool> {
    tx.batch_execute("SAVEPOINT sk_index")
        .await
        .map_err(db_error("indexing the identity stage"))?;
    match tx.batch_execute(sql).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT sk_index")
                .await
                .map_err(db_error("indexing the identity stage"))?;
            Ok(true)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT sk_index")
                .await
                .map_err(db_error("indexing the identity stage"))?;
            Ok(false)
        }
        Err(e) => Err(crate::error::Error::db("indexing the identity stage", e)),
    }
}
