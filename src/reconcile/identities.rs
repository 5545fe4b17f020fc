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
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::identity::{check_identity, printable, IdentityProvider, Shortfall};
use crate::progress::Progress;
use crate::reconcile::{Action, FindingKind, Mode, Tally, Unit, UnitReport};
use crate::store::ctx;

const UNIT: Unit = Unit::Identities;

/// The stage's column types, in `COPY` order.
const STAGE_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::INT8,
];

const STAGE: &str = "CREATE TEMP TABLE sk_stage (
    sub          text NOT NULL,
    username     text NOT NULL,
    email        text,
    first_name   text,
    last_name    text,
    is_active    boolean NOT NULL,
    role         text NOT NULL,
    realm_roles  text[] NOT NULL,
    ord          bigint NOT NULL,
    skip         boolean NOT NULL DEFAULT false,
    realigned    boolean NOT NULL DEFAULT false
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

const SAMPLE: i64 = crate::reconcile::FINDINGS_PER_KIND as i64;

/// How the run steers the source's listing: `cancel` ends it when the run is stopped, `progress`
/// counts the users listed.
#[derive(Clone, Copy)]
pub struct Listing<'a> {
    pub cancel: &'a CancellationToken,
    pub progress: &'a Progress,
}

/// Plans or applies the identities of `source`, in one transaction of its own, phase by phase.
pub async fn reconcile(
    client: &mut Client,
    source: Arc<dyn IdentityProvider>,
    listing: Listing<'_>,
    settings: &Settings,
    mode: Mode,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    let tx = client
        .transaction()
        .await
        .map_err(ctx("starting the identities transaction"))?;
    tx.batch_execute("SET CONSTRAINTS users_username_key DEFERRED")
        .await
        .map_err(ctx("deferring the username check"))?;
    let admin_roles = &settings.identity.admin_roles;
    let shortfall = stage(&tx, source.clone(), listing, admin_roles, &mut report).await?;
    dedupe(&tx, &mut report).await?;
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
        defer_held_usernames(&tx, next, &mut report).await?;
    }
    let (unsettled, changed) = compare(&tx).await?;
    // Re-alignment and clashes can only concern realm users whose sub has no row yet or whose
    // username changed; when there are none (every steady-state run) both checks are skipped.
    let (realigned, clashes) = if unsettled == 0 {
        (0, 0)
    } else {
        let realigned = realign(&tx, mode, &mut report).await?;
        (realigned, clash(&tx, &mut report).await?)
    };
    report.bump(Action::Realigned, realigned);
    report.bump(Tally::Clashes, clashes);
    let changes = if changed == 0 {
        Changes::default()
    } else {
        write_changes(&tx, mode, &mut report).await?
    };
    report.bump(Action::Updated, changes.updated);
    report.bump(Action::Inserted, changes.inserted);
    report.bump(Action::Reactivated, changes.reactivated);
    let staged: i64 = tx
        .query_one("SELECT count(*) FROM sk_stage WHERE NOT skip", &[])
        .await
        .map_err(ctx("counting the identity stage"))?
        .get(0);
    let unchanged =
        (staged - changes.inserted - changes.updated - changes.reactivated - realigned).max(0);
    report.bump(Tally::Unchanged, unchanged);
    // Users gone from the realm: offboarded, never deleted. A complete listing says it of every
    // user it lacks; a batch only of the users Keycloak answered 404 for.
    let deactivated = if !narrowed {
        let (missing, to_offboard) = count_missing(&tx).await?;
        report.bump(Tally::Missing, missing);
        if to_offboard == 0 {
            0
        } else {
            let why = format!("not in the complete {} listing", source.name());
            offboard(&tx, mode, MISSING, &[], &why, &mut report).await?
        }
    } else {
        let gone = source.gone();
        if gone.is_empty() {
            0
        } else {
            let why = "GET users/{id} answered 404 (deleted in Keycloak)";
            let only = "u.keycloak_sub = ANY ($1::text[])";
            offboard(&tx, mode, only, &[&gone], why, &mut report).await?
        }
    };
    report.bump(Action::Deactivated, deactivated);
    if mode == Mode::Plan {
        for (n, verb, tail) in [
            (changes.inserted, "insert", ""),
            (changes.updated, "update", ""),
            (realigned, "re-align", " to new subs"),
            (changes.reactivated, "reactivate", " back in the realm"),
            (deactivated, "offboard", " gone from the realm"),
        ] {
            if n > 0 {
                report.add_change(format!("{verb} {n} user(s){tail}"));
            }
        }
    }
    match mode {
        Mode::Apply => tx.commit().await.map_err(ctx("committing identities"))?,
        Mode::Plan => tx
            .rollback()
            .await
            .map_err(ctx("ending the identities plan"))?,
    }
    Ok(report)
}

