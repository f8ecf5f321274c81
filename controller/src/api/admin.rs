//! `baton.v1.AdminService`: who the caller is, and API tokens.

use std::sync::Arc;

use super::ApiError;
use baton_common::auth::{Role, USER_ROLES};
use baton_common::time::now_ms;
use baton_common::{pb, proto};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{Authenticator, Identity, tokens};
use crate::store::{Store, TokenRow};

pub struct AdminApi {
    store: Store,
    auth: Arc<Authenticator>,
    leadership: crate::leader::Leadership,
    secrets: Option<Arc<crate::secrets::SecretBox>>,
}

impl AdminApi {
    pub fn new(
        store: Store,
        auth: Arc<Authenticator>,
        leadership: crate::leader::Leadership,
        secrets: Option<Arc<crate::secrets::SecretBox>>,
    ) -> AdminApi {
        AdminApi { store, auth, leadership, secrets }
    }
}

/// Largest secret value.
const MAX_SECRET_BYTES: usize = 64 * 1024;

/// A requested lifetime in milliseconds; 0 when none was given.
fn ttl_ms(ttl: Option<&proto::Duration>) -> Result<i64, Status> {
    match ttl {
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(ApiError::invalid("ttl must not be negative").into()),
        Some(d) => Ok(proto::duration_millis(d)),
        None => Ok(0),
    }
}

fn secret_info(r: &crate::store::SecretRow) -> pb::SecretInfo {
    pb::SecretInfo {
        name: r.name.clone(),
        created_at: Some(proto::timestamp(r.created_at)),
        updated_at: Some(proto::timestamp(r.updated_at)),
        updated_by: r.updated_by.clone(),
    }
}

fn check_secret_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "secret name {name:?}: use 1 to 64 letters, digits, '-' or '_' (specs say ${{{{ secrets.NAME }}}})"
        )).into())
    }
}

/// How long a join token lasts unless told otherwise.
const JOIN_TOKEN_TTL_MS: i64 = 60 * 60 * 1000;

/// Names of tokens and agents: what events and lists show.
pub fn check_name(what: &str, name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or '@'"
        ))
        .into())
    }
}

/// A new API token's row; the token text goes to the caller once.
pub fn new_token(name: &str, role: Role, ttl_ms: i64, created_by: &str) -> (String, TokenRow) {
    let minted = tokens::mint(tokens::Kind::Api);
    let now = now_ms();
    let row = TokenRow {
        id: minted.id,
        name: name.to_string(),
        role: role.as_str().to_string(),
        secret_hash: minted.hash,
        created_at: now,
        created_by: created_by.to_string(),
        expires_at: (ttl_ms > 0).then(|| now.saturating_add(ttl_ms)),
        revoked_at: None,
    };
    (minted.token, row)
}

