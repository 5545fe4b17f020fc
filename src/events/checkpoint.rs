//! The follower's checkpoint (table `event_follower`), one row per realm: where each stream
//! was read up to, or why events are not followed; and the lines `seedkeeper status` shows.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::StreamPosition;
use crate::error::Result;
use crate::store;

/// The realm's checkpoint row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub user: StreamPosition,
    pub admin: StreamPosition,
}

pub async fn load_checkpoint(c: &Client, realm: &str) -> Result<Option<Checkpoint>> {
    let row = c
        .query_typed_opt(
            "SELECT user_time, user_ids, admin_time, admin_ids FROM event_follower WHERE realm = $1",
            &[(&realm, Type::TEXT)],
        )
        .await
        .map_err(store::db_error("reading the event checkpoint"))?;
    Ok(row.map(|r| Checkpoint {
        user: StreamPosition {
            time: r.get(0),
            ids: r.get(1),
        },
        admin: StreamPosition {
            time: r.get(2),
            ids: r.get(3),
        },
    }))
}

pub async fn save_checkpoint(c: &Client, realm: &str, cp: &Checkpoint) -> Result<()> {
    c.query_typed(
        "INSERT INTO event_follower (realm, user_time, user_ids, admin_time, admin_ids, following, reason, updated_at)
         VALUES ($1, $2, $3, $4, $5, true, NULL, now())
         ON CONFLICT (realm) DO UPDATE SET user_time = $2, user_ids = $3, admin_time = $4, admin_ids = $5,
             following = true, reason = NULL, updated_at = now()",
        &[
            (&realm, Type::TEXT),
            (&cp.user.time, Type::INT8),
            (&cp.user.ids, Type::TEXT_ARRAY),
            (&cp.admin.time, Type::INT8),
            (&cp.admin.ids, Type::TEXT_ARRAY),
        ],
    )
    .await
    .map_err(store::db_error("saving the event checkpoint"))?;
    Ok(())
}

/// Records that events are not followed, and why (for `seedkeeper status`).
pub async fn save_not_following(c: &Client, realm: &str, reason: &str, now_ms: i64) -> Result<()> {
    c.query_typed(
        "INSERT INTO event_follower (realm, user_time, admin_time, following, reason, updated_at)
         VALUES ($1, $2, $2, false, $3, now())
         ON CONFLICT (realm) DO UPDATE SET following = false, reason = $3, updated_at = now()",
        &[
            (&realm, Type::TEXT),
            (&now_ms, Type::INT8),
            (&reason, Type::TEXT),
        ],
    )
    .await
    .map_err(store::db_error("recording that events are not followed"))?;
    Ok(())
}

/// One line per realm for `seedkeeper status`: whether events are followed, and where the
/// checkpoint stands or why they are not. Empty before the first run.
pub(crate) async fn status_lines(c: &Client) -> Result<Vec<String>> {
    if !store::table_exists(c, "event_follower").await? {
        return Ok(Vec::new());
    }
    let rows = c
        .query_typed(
            "SELECT realm, following, reason, greatest(user_time, admin_time), updated_at
             FROM event_follower ORDER BY realm",
            &[],
        )
        .await
        .map_err(store::db_error("reading the event follower's state"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let realm: String = r.get(0);
            let following: bool = r.get(1);
            let reason: Option<String> = r.get(2);
            let last: i64 = r.get(3);
            let updated: chrono::DateTime<chrono::Utc> = r.get(4);
            if following {
                let at = chrono::DateTime::from_timestamp_millis(last)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                    .unwrap_or_default();
                format!(
                    "events: following realm {realm:?}; applied up to {at} UTC (moved {})",
                    updated.format("%Y-%m-%d %H:%M:%S")
                )
            } else {
                format!(
                    "events: not followed in realm {realm:?} (schedule only): {}",
                    reason.unwrap_or_default()
                )
            }
        })
        .collect())
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