/// Streams the source into the temporary stage with binary `COPY`. The producer runs as its own
/// task so a blocking reader (the realm file) never stalls the COPY that drains it. Identities
/// with an invalid value are refused one by one, as are the users the source could not give a
/// sub (a realm-file user without id).
async fn stage(
    tx: &Transaction<'_>,
    source: Arc<dyn IdentityProvider>,
    listing: Listing<'_>,
    admin_roles: &[String],
    report: &mut UnitReport,
) -> Result<Option<Shortfall>> {
    tx.batch_execute(STAGE)
        .await
        .map_err(ctx("creating the identity stage"))?;
    let (sender, mut rx) = mpsc::channel(4);
    // The task keeps the run's and the unit's spans, so the source's lines carry the run id.
    let stream = source.stream(sender, listing.cancel.clone(), listing.progress.clone());
    let producer = tokio::spawn(stream.in_current_span());
    // The COPY stays open for the whole listing, whose length is Keycloak's (bounded by
    // run.timeout, not by database.statement_timeout, which applies again right after it).
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(ctx("lifting statement_timeout for the identity stage"))?;
    let sink = tx
        .copy_in("COPY sk_stage (sub, username, email, first_name, last_name, is_active, role, realm_roles, ord) FROM STDIN BINARY")
        .await
        .map_err(ctx("starting COPY into the identity stage"))?;
    let writer = BinaryCopyInWriter::new(sink, &STAGE_TYPES);
    pin_mut!(writer);
    let mut ord: i64 = 0;
    let mut rejected = 0i64;
    while let Some(batch) = rx.recv().await {
        for ident in batch {
            ord += 1;
            if let Err(why) = check_identity(&ident) {
                rejected += 1;
                let sub = printable(&ident.sub);
                tracing::warn!(unit = UNIT.as_str(), user.sub = %sub, reason = %why, "identity refused");
                report.find(FindingKind::Rejected, format!("sub:{sub}"), why);
                continue;
            }
            let admin = ident.realm_roles.iter().any(|r| admin_roles.contains(r));
            let role = if admin { "admin" } else { "user" };
            let row: [&(dyn ToSql + Sync); 9] = [
                &ident.sub,
                &ident.username,
                &ident.email,
                &ident.first_name,
                &ident.last_name,
                &ident.enabled,
                &role,
                &ident.realm_roles,
                &ord,
            ];
            writer
                .as_mut()
                .write(&row)
                .await
                .map_err(ctx("writing the identity stage"))?;
        }
    }
    let stats = producer
        .await
        .map_err(|e| Error::Io(format!("identity source task failed: {e}")))??;
    writer
        .finish()
        .await
        .map_err(ctx("finishing COPY into the identity stage"))?;
    tx.batch_execute("SET LOCAL statement_timeout TO DEFAULT")
        .await
        .map_err(ctx("restoring statement_timeout after the identity stage"))?;
    report.bump(Tally::Listed, stats.listed as i64);
    for r in stats.rejections {
        tracing::warn!(unit = UNIT.as_str(), entity = %r.entity, reason = %r.detail, "identity refused");
        report.find(FindingKind::Rejected, r.entity, r.detail);
    }
    report.bump(Tally::Rejected, rejected + stats.rejected as i64);
    Ok(stats.shortfall)
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
async fn dedupe(tx: &Transaction<'_>, report: &mut UnitReport) -> Result<()> {
    tx.batch_execute("ANALYZE sk_stage")
        .await
        .map_err(ctx("analyzing the identity stage"))?;
    const BY_SUB: &str = "CREATE UNIQUE INDEX sk_stage_sub ON sk_stage (sub)";
    if !try_unique_index(tx, BY_SUB).await? {
        let dup = tx
            .execute(
                "DELETE FROM sk_stage a USING sk_stage b WHERE a.sub = b.sub AND a.ord > b.ord",
                &[],
            )
            .await
            .map_err(ctx("de-duplicating the identity stage"))?;
        report.bump(Tally::Duplicates, dup as i64);
        tx.batch_execute(BY_SUB)
            .await
            .map_err(ctx("indexing the identity stage"))?;
    }
    const BY_USERNAME: &str = "CREATE UNIQUE INDEX sk_stage_username ON sk_stage (username)";
    if !try_unique_index(tx, BY_USERNAME).await? {
        let rows = tx
            .query("DELETE FROM sk_stage a USING sk_stage b WHERE a.username = b.username AND a.ord > b.ord RETURNING a.sub, a.username", &[])
            .await
            .map_err(ctx("checking usernames in the identity stage"))?;
        for r in &rows {
            let (sub, username): (String, String) = (r.get(0), r.get(1));
            let why = format!("username {username:?} is listed for two subs by the source");
            report.find(FindingKind::Rejected, format!("sub:{sub}"), why);
        }
        report.bump(Tally::Rejected, rows.len() as i64);
        tx.batch_execute(BY_USERNAME)
            .await
            .map_err(ctx("indexing the identity stage"))?;
    }
    Ok(())
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
        .query(
            "UPDATE sk_stage s SET skip = true FROM users u
             WHERE u.username = s.username AND u.keycloak_sub IS DISTINCT FROM s.sub
               AND NOT EXISTS (SELECT 1 FROM sk_stage s2 WHERE s2.sub = u.keycloak_sub)
             RETURNING s.username",
            &[],
        )
        .await
        .map_err(ctx("checking the event batch against held usernames"))?;
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

/// One pass over the stage: how many realm users have no row yet or a changed username
/// (`unsettled`: the only ones re-alignment and clashes concern), and how many are new or differ
/// at all (`changed`: when none does, the update and insert statements are skipped).
async fn compare(tx: &Transaction<'_>) -> Result<(i64, i64)> {
    let row = tx
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE u.id IS NULL OR u.username <> s.username),
                        count(*) FILTER (WHERE u.id IS NULL OR ({DIFFERS}))
                 FROM sk_stage s LEFT JOIN users u ON u.keycloak_sub = s.sub"
            ),
            &[],
        )
        .await
        .map_err(ctx("comparing the identity stage"))?;
    Ok((row.get(0), row.get(1)))
}