pub fn token_info(t: &TokenRow) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        created_at: Some(proto::timestamp(t.created_at)),
        created_by: t.created_by.clone(),
        expires_at: proto::timestamp_opt(t.expires_at.filter(|&t| t > 0)),
        revoked_at: proto::timestamp_opt(t.revoked_at.filter(|&t| t > 0)),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let me = Identity::of(&req);
        Ok(Response::new(pb::WhoAmIResponse {
            name: me.name.clone(),
            role: me.role.map(|r| r.to_string()).unwrap_or_default(),
            via: me.via_name().to_string(),
            auth_required: self.auth.mode() == crate::auth::AuthMode::Required,
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        check_name("token", &req.name)?;
        let role: Role = req.role.parse().map_err(ApiError::invalid)?;
        if !USER_ROLES.contains(&role) {
            return Err(ApiError::invalid(format!(
                "an API token cannot have role {role}: agents enroll with a join token (baton agents join-token)"
            )).into());
        }
        let ttl = ttl_ms(req.ttl.as_ref())?;
        let (token, row) = new_token(&req.name, role, ttl, &actor);
        self.store.insert_token(&row, now_ms()).await?;
        info!(token = %row.name, id = %row.id, %role, by = %actor, "API token created");
        Ok(Response::new(pb::CreateTokenResponse { token, info: Some(token_info(&row)) }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let all = req.into_inner().all;
        let now = now_ms();
        let tokens =
            self.store.tokens().await?.iter().filter(|t| all || t.active(now)).map(token_info).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let actor = Identity::of(&req).actor();
        let which = req.into_inner().token;
        if which.is_empty() {
            return Err(ApiError::invalid("revoke token: give its name or id").into());
        }
        let row = self.store.revoke_token(&which, now_ms()).await?;
        self.auth.forget();
        info!(token = %row.name, id = %row.id, by = %actor, "API token revoked");
        Ok(Response::new(token_info(&row)))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        let ttl = match ttl_ms(req.ttl.as_ref())? {
            0 => JOIN_TOKEN_TTL_MS,
            t => t,
        };
        let uses = if req.uses == 0 { 1 } else { req.uses };
        for k in req.labels.keys() {
            if k.trim().is_empty() {
                return Err(ApiError::invalid("join token labels: a label key is empty").into());
            }
        }
        let labels: std::collections::BTreeMap<String, String> = req.labels.into_iter().collect();
        let minted = tokens::mint(tokens::Kind::Join);
        let now = now_ms();
        let row = crate::store::JoinTokenRow {
            id: minted.id,
            secret_hash: minted.hash,
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            uses: i64::from(uses),
            used: 0,
            created_at: now,
            created_by: actor.clone(),
            expires_at: now.saturating_add(ttl),
        };
        self.store.insert_join_token(&row).await?;
        info!(join_token = %row.id, uses, by = %actor, "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: minted.token,
            id: row.id,
            expires_at: Some(proto::timestamp(row.expires_at)),
            uses,
        }))
    }

    async fn revoke_agent(
        &self,
        req: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        let actor = Identity::of(&req).actor();
        let name = req.into_inner().agent;
        check_name("agent", &name)?;
        // The leader holds the streams: only it can close them at once.
        let (engine, _) = self.leadership.engine()?;
        let agent_id = self.store.revoke_agent(&name, &actor, now_ms()).await?;
        self.auth.forget();
        let closed = engine.revoke(name.clone(), actor.clone()).await?;
        info!(agent = %name, closed, by = %actor, "agent revoked");
        Ok(Response::new(pb::RevokeAgentResponse { name, agent_id: agent_id.unwrap_or_default(), closed }))
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let actor = Identity::of(&req).actor();
        let req = req.into_inner();
        check_secret_name(&req.name)?;
        if req.value.is_empty() {
            return Err(ApiError::invalid(format!("secret {:?}: the value is empty", req.name)).into());
        }
        if req.value.len() > MAX_SECRET_BYTES {
            return Err(ApiError::invalid(format!(
                "secret {:?} is {} bytes; the limit is {MAX_SECRET_BYTES}",
                req.name,
                req.value.len()
            ))
            .into());
        }
        if req.value.contains('\0') {
            return Err(
                ApiError::invalid(format!("secret {:?}: the value holds a NUL byte", req.name)).into()
            );
        }
        let Some(sealer) = &self.secrets else {
            return Err(
                ApiError::conflict("this controller keeps no secrets: start it with --secrets-key").into()
            );
        };
        // The leader uses secrets: it must hear of the new value.
        let (engine, _) = self.leadership.engine()?;
        let sealed = sealer.seal(&crate::secrets::secret_aad(&req.name), &req.value);
        let row = self.store.put_secret(&req.name, &sealed, &actor, now_ms()).await?;
        engine.set_secret(req.name.clone(), Some(req.value)).await?;
        info!(secret = %row.name, by = %actor, "secret stored");
        Ok(Response::new(secret_info(&row)))
    }

    async fn list_secrets(
        &self,
        _req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let secrets = self.store.secrets().await?.iter().map(secret_info).collect();
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let actor = Identity::of(&req).actor();
        let name = req.into_inner().name;
        check_secret_name(&name)?;
        let (engine, _) = self.leadership.engine()?;
        let row = self.store.delete_secret(&name).await?;
        engine.set_secret(name, None).await?;
        info!(secret = %row.name, by = %actor, "secret deleted");
        Ok(Response::new(secret_info(&row)))
    }
}
