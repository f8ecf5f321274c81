//! Who is calling, and whether they may: every request's identity comes from its bearer
//! token or its client certificate, and one tower layer checks it against the table of
//! RPCs ([`table::RPCS`]) before any service sees the request. Services read the
//! caller from the request's extensions ([`Identity::of`]).

pub mod table;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use baton_common::auth::Role;
use baton_common::time::now_ms;
use tonic::codegen::http;
use tonic::{Code, Status};
use tracing::warn;

use crate::api::ApiError;
use crate::store::Store;
use crate::tls::Peer;
use table::Need;
use tokens::Kind;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Whether callers must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone who reaches the port may do anything: only for a controller that listens
    /// on loopback without TLS (`baton dev`, a single machine).
    Off,
    Required,
}

/// How an identity was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Token {
        id: String,
    },
    Certificate,
    /// An enrolled agent's credential, bound to its agent id.
    Agent {
        agent_id: String,
    },
    JoinToken {
        id: String,
    },
    /// Authentication is off and no credential was given.
    Anonymous,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// A token's name, a certificate's name, an agent's name.
    pub name: String,
    /// `None` for a join token (it may only enroll) and for anonymous callers.
    pub role: Option<Role>,
    pub via: Via,
    /// Labels an enrolled agent was given by its join token.
    pub labels: BTreeMap<String, String>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity { name: "anonymous".into(), role: None, via: Via::Anonymous, labels: BTreeMap::new() }
    }

    /// The caller of a request; anonymous when authentication is off and it gave no
    /// credential.
    pub fn of<T>(req: &tonic::Request<T>) -> Identity {
        req.extensions().get::<Identity>().cloned().unwrap_or_else(Identity::anonymous)
    }

    /// How events and logs name the caller: "token alice", "certificate ops-1".
    pub fn actor(&self) -> String {
        match &self.via {
            Via::Token { .. } => format!("token {}", self.name),
            Via::Certificate => format!("certificate {}", self.name),
            Via::Agent { .. } => format!("agent {}", self.name),
            Via::JoinToken { id } => format!("join token {id}"),
            Via::Anonymous => "anonymous".to_string(),
        }
    }

    pub fn via_name(&self) -> &'static str {
        match self.via {
            Via::Token { .. } => "token",
            Via::Certificate => "certificate",
            Via::Agent { .. } => "agent",
            Via::JoinToken { .. } => "join_token",
            Via::Anonymous => "anonymous",
        }
    }
}

/// How long a credential check is reused: a revoked or expired token fails within this.
const CACHE_FOR: Duration = Duration::from_secs(1);

type Checked = Result<Identity, (Code, String)>;

/// Resolves credentials against the store, caching each answer for a second.
pub struct Authenticator {
    mode: AuthMode,
    store: Store,
    /// Answers per token.
    cache: Mutex<HashMap<String, (Instant, Checked)>>,
    /// When an agent name was revoked (for agent certificates), per name.
    revocations: Mutex<HashMap<String, (Instant, Option<i64>)>>,
}

impl Authenticator {
    pub fn new(mode: AuthMode, store: Store) -> Arc<Authenticator> {
        Arc::new(Authenticator {
            mode,
            store,
            cache: Mutex::new(HashMap::new()),
            revocations: Mutex::new(HashMap::new()),
        })
    }

    /// The check `/metrics` makes when callers must authenticate: a reader's
    /// credential.
    pub fn metrics_gate(self: &Arc<Self>) -> Option<baton_common::metrics::AuthorizeFn> {
        if self.mode != AuthMode::Required {
            return None;
        }
        let auth = self.clone();
        Some(Arc::new(move |header: Option<String>| {
            let auth = auth.clone();
            Box::pin(async move { auth.may_read(header).await }) as BoxFuture<bool>
        }))
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Drops cached answers, so a revocation applies to the very next call here.
    pub fn forget(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
        if let Ok(mut r) = self.revocations.lock() {
            r.clear();
        }
    }

    /// The identity a request presents, if any: its bearer token, else its client
    /// certificate.
    pub async fn identify(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Option<Identity>, Status> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return match peer.and_then(|p| p.certs.as_ref()).and_then(|c| c.first()) {
                Some(leaf) => self.certificate(leaf).await.map(Some),
                None => Ok(None),
            };
        };
        let text = value.to_str().unwrap_or("");
        let token =
            text.strip_prefix("Bearer ").or_else(|| text.strip_prefix("bearer ")).unwrap_or("").trim();
        if token.is_empty() {
            return Err(ApiError::unauthenticated("the authorization header must be \"Bearer TOKEN\"").into());
        }
        self.token(token).await.map(Some)
    }

