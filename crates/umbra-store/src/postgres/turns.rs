//! Turns: transaction-scoped advisory locks taken, in PostgreSQL's fair
//! queue, just before a row whose lock would otherwise not be fair.
//!
//! A group's turn comes before the group's row: fan-outs share it, and
//! whatever moves the epoch or the members (a commit, a proposal, a
//! revocation, a device removed) takes it alone. A line's turn comes
//! before the line's row in `accounts`: sends share it (the sender's line,
//! a commit's added lines, a contact's two lines), and whatever changes
//! the line's row (a revocation, a lapsed line's end, a suspension, a
//! renewal, a device log's append, a wipe command, the day it was seen)
//! takes it alone. (A line's own KeyPackage uploads and blob creations
//! lock its row without a turn: they can delay only its own changes.)
//!
//! PostgreSQL queues advisory locks fairly: once a commit waits, the
//! fan-outs that come after wait behind it. Row locks are not fair: a
//! fan-out's `FOR SHARE` joins the others already on the row without
//! waiting for a `FOR UPDATE` queued before it, so on a group some fan-out
//! always held, a commit waited until its time limit (14 s with sixteen
//! senders on two nodes), and a line sending from many connections at
//! once held its own revocation off the same way. Several turns in one
//! statement are taken in the order of their keys. Each statement taking
//! turns gates its row locks on them, as the acknowledgements do (a
//! one-time filter, evaluated first).

use std::sync::LazyLock;

/// Whose turn a statement takes.
#[derive(Clone, Copy)]
pub(super) enum Turn {
    /// Groups: the query chosen yields `group_id`.
    Group,
    /// Lines: the query chosen yields `account_id`.
    Line,
}

/// The CTE `turns` taking the turns of what `chosen` (a query) yields,
/// `shared` or alone.
pub(super) fn turns(of: Turn, chosen: &str, shared: bool) -> String {
    let lock = if shared {
        "pg_advisory_xact_lock_shared"
    } else {
        "pg_advisory_xact_lock"
    };
    let key = match of {
        Turn::Group => turn_key("756d6772", "group_id"),
        Turn::Line => turn_key("756d6c6e", "convert_to(account_id, 'UTF8')"),
    };
    format!(
        "turns AS MATERIALIZED (
             SELECT {lock}(k)
             FROM (SELECT DISTINCT {key} AS k FROM ({chosen}) AS chosen) AS keys
             ORDER BY k
         )"
    )
}

/// The SQL for the key of a turn: the first 64 bits of SHA-256 over a
/// four-byte domain (`domain`, hex: "umgr" for groups, "umln" for lines)
/// and the ID (`id`, an expression of type `bytea`). A group's ID is the
/// client's choice, so its key must be one nobody can aim at another
/// group's: the 32-bit `hashtext` the groups' turns first used is public
/// and cheap (a matching ID is a few seconds' search), and a group whose
/// key matched would hold up the other's commits with its own. Matching
/// 64 bits of SHA-256 takes about 2^64 tries. The keys share
/// PostgreSQL's 64-bit advisory lock space with [`super::lock_key`]'s,
/// which hashes a length first, never these domains.
fn turn_key(domain: &str, id: &str) -> String {
    format!(
        "('x' || encode(substr(sha256(decode('{domain}', 'hex') || {id}), 1, 8), 'hex'))::bit(64)::bigint"
    )
}

/// A send's read of its sender's line (`$1`), shared.
pub(super) static LINE_SHARED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} SELECT status, subscription_expires_at FROM accounts
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND account_id = $1 FOR SHARE",
        turns(Turn::Line, "SELECT $1::text AS account_id", true)
    )
});

/// A batch's read of its senders' lines (`$1`), shared.
pub(super) static LINES_SHARED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} SELECT account_id, status, subscription_expires_at FROM accounts
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND account_id = ANY($1::text[])
         ORDER BY account_id FOR SHARE",
        turns(Turn::Line, "SELECT unnest($1::text[]) AS account_id", true)
    )
});

/// A contact's read of its two lines (`$1`), their turns shared and rows
/// locked `FOR KEY SHARE` (all a contact row's foreign keys need): any line
/// may name any other here, and must not hold off its revocation.
pub(super) static LINES_KEY_SHARED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} SELECT status FROM accounts
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND account_id = ANY($1::text[])
         ORDER BY account_id FOR KEY SHARE",
        turns(Turn::Line, "SELECT unnest($1::text[]) AS account_id", true)
    )
});

/// The row of the line `account`, locked to change it, its turn taken
/// alone first (what any statement changing the line's row takes first).
pub(super) async fn lock_line(
    tx: &deadpool_postgres::Transaction<'_>,
    account: &str,
) -> std::result::Result<(), super::Failure> {
    static LOCK: LazyLock<String> = LazyLock::new(|| line_alone("1", "NO KEY UPDATE"));
    let statement = tx.prepare_cached(&LOCK).await?;
    tx.execute(&statement, &[&account]).await?;
    Ok(())
}

/// The line `$1`'s row with `columns`, locked (`strength`: `UPDATE` to
/// delete what hangs on it, `NO KEY UPDATE` to change it, which leaves the
/// line's own KeyPackage uploads, key-sharing it, alone), its turn taken
/// alone first.
pub(super) fn line_alone(columns: &str, strength: &str) -> String {
    format!(
        "WITH {} SELECT {columns} FROM accounts
         WHERE (SELECT COUNT(*) FROM turns) >= 0 AND account_id = $1 FOR {strength}",
        turns(Turn::Line, "SELECT $1::text AS account_id", false)
    )
}