/// Rows whose username a realm user holds while their old sub left the realm move to the new
/// sub (the realm was re-imported with new ids). Returns how many (plan: would be).
async fn realign(tx: &Transaction<'_>, mode: Mode, report: &mut UnitReport) -> Result<i64> {
    let sql = match mode {
        Mode::Apply => format!(
            "WITH cand AS ({REALIGN_CANDIDATES}),
             upd AS (UPDATE users u SET keycloak_sub = c.new_sub, updated_at = now(), synced_at = now()
                     FROM cand c WHERE u.id = c.id RETURNING c.new_sub, c.old_sub, c.username),
             mark AS (UPDATE sk_stage s SET realigned = true FROM upd WHERE s.sub = upd.new_sub RETURNING 1)
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM mark), username, old_sub, new_sub FROM upd LIMIT {SAMPLE}"
        ),
        Mode::Plan => format!(
            "WITH cand AS ({REALIGN_CANDIDATES}),
             mark AS (UPDATE sk_stage s SET realigned = true FROM cand c WHERE s.sub = c.new_sub RETURNING 1)
             SELECT (SELECT count(*) FROM cand), (SELECT count(*) FROM mark), username, old_sub, new_sub FROM cand LIMIT {SAMPLE}"
        ),
    };
    let rows = tx
        .query(&sql, &[])
        .await
        .map_err(ctx("re-aligning users to new subs"))?;
    let realigned: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
    for r in &rows {
        let (username, old, new): (String, String, String) = (r.get(2), r.get(3), r.get(4));
        report.find(
            FindingKind::Realigned,
            format!("user:{username}"),
            format!("sub {old} is gone from the realm; row re-aligned to {new}"),
        );
    }
    Ok(realigned)
}

