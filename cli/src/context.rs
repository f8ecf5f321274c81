//! Named controllers, like kubeconfig's contexts: `~/.config/baton/config.toml` holds
//! each one's URL, CA, client certificate and token file, and which is in use. Flags and
//! environment variables override what the context says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};

/// The config file.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The context commands use when none is named.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current: String,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One controller (or a comma-separated list of them) and how to reach it.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub controller: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// A file that holds the token; the token itself is not kept in the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Where the config lives: `$BATON_CONFIG`, else `$XDG_CONFIG_HOME/baton/config.toml`,
/// else `~/.config/baton/config.toml`.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BATON_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base =
        std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("baton/config.toml"))
}

impl Config {
    /// The config at `path`; an empty one when the file does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        let config: Config =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))?;
        if !config.current.is_empty() && !config.contexts.contains_key(&config.current) {
            return Err(anyhow!(
                "{}: the current context {:?} is not among the contexts",
                path.display(),
                config.current
            ));
        }
        Ok(config)
    }

    /// Writes the config (made readable by its owner only: it names credentials).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("cannot encode the config")?;
        let tmp = path.with_extension("toml.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The context named `name`, or the current one when `name` is empty; `None` when
    /// there is no current context.
    pub fn pick(&self, name: &str) -> Result<Option<(&str, &Context)>, String> {
        let name = if name.is_empty() { self.current.as_str() } else { name };
        if name.is_empty() {
            return Ok(None);
        }
        match self.contexts.get_key_value(name) {
            Some((k, c)) => Ok(Some((k.as_str(), c))),
            None => {
                let names: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
                Err(format!(
                    "no context named {name:?} (contexts: {})",
                    if names.is_empty() {
                        "none; see baton context add".to_string()
                    } else {
                        names.join(", ")
                    }
                ))
            }
        }
    }
}

/// Paths in a context are kept absolute, so the config means the same from any directory.
pub fn absolute(p: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    p.map(|p| std::path::absolute(&p).with_context(|| format!("bad path {}", p.display()))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton/config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let mut c = Config::default();
        c.contexts.insert(
            "prod".into(),
            Context {
                controller: "https://ctl:7070".into(),
                tls_ca: Some("/etc/baton/ca.pem".into()),
                ..Default::default()
            },
        );
        c.current = "prod".into();
        c.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = Config::load(&path).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.pick("").unwrap().unwrap().0, "prod");
        assert!(back.pick("dev").unwrap_err().contains("no context named \"dev\" (contexts: prod)"));

        std::fs::write(&path, "current = \"x\"\n[contexts.prod]\ncontroler = \"a\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `controler`"), "{err}");
    }
}
