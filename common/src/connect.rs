//! How clients (the `baton` command, agents, tests) reach a controller: the endpoint
//! for a URL with its TLS settings, and the bearer token sent with every call.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of a client: the CA that signed the controller's certificate (else the
/// system's roots), and a client certificate for mutual TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A bearer token attached to every call (none: no `authorization` header).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token holds characters a header cannot carry".to_string()),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the bearer token.
pub type AuthChannel = InterceptedService<tonic::transport::Channel, Bearer>;

/// `url` with its scheme: a bare `host:port` is `https://` when TLS files are given and
/// `http://` when not.
pub fn with_scheme(url: &str, tls: &ClientTls) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else if tls.ca.is_some() || tls.cert.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    }
}

/// The endpoint for `url` (`http://`, `https://`, or a bare `host:port`, see
/// [`with_scheme`]), with TLS for `https://`. Files are read now, so that a renewed
/// certificate is used by the next connection.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, String> {
    let url = &with_scheme(url, tls);
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(format!("controller url {url:?}: the scheme must be http:// or https://"));
    }
    let mut e = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad controller url {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let https = url.starts_with("https://");
    if !https {
        if tls.ca.is_some() || tls.cert.is_some() {
            return Err(format!(
                "controller url {url:?} is plaintext but TLS files were given: use https://"
            ));
        }
        return Ok(e);
    }
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|err| format!("cannot read the {what} {}: {err}", p.display()))
    };
    let mut cfg = ClientTlsConfig::new();
    cfg = match &tls.ca {
        Some(ca) => cfg.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
        None => cfg.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(Identity::from_pem(read(c, "client certificate")?, read(k, "client key")?));
        }
        (None, None) => {}
        _ => return Err("a client certificate needs both --tls-cert and --tls-key".into()),
    }
    e = e.tls_config(cfg).map_err(|err| format!("TLS settings for {url}: {err}"))?;
    Ok(e)
}

/// The text of an error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_scheme_is_https_with_tls_files_and_http_without() {
        let plain = ClientTls::default();
        let tls = ClientTls { ca: Some("ca.pem".into()), ..Default::default() };
        assert_eq!(with_scheme("ctl:7070", &plain), "http://ctl:7070");
        assert_eq!(with_scheme(" ctl:7070", &tls), "https://ctl:7070");
        assert_eq!(with_scheme("https://ctl:7070", &plain), "https://ctl:7070");
        assert!(endpoint("ctl:7070", &plain).is_ok());
        let err = endpoint("ftp://ctl:7070", &plain).unwrap_err();
        assert!(err.contains("must be http:// or https://"), "{err}");
    }
}