/// Realm users whose username another row holds: reported one by one and skipped, never a
/// takeover; any makes the run fail. Returns how many.
async fn clash(tx: &Transaction<'_>, report: &mut UnitReport) -> Result<i64> {
    let rows = tx
        .query(&format!("WITH c AS ({CLASHES}) UPDATE sk_stage s SET skip = true FROM c WHERE s.sub = c.sub RETURNING c.sub, c.username, c.holder_sub, c.offboarded_on"), &[])
        .await
        .map_err(ctx("checking username clashes"))?;
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
        report.blocking.push(format!(
            "identities: {} username clash(es) left unresolved (see the run's findings); no row was taken over",
            rows.len()
        ));
    }
    Ok(rows.len() as i64)
}

/// What [`write_changes`] wrote (plan: would write).
#[derive(Debug, Default, Clone, Copy)]
struct Changes {
    /// Rows that differed, re-aligned and reactivated ones aside.
    updated: i64,
    inserted: i64,
    /// Offboarded rows whose sub the source lists again.
    reactivated: i64,
}

/// Updates the rows that differ (reactivating offboarded users who came back under their sub)
/// and inserts the new users. A re-aligned row that also changed counts as re-aligned only.
async fn write_changes(
    tx: &Transaction<'_>,
    mode: Mode,
    report: &mut UnitReport,
) -> Result<Changes> {
    // `prev` is the row before this statement: whether it was offboarded.
    let back = match mode {
        Mode::Apply => format!(
            "WITH upd AS (UPDATE users u SET username = s.username, email = s.email, first_name = s.first_name,
                    last_name = s.last_name, is_active = s.is_active, role = s.role, realm_roles = s.realm_roles,
                    offboarded_at = NULL, updated_at = now(), synced_at = now()
                FROM sk_stage s, users prev WHERE prev.id = u.id AND {DIFFERS}
                RETURNING s.realigned, prev.offboarded_at IS NOT NULL AS back, u.username, u.keycloak_sub)
             SELECT (SELECT count(*) FROM upd WHERE NOT realigned AND NOT back),
                    (SELECT count(*) FROM upd WHERE back),
                    ARRAY(SELECT username FROM upd WHERE back ORDER BY username LIMIT {SAMPLE}),
                    ARRAY(SELECT keycloak_sub FROM upd WHERE back ORDER BY username LIMIT {SAMPLE})"
        ),
        Mode::Plan => format!(
            "WITH d AS (SELECT s.realigned, u.offboarded_at IS NOT NULL AS back, u.username, u.keycloak_sub
                        FROM users u JOIN sk_stage s ON u.keycloak_sub = s.sub WHERE {DIFFERS})
             SELECT (SELECT count(*) FROM d WHERE NOT realigned AND NOT back),
                    (SELECT count(*) FROM d WHERE back),
                    ARRAY(SELECT username FROM d WHERE back ORDER BY username LIMIT {SAMPLE}),
                    ARRAY(SELECT keycloak_sub FROM d WHERE back ORDER BY username LIMIT {SAMPLE})"
        ),
    };
    let row = tx
        .query_one(&back, &[])
        .await
        .map_err(ctx("updating users"))?;
    let (usernames, subs): (Vec<String>, Vec<String>) = (row.get(2), row.get(3));
    for (username, sub) in usernames.iter().zip(&subs) {
        report.find(
            FindingKind::Reactivated,
            format!("user:{username}"),
            format!("sub {sub} is back in the realm: reactivated (is_active follows Keycloak's enabled), its bindings granted again"),
        );
    }
    let inserted = match mode {
        Mode::Apply => tx
            .execute(
                &format!(
                    "INSERT INTO users (keycloak_sub, username, email, first_name, last_name, is_active, role, realm_roles, synced_at)
                     SELECT s.sub, s.username, s.email, s.first_name, s.last_name, s.is_active, s.role, s.realm_roles, now()
                     FROM sk_stage s WHERE {NEW} ORDER BY s.ord"
                ),
                &[],
            )
            .await
            .map_err(ctx("inserting users"))? as i64,
        Mode::Plan => tx
            .query_one(&format!("SELECT count(*) FROM sk_stage s WHERE {NEW}"), &[])
            .await
            .map_err(ctx("comparing users"))?
            .get(0),
    };
    Ok(Changes {
        updated: row.get(0),
        inserted,
        reactivated: row.get(1),
    })
}