    /// The identity a verified client certificate names in its URI SAN.
    async fn certificate(&self, leaf: &CertificateDer<'static>) -> Result<Identity, Status> {
        let denied = |m: String| Err(ApiError::unauthenticated(m).into());
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| ApiError::unauthenticated(format!("unreadable client certificate: {e}")))?;
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let Some((role, name)) = uris.iter().find_map(|u| baton_common::certs::parse_identity_uri(u)) else {
            return denied(
                "the client certificate names no Baton identity (a URI SAN spiffe://baton/ROLE/NAME)".into(),
            );
        };
        if role == "controller" {
            return denied(format!("certificate {name} is a controller's, not a caller's"));
        }
        let Ok(role) = role.parse::<Role>() else {
            return denied(format!("certificate {name} names an unknown role {role:?}"));
        };
        if role == Role::Agent
            && let Some(at) = self.revoked(name).await?
        {
            return denied(format!("agent {name} was revoked at {}", rfc3339(at)));
        }
        Ok(Identity {
            name: name.to_string(),
            role: Some(role),
            via: Via::Certificate,
            labels: BTreeMap::new(),
        })
    }

    async fn token(&self, token: &str) -> Result<Identity, Status> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, checked)) = cache.get(token)
            && at.elapsed() < CACHE_FOR
        {
            return checked.clone().map_err(|(code, m)| Status::new(code, m));
        }
        let checked = match self.resolve(token).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot check a credential");
                return Err(ApiError::unavailable(format!("cannot check the credential: {e}")).into());
            }
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(token.to_string(), (Instant::now(), checked.clone()));
        }
        checked.map_err(|(code, m)| Status::new(code, m))
    }

    /// What the store says of a token.
    async fn resolve(&self, token: &str) -> Result<Checked, crate::store::StoreError> {
        let denied = |m: String| Err((Code::Unauthenticated, m));
        let Some(parsed) = tokens::parse(token) else {
            return Ok(denied("the token is not a Baton token".into()));
        };
        let now = now_ms();
        match parsed.kind {
            Kind::Api => {
                let Some(row) = self.store.token(parsed.id).await? else {
                    return Ok(denied("unknown token".into()));
                };
                if !tokens::verify(&row.secret_hash, parsed.secret) {
                    return Ok(denied("unknown token".into()));
                }
                if let Some(at) = row.revoked_at {
                    return Ok(denied(format!("token {:?} was revoked at {}", row.name, rfc3339(at))));
                }
                if let Some(at) = row.expires_at.filter(|e| *e <= now) {
                    return Ok(denied(format!("token {:?} expired at {}", row.name, rfc3339(at))));
                }
                let Ok(role) = row.role.parse::<Role>() else {
                    return Ok(denied(format!("token {:?} has an unknown role {:?}", row.name, row.role)));
                };
                Ok(Ok(Identity {
                    name: row.name,
                    role: Some(role),
                    via: Via::Token { id: row.id },
                    labels: BTreeMap::new(),
                }))
            }
            Kind::Agent => {
                let Some(row) = self.store.agent_credential(parsed.id).await? else {
                    return Ok(denied("unknown agent credential".into()));
                };
                if !row.secret_hash.as_deref().is_some_and(|h| tokens::verify(h, parsed.secret)) {
                    return Ok(denied("unknown agent credential".into()));
                }
                if let Some(at) = row.revoked_at {
                    return Ok(denied(format!("agent {} was revoked at {}", row.name, rfc3339(at))));
                }
                Ok(Ok(Identity {
                    labels: serde_json::from_str(&row.labels).unwrap_or_default(),
                    name: row.name,
                    role: Some(Role::Agent),
                    via: Via::Agent { agent_id: row.agent_id },
                }))
            }
            Kind::Join => {
                let Some(row) = self.store.join_token(parsed.id).await? else {
                    return Ok(denied("unknown join token".into()));
                };
                if !tokens::verify(&row.secret_hash, parsed.secret) {
                    return Ok(denied("unknown join token".into()));
                }
                if let Some(why) = row.unusable(now) {
                    return Ok(denied(why));
                }
                Ok(Ok(Identity {
                    name: format!("join token {}", row.id),
                    role: None,
                    labels: serde_json::from_str(&row.labels).unwrap_or_default(),
                    via: Via::JoinToken { id: row.id },
                }))
            }
        }
    }

    /// When an agent name was revoked, if it was (an agent certificate with it is
    /// refused).
    async fn revoked(&self, name: &str) -> Result<Option<i64>, Status> {
        if let Ok(cache) = self.revocations.lock()
            && let Some((at, revoked)) = cache.get(name)
            && at.elapsed() < CACHE_FOR
        {
            return Ok(*revoked);
        }
        let revoked = self
            .store
            .agent_revoked(name)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot check the credential: {e}")))?;
        if let Ok(mut cache) = self.revocations.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(name.to_string(), (Instant::now(), revoked));
        }
        Ok(revoked)
    }

    /// Whether an `authorization` header carries a credential with role reader (for
    /// plain HTTP endpoints such as `/metrics`).
    pub async fn may_read(&self, authorization: Option<String>) -> bool {
        let mut headers = http::HeaderMap::new();
        if let Some(v) = authorization.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        matches!(self.identify(&headers, None).await, Ok(Some(i)) if i.role.is_some_and(|r| r.includes(Role::Reader)))
    }

    /// Decides a request: its identity (to put on it), or the status that refuses it.
    async fn admit(&self, req: &http::request::Parts) -> Result<Option<Identity>, Status> {
        self.admit_call(req.uri.path(), &req.headers, req.extensions.get::<Peer>()).await
    }

    /// Decides a call of the RPC at `path` (`/baton.v1.BatonService/GetRun`) made with
    /// these headers: on the API port, and by the dashboard's calls on the HTTP port.
    pub async fn admit_call(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Option<Identity>, Status> {
        let need = table::need_of(path);
        let found = self.identify(headers, peer).await;
        if self.mode == AuthMode::Off {
            return Ok(Some(found.ok().flatten().unwrap_or_else(Identity::anonymous)));
        }
        if need == Some(Need::Public) {
            return Ok(found.ok().flatten());
        }
        let Some(identity) = found? else {
            return Err(ApiError::unauthenticated(
                "no credential: this controller requires a token (--token or BATON_TOKEN) or a client certificate",
            ).into());
        };
        let method = path.rsplit('/').next().unwrap_or(path);
        let allowed = match need {
            None => {
                return Err(ApiError::denied(format!("{path} is not an RPC of this controller")).into());
            }
            Some(Need::Public | Need::Authenticated) => true,
            Some(Need::JoinToken) => matches!(identity.via, Via::JoinToken { .. }),
            Some(Need::Role(r)) => identity.role.is_some_and(|have| have.includes(r)),
        };
        if allowed {
            return Ok(Some(identity));
        }
        let has = identity.role.map(|r| format!("role {r}")).unwrap_or_else(|| "no role".into());
        let needs = match need {
            Some(Need::Role(r)) => format!("role {r}"),
            Some(Need::JoinToken) => "a join token".into(),
            _ => "another credential".into(),
        };
        Err(ApiError::denied(format!("{} ({has}) may not call {method}: it needs {needs}", identity.actor()))
            .into())
    }
}

pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

/// The tower layer that admits or refuses every request of the API port.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            match auth.admit(&parts).await {
                Ok(identity) => {
                    if let Some(identity) = identity {
                        parts.extensions.insert(identity);
                    }
                    inner.call(http::Request::from_parts(parts, body)).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// What `--auth` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFlag {
    /// Required with TLS or off loopback; off on loopback without TLS.
    Auto,
    Required,
}

/// Secure by default: whether a controller on `listen` may start, and whether callers
/// must authenticate. Off loopback it needs TLS (or `--insecure`, which still requires
/// authentication); with TLS, or off loopback, authentication is always required.
/// Returns the mode and, for plaintext off loopback, a warning to print.
pub fn decide(
    listen: std::net::SocketAddr,
    tls: bool,
    insecure: bool,
    flag: AuthFlag,
) -> Result<(AuthMode, Option<String>), String> {
    let loopback = listen.ip().is_loopback();
    if !loopback && !tls && !insecure {
        return Err(format!(
            "refusing to listen on {listen} without TLS: give --tls-cert and --tls-key \
             (`baton certs` makes them), or --insecure to serve plaintext anyway"
        ));
    }
    if !loopback && !tls {
        return Ok((
            AuthMode::Required,
            Some(format!(
                "INSECURE: serving plaintext gRPC on {listen}: tokens, secrets and step output cross \
                 the network unencrypted and can be read or changed by anyone on the path"
            )),
        ));
    }
    let mode = if tls || flag == AuthFlag::Required { AuthMode::Required } else { AuthMode::Off };
    Ok((mode, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_needs_tls_or_insecure_and_always_authentication() {
        let lo: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let e = decide(any, false, false, AuthFlag::Auto).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
        let (mode, warning) = decide(any, false, true, AuthFlag::Auto).unwrap();
        assert_eq!(mode, AuthMode::Required);
        assert!(warning.unwrap().starts_with("INSECURE"));
        assert_eq!(decide(any, true, false, AuthFlag::Auto).unwrap(), (AuthMode::Required, None));
        assert_eq!(decide(lo, true, false, AuthFlag::Auto).unwrap(), (AuthMode::Required, None));
        assert_eq!(decide(lo, false, false, AuthFlag::Auto).unwrap(), (AuthMode::Off, None));
        assert_eq!(decide(lo, false, false, AuthFlag::Required).unwrap(), (AuthMode::Required, None));
        let v6: std::net::SocketAddr = "[::1]:7070".parse().unwrap();
        assert_eq!(decide(v6, false, false, AuthFlag::Auto).unwrap().0, AuthMode::Off);
    }
}
