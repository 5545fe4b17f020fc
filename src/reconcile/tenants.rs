//! Unit `tenants`: every users row (synced or not) gets a personal tenant, a default project,
//! and active owner memberships in both (docs/seeding.md).
//!
//! One read-only check of every user's chain; when something lacks, six whole-table statements,
//! each writing only rows that are missing or differ. A no-op run reads once and writes nothing.
//! An event batch runs the same statements over its own users' rows only ([`Scope`]).
//! Slugs derive from the user id, which never changes (usernames can).

use tokio_postgres::Transaction;

use crate::error::Result;
use crate::reconcile::{analyze_if_written, settled_row, Action, Scope, Tally, Unit, UnitReport};
use crate::store::{db_error, foreign_keys};

const UNIT: Unit = Unit::Tenants;

struct Step {
    count: Tally,
    /// The change listed for each row written, and the entity it names: `<entity>:<owner>`.
    action: &'static str,
    entity: &'static str,
    /// Rows to write: a SELECT ending in its WHERE clause, so the scope's condition can follow.
    select: &'static str,
    /// The select's column holding the owner's `users.id`, which the scope restricts.
    owner: &'static str,
    /// The write, given `x` = the select. An insert writes in the order of its table's keys and
    /// `{id}` becomes a time-ordered id ([`ordered_id`]), numbered in that same order.
    write: &'static str,
    /// The column of `x` an insert's `{id}` ranks its rows by ("" when the write has no `{id}`).
    order: &'static str,
    /// What the write returns, and where the written rows' owners are found (`w` = the write).
    returning: &'static str,
    /// An insert's table, as its place in [`HASHED`]: it returns the hashes of the rows it
    /// writes, as the digest has them. `None` for an update.
    table: Option<usize>,
    keys: &'static str,
}

/// The owners of rows written that return their owner's id.
const BY_OWNER: &str = "w JOIN users u ON u.id = w.user_id";
/// The owners of rows written that return their tenant.
const BY_TENANT: &str =
    "w JOIN tenants t ON t.id = w.tenant_id JOIN users u ON u.id = t.owner_user_id";

/// A time-ordered uuid (version 7, RFC 9562: 48 bits of the statement's Unix time in ms, then
/// `rank`, a positive number unique among the statement's rows that grows with its write order,
/// such as the row's place in it, as a counter, then 30 random bits) for the rows seedkeeper
/// creates. Why not `gen_random_uuid()`: random keys land on random pages of every index that
/// holds them, and at a million rows those indexes outgrow `shared_buffers`, so each insert
/// reads and dirties a page of its own (and logs it whole after a checkpoint). Ids that grow
/// with the write order append to the right edge of the primary key, and the child tables
/// written in their parent's key order append to theirs, as a `COPY` of sorted rows would.
/// PostgreSQL 15 has no `uuidv7()`; the layout is the same. The time is a scalar subquery,
/// computed once per statement: `extract` gives a `numeric`, and computing it for every row
/// cost 0.35 s of a million rows' 0.95 s.
pub(crate) fn ordered_id(rank: &str) -> String {
    format!(
        "encode((SELECT substring(int8send((extract(epoch FROM statement_timestamp()) * 1000)::int8) FROM 3 FOR 6))
                || substring(int8send(28672 | ((({rank}) >> 32) & 4095)) FROM 7 FOR 2)
                || int8send((-9223372036854775808)::int8 | ((({rank}) & 4294967295) << 30)
                            | floor(random() * 1073741824)::int8), 'hex')::uuid"
    )
}