/// Rows with a sub the complete listing lacks: `(all of them, those not offboarded yet)`.
async fn count_missing(tx: &Transaction<'_>) -> Result<(i64, i64)> {
    let row = tx
        .query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE u.offboarded_at IS NULL) FROM users u WHERE {MISSING}"),
            &[],
        )
        .await
        .map_err(ctx("counting users missing from the source"))?;
    Ok((row.get(0), row.get(1)))
}

/// Offboards the rows matching `which` that are not offboarded yet: kept, `is_active = false`,
/// `offboarded_at` set (the `role_bindings` unit revokes their bindings). `why` says how the
/// user is known to be gone. Returns how many (plan: would be).
async fn offboard(
    tx: &Transaction<'_>,
    mode: Mode,
    which: &str,
    params: &[&(dyn ToSql + Sync)],
    why: &str,
    report: &mut UnitReport,
) -> Result<i64> {
    let target = format!("SELECT u.id FROM users u WHERE ({which}) AND u.offboarded_at IS NULL");
    let sql = match mode {
        Mode::Apply => format!(
            "WITH off AS (UPDATE users u SET is_active = false, offboarded_at = now(), updated_at = now()
                          WHERE u.id IN ({target}) RETURNING u.username, u.keycloak_sub)
             SELECT count(*) OVER (), username, keycloak_sub FROM off ORDER BY username LIMIT {SAMPLE}"
        ),
        Mode::Plan => format!(
            "SELECT count(*) OVER (), u.username, u.keycloak_sub FROM users u WHERE u.id IN ({target})
             ORDER BY u.username LIMIT {SAMPLE}"
        ),
    };
    let rows = tx
        .query(&sql, params)
        .await
        .map_err(ctx("offboarding users gone from the realm"))?;
    for r in &rows {
        let (username, sub): (String, String) = (r.get(1), r.get(2));
        tracing::info!(unit = UNIT.as_str(), user.sub = %printable(&sub), reason = why, "user offboarded");
        report.find(
            FindingKind::Offboarded,
            format!("user:{username}"),
            format!("sub {sub}: {why}; offboarded: row kept, is_active = false, its seedkeeper bindings revoked"),
        );
    }
    Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
}

/// Builds a unique index inside a savepoint; `false` when the stage holds duplicates.
async fn try_unique_index(tx: &Transaction<'_>, sql: &str) -> Result<bool> {
    tx.batch_execute("SAVEPOINT sk_index")
        .await
        .map_err(ctx("indexing the identity stage"))?;
    match tx.batch_execute(sql).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT sk_index")
                .await
                .map_err(ctx("indexing the identity stage"))?;
            Ok(true)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT sk_index")
                .await
                .map_err(ctx("indexing the identity stage"))?;
            Ok(false)
        }
        Err(e) => Err(crate::error::Error::db("indexing the identity stage", e)),
    }
}
