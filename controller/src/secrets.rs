//! Secrets at rest: sealed with XChaCha20-Poly1305 under a 256-bit key kept in a file
//! of the controller's (`--secrets-key`), each bound to what it is (a secret's name, a
//! run's parameter) so that a sealed value cannot be moved to another row.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// How sealed values start (and how a sealed run parameter is told from a plain one).
pub const SEALED: &str = "baton-sealed:v1:";

/// What a secret is sealed for: its name.
pub fn secret_aad(name: &str) -> String {
    format!("secret:{name}")
}

/// What a secret run parameter is sealed for: its run and name.
pub fn param_aad(run_id: &str, name: &str) -> String {
    format!("param:{run_id}:{name}")
}

/// A run parameter as shown: sealed ones masked.
pub fn shown(value: &str) -> String {
    if value.starts_with(SEALED) { baton_common::redact::MASK.to_string() } else { value.to_string() }
}

/// The key and the cipher made from it.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    pub path: PathBuf,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SecretBox {
    /// Reads the key file, or creates it (0600, 32 random bytes in base64) when it does
    /// not exist. Returns whether it was created.
    pub fn open_or_create(path: &Path) -> Result<(SecretBox, bool), String> {
        let created = match std::fs::read_to_string(path) {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let key: [u8; 32] = rand::random();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("cannot create the secrets key {}: {e}", path.display()))?;
                f.write_all(format!("{}\n", B64.encode(key)).as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| format!("cannot write the secrets key {}: {e}", path.display()))?;
                true
            }
            Err(e) => return Err(format!("cannot read the secrets key {}: {e}", path.display())),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the secrets key {}: {e}", path.display()))?;
        let key = B64
            .decode(text.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| format!("the secrets key {} must hold 32 bytes in base64", path.display()))?;
        let cipher = XChaCha20Poly1305::new_from_slice(&key).map_err(|e| format!("secrets key: {e}"))?;
        Ok((SecretBox { cipher, path: path.to_path_buf() }, created))
    }

    /// `plain` sealed for `what` (e.g. `secret:NAME`).
    pub fn seal(&self, what: &str, plain: &str) -> String {
        let nonce: [u8; 24] = rand::random();
        let sealed = self
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plain.as_bytes(), aad: what.as_bytes() })
            .unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        format!("{SEALED}{}", B64.encode(bytes))
    }

    /// The plain value of something sealed for `what`; an error when it was sealed with
    /// another key, for something else, or was changed.
    pub fn open(&self, what: &str, sealed: &str) -> Result<String, String> {
        let bad = || {
            format!("{what}: cannot be opened with the secrets key {} (another key?)", self.path.display())
        };
        let bytes = sealed.strip_prefix(SEALED).and_then(|b| B64.decode(b).ok()).ok_or_else(bad)?;
        if bytes.len() < 24 {
            return Err(bad());
        }
        let (nonce, ct) = bytes.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().map_err(|_| bad())?;
        let plain = self
            .cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad: what.as_bytes() })
            .map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_for_what_they_were_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let (b, created) = SecretBox::open_or_create(&path).unwrap();
        assert!(created);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let sealed = b.seal("secret:db", "hunter2");
        assert!(sealed.starts_with(SEALED) && !sealed.contains("hunter2"));
        assert_ne!(sealed, b.seal("secret:db", "hunter2"), "a fresh nonce each time");
        assert_eq!(b.open("secret:db", &sealed).unwrap(), "hunter2");
        assert!(b.open("secret:other", &sealed).unwrap_err().contains("cannot be opened"));
        let (again, created) = SecretBox::open_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.open("secret:db", &sealed).unwrap(), "hunter2");
        let (other, _) = SecretBox::open_or_create(&dir.path().join("k2")).unwrap();
        assert!(other.open("secret:db", &sealed).is_err());
        std::fs::write(dir.path().join("bad"), "short").unwrap();
        assert!(SecretBox::open_or_create(&dir.path().join("bad")).unwrap_err().contains("32 bytes"));
    }
}