/// Updates run before inserts: on a fresh database they scan empty tables instead of the rows
/// just inserted (which are owner/active by construction).
const STEPS: &[Step] = &[
    Step {
        count: Tally::TenantsInserted,
        action: "insert",
        entity: "tenants:personal",
        select: "SELECT u.id AS owner_user_id, 'personal-' || u.id::text AS slug, u.username AS name FROM users u
                 WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.kind = 'personal' AND t.owner_user_id = u.id)",
        owner: "u.id",
        write: "INSERT INTO tenants (id, kind, owner_user_id, slug, name)
                SELECT {id}, 'personal', owner_user_id, slug, name FROM x ORDER BY owner_user_id",
        order: "owner_user_id",
        returning: "owner_user_id AS user_id",
        table: Some(0),
        keys: BY_OWNER,
    },
    Step {
        count: Tally::ProjectsInserted,
        action: "insert",
        entity: "projects:default",
        select: "SELECT t.id AS tenant_id FROM tenants t
                 WHERE t.kind = 'personal' AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.tenant_id = t.id AND p.is_default)",
        owner: "t.owner_user_id",
        write: "INSERT INTO projects (id, tenant_id, is_default, slug, name)
                SELECT {id}, tenant_id, true, 'default', 'Default project' FROM x ORDER BY tenant_id",
        order: "tenant_id",
        returning: "tenant_id",
        table: Some(1),
        keys: BY_TENANT,
    },
    Step {
        count: Tally::TenantMembershipsUpdated,
        action: "update",
        entity: "tenant_memberships:owner",
        select: "SELECT m.tenant_id, m.user_id FROM tenants t
                 JOIN tenant_memberships m ON m.tenant_id = t.id AND m.user_id = t.owner_user_id
                 WHERE t.kind = 'personal' AND (m.role <> 'owner' OR m.status <> 'active')",
        owner: "t.owner_user_id",
        write: "UPDATE tenant_memberships m SET role = 'owner', status = 'active' FROM x
                WHERE m.tenant_id = x.tenant_id AND m.user_id = x.user_id",
        order: "",
        returning: "m.user_id",
        table: None,
        keys: BY_OWNER,
    },
    Step {
        count: Tally::TenantMembershipsInserted,
        action: "insert",
        entity: "tenant_memberships:owner",
        select: "SELECT t.id AS tenant_id, t.owner_user_id AS user_id FROM tenants t
                 WHERE t.kind = 'personal'
                   AND NOT EXISTS (SELECT 1 FROM tenant_memberships m WHERE m.tenant_id = t.id AND m.user_id = t.owner_user_id)",
        owner: "t.owner_user_id",
        write: "INSERT INTO tenant_memberships (tenant_id, user_id, role, status)
                SELECT tenant_id, user_id, 'owner', 'active' FROM x ORDER BY tenant_id, user_id",
        order: "",
        returning: "user_id",
        table: Some(2),
        keys: BY_OWNER,
    },
    Step {
        count: Tally::ProjectMembershipsUpdated,
        action: "update",
        entity: "project_memberships:owner",
        select: "SELECT m.project_id, m.user_id FROM tenants t
                 JOIN projects p ON p.tenant_id = t.id AND p.is_default
                 JOIN project_memberships m ON m.project_id = p.id AND m.user_id = t.owner_user_id
                 WHERE t.kind = 'personal' AND (m.role <> 'owner' OR m.status <> 'active')",
        owner: "t.owner_user_id",
        write: "UPDATE project_memberships m SET role = 'owner', status = 'active' FROM x
                WHERE m.project_id = x.project_id AND m.user_id = x.user_id",
        order: "",
        returning: "m.user_id",
        table: None,
        keys: BY_OWNER,
    },
    Step {
        count: Tally::ProjectMembershipsInserted,
        action: "insert",
        entity: "project_memberships:owner",
        select: "SELECT p.id AS project_id, t.owner_user_id AS user_id FROM tenants t
                 JOIN projects p ON p.tenant_id = t.id AND p.is_default
                 WHERE t.kind = 'personal'
                   AND NOT EXISTS (SELECT 1 FROM project_memberships m WHERE m.project_id = p.id AND m.user_id = t.owner_user_id)",
        owner: "t.owner_user_id",
        write: "INSERT INTO project_memberships (project_id, user_id, role, status)
                SELECT project_id, user_id, 'owner', 'active' FROM x ORDER BY project_id, user_id",
        order: "",
        returning: "user_id",
        table: Some(3),
        keys: BY_OWNER,
    },
];

