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
        self.insert_token_unless(row, now, ("name", &row.name), |t| {
            format!("a token named {:?} exists (id {}); revoke it first", t.name, t.id)
        })
        .await
    }

    /// Stores the first admin token; refused when an active admin token exists.
    pub async fn bootstrap_admin(&self, row: &TokenRow, now: i64) -> Result<(), StoreError> {
        self.insert_token_unless(row, now, ("role", "admin"), |t| {
            format!(
                "an admin token exists already ({:?}, id {}); use it, or revoke every admin token to bootstrap again",
                t.name, t.id
            )
        })
        .await
    }

    /// Inserts `row` in one transaction with the check: refused, with `conflict`'s
    /// message, when an active token has `column = value`.
    async fn insert_token_unless(
        &self,
        row: &TokenRow,
        now: i64,
        (column, value): (&str, &str),
        conflict: impl Fn(&TokenRow) -> String,
    ) -> Result<(), StoreError> {
        let mut tx = self.exclusive("api_tokens").await?;
        let rows =
            sqlx::query(AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE {column} = $1")))
                .bind(value)
                .fetch_all(&mut *tx)
                .await?;
        for r in &rows {
            let t = TokenRow::decode(r)?;
            if t.active(now) {
                return Err(StoreError::Conflict(conflict(&t)));
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

/// A join token, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    pub id: String,
    pub secret_hash: String,
    /// JSON object of labels the agents it enrolls get.
    pub labels: String,
    pub uses: i64,
    pub used: i64,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: i64,
}

impl JoinTokenRow {
    fn decode(r: &AnyRow) -> Result<JoinTokenRow, sqlx::Error> {
        Ok(JoinTokenRow {
            id: r.try_get("id")?,
            secret_hash: r.try_get("secret_hash")?,
            labels: r.try_get("labels")?,
            uses: r.try_get("uses")?,
            used: r.try_get("used")?,
            created_at: r.try_get("created_at")?,
            created_by: r.try_get("created_by")?,
            expires_at: r.try_get("expires_at")?,
        })
    }

    /// Why it can enroll no agent at `now`, if it cannot.
    pub fn unusable(&self, now: i64) -> Option<String> {
        if self.expires_at <= now {
            Some(format!("the join token {} expired at {}", self.id, crate::auth::rfc3339(self.expires_at)))
        } else if self.used >= self.uses {
            Some(format!("the join token {} is used up ({} of {} uses)", self.id, self.used, self.uses))
        } else {
            None
        }
    }
}

const JOIN_COLUMNS: &str = "id, secret_hash, labels, uses, used, created_at, created_by, expires_at";

/// An enrolled agent's credential, or a revoked agent name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCredentialRow {
    pub name: String,
    pub agent_id: String,
    pub cred_id: Option<String>,
    pub secret_hash: Option<String>,
    pub labels: String,
    pub join_token: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub revoked_by: String,
}

impl AgentCredentialRow {
    fn decode(r: &AnyRow) -> Result<AgentCredentialRow, sqlx::Error> {
        Ok(AgentCredentialRow {
            name: r.try_get("name")?,
            agent_id: r.try_get("agent_id")?,
            cred_id: r.try_get("cred_id")?,
            secret_hash: r.try_get("secret_hash")?,
            labels: r.try_get("labels")?,
            join_token: r.try_get("join_token")?,
            created_at: r.try_get("created_at")?,
            revoked_at: r.try_get("revoked_at")?,
            revoked_by: r.try_get("revoked_by")?,
        })
    }
}

const CRED_COLUMNS: &str =
    "name, agent_id, cred_id, secret_hash, labels, join_token, created_at, revoked_at, revoked_by";

/// What enrolling an agent stores.
pub struct Enrollment<'a> {
    pub join_id: &'a str,
    pub name: &'a str,
    pub agent_id: &'a str,
    pub cred_id: &'a str,
    pub secret_hash: &'a str,
    pub now: i64,
}

impl Store {
    pub async fn insert_join_token(&self, row: &JoinTokenRow) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO join_tokens ({JOIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )))
        .bind(row.id.as_str())
        .bind(row.secret_hash.as_str())
        .bind(row.labels.as_str())
        .bind(row.uses)
        .bind(row.used)
        .bind(row.created_at)
        .bind(row.created_by.as_str())
        .bind(row.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!("SELECT {JOIN_COLUMNS} FROM join_tokens WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(JoinTokenRow::decode).transpose()?)
    }

    /// Trades one use of a join token for an agent credential, in one transaction: the
    /// token must still be usable, the name must not belong to another enrolled agent,
    /// nor the agent id to another name. Returns the labels the agent gets.
    pub async fn enroll(&self, e: &Enrollment<'_>) -> Result<String, StoreError> {
        let mut tx = self.exclusive("agent_credentials").await?;
        let join =
            sqlx::query(AssertSqlSafe(format!("SELECT {JOIN_COLUMNS} FROM join_tokens WHERE id = $1")))
                .bind(e.join_id)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(JoinTokenRow::decode)
                .transpose()?
                .ok_or_else(|| StoreError::Unauthenticated("unknown join token".into()))?;
        if let Some(why) = join.unusable(e.now) {
            return Err(StoreError::Unauthenticated(why));
        }
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CRED_COLUMNS} FROM agent_credentials WHERE (name = $1 OR agent_id = $2) AND revoked_at IS NULL"
        )))
        .bind(e.name)
        .bind(e.agent_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let c = AgentCredentialRow::decode(r)?;
            if c.name == e.name && c.agent_id != e.agent_id {
                return Err(StoreError::Conflict(format!(
                    "an agent named {:?} is enrolled already (agent id {}); revoke it first (baton agents revoke {})",
                    c.name, c.agent_id, c.name
                )));
            }
            if c.agent_id == e.agent_id && c.name != e.name {
                return Err(StoreError::Conflict(format!(
                    "agent id {} is enrolled already as {:?}",
                    c.agent_id, c.name
                )));
            }
        }
        sqlx::query("UPDATE join_tokens SET used = used + 1 WHERE id = $1")
            .bind(e.join_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM agent_credentials WHERE name = $1").bind(e.name).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO agent_credentials ({CRED_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, '')"
        )))
        .bind(e.name)
        .bind(e.agent_id)
        .bind(e.cred_id)
        .bind(e.secret_hash)
        .bind(join.labels.as_str())
        .bind(e.join_id)
        .bind(e.now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(join.labels)
    }

    /// The agent credential with this id.
    pub async fn agent_credential(&self, cred_id: &str) -> Result<Option<AgentCredentialRow>, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CRED_COLUMNS} FROM agent_credentials WHERE cred_id = $1"
        )))
        .bind(cred_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(AgentCredentialRow::decode).transpose()?)
    }

    /// When the agent name was revoked, if it was.
    pub async fn agent_revoked(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let r = sqlx::query("SELECT revoked_at FROM agent_credentials WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => r.try_get::<Option<i64>, _>("revoked_at")?,
            None => None,
        })
    }

    /// Revokes an agent name: its credential stops working, and a certificate with the
    /// name is refused. Returns the agent id it was enrolled with, if it was.
    pub async fn revoke_agent(&self, name: &str, by: &str, now: i64) -> Result<Option<String>, StoreError> {
        let mut tx = self.exclusive("agent_credentials").await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CRED_COLUMNS} FROM agent_credentials WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(AgentCredentialRow::decode)
        .transpose()?;
        let id = match &row {
            Some(r) => {
                sqlx::query("UPDATE agent_credentials SET revoked_at = $1, revoked_by = $2 WHERE name = $3")
                    .bind(now)
                    .bind(by)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                Some(r.agent_id.clone())
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO agent_credentials ({CRED_COLUMNS}) VALUES ($1, '', NULL, NULL, '{{}}', '', $2, $2, $3)"
                )))
                .bind(name)
                .bind(now)
                .bind(by)
                .execute(&mut *tx)
                .await?;
                None
            }
        };
        tx.commit().await?;
        Ok(id)
    }
}

