//! API tokens, join tokens, agent credentials and sealed secrets. Tokens are stored as
//! hashes of their secret part; secrets as ciphertext (see `crate::secrets`).

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{Backend, Store, StoreError};

/// An API token, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_hash: String,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl TokenRow {
    /// Not revoked and not expired at `now`.
    pub fn active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }

    fn decode(r: &AnyRow) -> Result<TokenRow, sqlx::Error> {
        Ok(TokenRow {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            role: r.try_get("role")?,
            secret_hash: r.try_get("secret_hash")?,
            created_at: r.try_get("created_at")?,
            created_by: r.try_get("created_by")?,
            expires_at: r.try_get("expires_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }
}

const TOKEN_COLUMNS: &str = "id, name, role, secret_hash, created_at, created_by, expires_at, revoked_at";

impl Store {
    /// A transaction that holds `table` against other writers until it ends, so a
    /// check and the insert it guards are one step.
    pub(crate) async fn exclusive(
        &self,
        table: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query(AssertSqlSafe(format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")))
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        })
    }

    /// Stores a new API token; refused when an active token has the same name.
    pub async fn insert_token(&self, row: &TokenRow, now: i64) -> Result<(), StoreError> {
        let mut tx = self.exclusive("api_tokens").await?;
        let same =
            sqlx::query(AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE name = $1")))
                .bind(row.name.as_str())
                .fetch_all(&mut *tx)
                .await?;
        for r in &same {
            let t = TokenRow::decode(r)?;
            if t.active(now) {
                return Err(StoreError::Conflict(format!(
                    "a token named {:?} exists (id {}); revoke it first",
                    t.name, t.id
                )));
            }
        }
        insert_token_row(&mut tx, row).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores the first admin token; refused when an active admin token exists.
    pub async fn bootstrap_admin(&self, row: &TokenRow, now: i64) -> Result<(), StoreError> {
        let mut tx = self.exclusive("api_tokens").await?;
        let admins = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE role = 'admin'"
        )))
        .fetch_all(&mut *tx)
        .await?;
        for r in &admins {
            let t = TokenRow::decode(r)?;
            if t.active(now) {
                return Err(StoreError::Conflict(format!(
                    "an admin token exists already ({:?}, id {}); use it, or revoke every admin token to bootstrap again",
                    t.name, t.id
                )));
            }
        }
        insert_token_row(&mut tx, row).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(TokenRow::decode).transpose()?)
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(TokenRow::decode).collect::<Result<_, _>>()?)
    }

    /// Revokes the active token with this id or name.
    pub async fn revoke_token(&self, id_or_name: &str, now: i64) -> Result<TokenRow, StoreError> {
        let mut tx = self.exclusive("api_tokens").await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1 OR name = $1"
        )))
        .bind(id_or_name)
        .fetch_all(&mut *tx)
        .await?;
        let mut found: Vec<TokenRow> = rows.iter().map(TokenRow::decode).collect::<Result<_, _>>()?;
        found.retain(|t| t.active(now));
        let mut t = match found.len() {
            0 => return Err(StoreError::NotFound(format!("no active token with id or name {id_or_name:?}"))),
            1 => found.remove(0),
            _ => {
                return Err(StoreError::Conflict(format!("{id_or_name:?} names several tokens; give an id")));
            }
        };
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(t.id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        t.revoked_at = Some(now);
        Ok(t)
    }
}

async fn insert_token_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    row: &TokenRow,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    )))
    .bind(row.id.as_str())
    .bind(row.name.as_str())
    .bind(row.role.as_str())
    .bind(row.secret_hash.as_str())
    .bind(row.created_at)
    .bind(row.created_by.as_str())
    .bind(row.expires_at)
    .bind(row.revoked_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