/// One pass over every user's whole chain (tenant, default project, both memberships): the users
/// covered and how many lack something. In sync (the common case) it is the only statement. The
/// scope's condition on `u.id` follows as its WHERE clause.
const CHECK: &str = "SELECT count(*), count(*) FILTER (WHERE t.id IS NULL OR p.id IS NULL OR tm.tenant_id IS NULL OR pm.project_id IS NULL
                                              OR tm.role <> 'owner' OR tm.status <> 'active' OR pm.role <> 'owner' OR pm.status <> 'active')
     FROM users u
     LEFT JOIN tenants t ON t.kind = 'personal' AND t.owner_user_id = u.id
     LEFT JOIN projects p ON p.tenant_id = t.id AND p.is_default
     LEFT JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.user_id = u.id
     LEFT JOIN project_memberships pm ON pm.project_id = p.id AND pm.user_id = u.id";

/// Users lacking something from which the writes sort and hash in memory: with the default 4 MB
/// of `work_mem`, each statement of a first run at a million users sorted 41 MB on disk and
/// split its hash joins in 16 batches.
const BULK: i64 = 100_000;
const BULK_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'";

/// Users lacking something from which an apply's writes of a whole run set the foreign keys of
/// the unit's tables aside and check each once afterwards ([`foreign_keys`]), when they are at
/// least a quarter of the users covered: one join over a table costs less than looking up the
/// parents of a quarter of its rows one by one.
const SET_ASIDE_FROM: i64 = 1_000;

/// The tables the unit writes, with the columns of theirs the check reads: what [`digest`]
/// hashes of each.
const HASHED: [(&str, &str); 4] = [
    ("tenants", "(id, kind, owner_user_id)"),
    ("projects", "(id, tenant_id, is_default)"),
    ("tenant_memberships", "(tenant_id, user_id, role, status)"),
    ("project_memberships", "(project_id, user_id, role, status)"),
];

/// Every input of the check in one digest, per table its row count and the sum of its rows'
/// 64-bit hashes: the users ids (every row is covered, synced or not), then the [`HASHED`]
/// columns of the tables the unit writes. 0.4 s at a million users, where the check's joins
/// take 1.5 s (see [`settled_row`]). Begins with the users count.
fn digest() -> String {
    let mut sql = "(SELECT count(*)::text || ' ' || coalesce(sum(uuid_hash_extended(id, 0)), 0) FROM users)".to_string();
    for (table, columns) in HASHED {
        sql.push_str(&format!(
            " || ' ' || (SELECT count(*)::text || ' ' || coalesce(sum(hash_record_extended({columns}, 0)), 0) FROM {table})"
        ));
    }
    sql
}

/// The check of every user with the tables' [`digest`], in one statement (one snapshot): what
/// a settled unit records.
fn check_with_digest() -> String {
    format!("SELECT c.*, {} FROM ({CHECK}) c", digest())
}