/// A sealed secret, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    pub sealed: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub updated_by: String,
}

impl SecretRow {
    fn decode(r: &AnyRow) -> Result<SecretRow, sqlx::Error> {
        Ok(SecretRow {
            name: r.try_get("name")?,
            sealed: r.try_get("sealed")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            updated_by: r.try_get("updated_by")?,
        })
    }
}

impl Store {
    /// Stores a sealed secret, replacing one of the same name (its creation time stays).
    pub async fn put_secret(
        &self,
        name: &str,
        sealed: &str,
        by: &str,
        now: i64,
    ) -> Result<SecretRow, StoreError> {
        let mut tx = self.exclusive("secrets").await?;
        let created = sqlx::query("SELECT created_at FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<i64, _>("created_at"))
            .transpose()?
            .unwrap_or(now);
        sqlx::query("DELETE FROM secrets WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO secrets (name, sealed, created_at, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5)")
            .bind(name)
            .bind(sealed)
            .bind(created)
            .bind(now)
            .bind(by)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(SecretRow {
            name: name.into(),
            sealed: sealed.into(),
            created_at: created,
            updated_at: now,
            updated_by: by.into(),
        })
    }

    pub async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        let rows =
            sqlx::query("SELECT name, sealed, created_at, updated_at, updated_by FROM secrets ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(SecretRow::decode).collect::<Result<_, _>>()?)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<SecretRow, StoreError> {
        let mut tx = self.exclusive("secrets").await?;
        let row = sqlx::query(
            "SELECT name, sealed, created_at, updated_at, updated_by FROM secrets WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(SecretRow::decode)
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("no secret named {name:?}")))?;
        sqlx::query("DELETE FROM secrets WHERE name = $1").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(row)
    }
}