/// `record`: an apply's unit records its state when it ends settled (a full run's only: a
/// batch looks at its own users).
pub(crate) async fn reconcile(
    tx: &Transaction<'_>,
    scope: &Scope,
    listed: i64,
    record: bool,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    let whole = *scope == Scope::All;
    if whole {
        if let Some(users) = settled_before(tx, record, &mut report).await? {
            report.bump(Tally::UsersCovered, users);
            return Ok(report);
        }
    }
    let params = scope.typed_params();
    let check = match scope.condition("u.id", 1) {
        Some(c) => format!("{CHECK} WHERE {c}"),
        None if record => check_with_digest(),
        None => CHECK.to_string(),
    };
    let row = tx
        .query_typed_one(&check, &params)
        .await
        .map_err(db_error("checking tenants"))?;
    let (users, lacking): (i64, i64) = (row.get(0), row.get(1));
    report.bump(Tally::UsersCovered, users);
    if lacking == 0 {
        if whole && record {
            report.state = row.get(2);
        }
        return Ok(report);
    }
    if lacking >= BULK {
        tx.batch_execute(BULK_WORK_MEM)
            .await
            .map_err(db_error("sizing work_mem for the tenants writes"))?;
    }
    let set_aside = if whole && record && lacking >= SET_ASIDE_FROM && lacking * 4 >= users {
        let tables = HASHED.map(|(table, _)| table);
        foreign_keys::set_aside(tx, &tables).await?
    } else {
        None
    };
    let mut total = 0i64;
    // What the writes add to each table of the digest while they can be accounted for (see
    // `settled_as_written`). The users come first in the digest; the unit writes none.
    let mut added = Some([(0i64, 0i128); 1 + HASHED.len()]);
    for step in STEPS {
        let select = format!("{}{}", step.select, scope.and(step.owner, 1));
        // The anti-joins write nothing when nothing is missing. The owners' usernames name the
        // rows written (ids are generated, so a plan's would not be the apply's).
        let write = step.write.replace(
            "{id}",
            &ordered_id(&format!("row_number() OVER (ORDER BY {})", step.order)),
        );
        let (hashed, sum) = match step.table {
            Some(t) => (
                format!(", hash_record_extended({}, 0) AS hashed", HASHED[t].1),
                "coalesce(sum(hashed), 0)::text",
            ),
            None => (String::new(), "NULL::text"),
        };
        // The count and the sum in one pass over the rows written (a million rows: 0.1 s each).
        let sql = format!(
            "WITH x AS ({select}), w AS ({write} RETURNING {returning}{hashed})
             SELECT c.n, ARRAY(SELECT u.username FROM {keys} LIMIT {listed}), c.sum
             FROM (SELECT count(*) AS n, {sum} AS sum FROM w) c",
            returning = step.returning,
            keys = step.keys,
        );
        let row = tx
            .query_typed_one(&sql, &params)
            .await
            .map_err(db_error("writing tenants"))?;
        let (n, owners): (i64, Vec<String>) = (row.get(0), row.get(1));
        let sum = row.get::<_, Option<&str>>(2).and_then(super::hash_sum);
        added = match (added, step.table, sum) {
            (Some(mut a), Some(t), Some(sum)) => {
                a[1 + t] = (n, sum);
                Some(a)
            }
            // An update's rows are not accounted for (they are few: repairs).
            (a, None, _) if n == 0 => a,
            _ => None,
        };
        let owners = owners.into_iter().map(|o| format!("{}:{o}", step.entity));
        report.add_changes(step.action, n, owners);
        report.bump(step.count, n);
        total += n;
    }
    report.bump(Action::Inserted, total);
    if record {
        analyze_if_written(tx, ANALYZED, total).await?;
    }
    // After the statistics: the check of each constraint is a join planned from them.
    if let Some(set) = set_aside {
        foreign_keys::restore(tx, set).await?;
    }
    if whole && record {
        let before: Option<String> = row.get(2);
        // The inserts return their rows' hashes, and an update (a repair, of few rows) leaves
        // them unaccounted: inserts of everything lacking leave nothing lacking.
        if let Some(expected) = before.zip(added).and_then(|(b, a)| super::digest_with(&b, &a)) {
            let sql = format!("SELECT {}", digest());
            let context = "reading the digest of the tenants tables";
            let state = super::settled_as_written(tx, UNIT, &sql, &expected, context).await?;
            if state.is_some() {
                report.state = state;
                return Ok(report);
            }
        }
        // Settled when the same check, after the writes, finds nothing lacking (planned from
        // the statistics just taken, not those of the empty tables of a first run).
        let row = tx
            .query_typed_one(&check_with_digest(), &[])
            .await
            .map_err(db_error("checking tenants after writing them"))?;
        if row.get::<_, i64>(1) == 0 {
            report.state = row.get(2);
        }
    }
    Ok(report)
}

/// The tables the unit writes, with the columns its statements join and filter on.
const ANALYZED: &str = "tenants (id, kind, owner_user_id), projects (id, tenant_id, is_default),
     tenant_memberships (tenant_id, user_id, role, status),
     project_memberships (project_id, user_id, role, status)";

/// The users covered, when the tables are those the latest settled run recorded (nothing can be
/// lacking); the state is then recorded again (`record`).
async fn settled_before(
    tx: &Transaction<'_>,
    record: bool,
    report: &mut UnitReport,
) -> Result<Option<i64>> {
    let sql = format!("SELECT {}", digest());
    let context = "reading the digest of the tenants tables";
    let Some(row) = settled_row(tx, UNIT, "", (&sql, &[]), context).await? else {
        return Ok(None);
    };
    let digest: String = row.get(0);
    let users = digest
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if record {
        report.state = Some(digest);
    }
    Ok(Some(users))
}
