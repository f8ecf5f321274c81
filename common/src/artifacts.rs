//! Artifacts: files a step leaves (`artifacts: [GLOB]`) for later steps (`inputs:`)
//! and for users (`baton runs artifacts`). Paths are relative to the attempt's working
//! directory, `/`-separated; globs match them with `*` inside one component and `**`
//! across components.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::Digest;

/// Most globs one step may list.
pub const MAX_PATTERNS: usize = 64;
/// Most files one attempt may leave.
pub const MAX_FILES: usize = 1000;
/// Longest artifact path, in bytes.
pub const MAX_PATH: usize = 1024;
/// Bytes per message when artifacts are streamed.
pub const CHUNK: usize = 256 * 1024;

/// Checks a path an artifact is stored under: relative, normalized (no `.`, `..` or
/// empty components), at most [`MAX_PATH`] bytes, no NUL or backslash.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_PATH {
        return Err(format!("artifact path {path:?} must be 1 to {MAX_PATH} bytes"));
    }
    if path.contains(['\0', '\\']) {
        return Err(format!("artifact path {path:?} holds a NUL byte or a backslash"));
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("artifact path {path:?} must be relative, without '.', '..' or empty parts"));
    }
    Ok(())
}

/// Checks a glob as a spec writes it: relative to the working directory, never above it.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.starts_with('/') || pattern.contains('\\') {
        return Err(format!("{pattern:?} must be a relative path or glob (with '/')"));
    }
    if pattern.split('/').any(|c| c == "..") {
        return Err(format!("{pattern:?} must not reach outside the working directory ('..')"));
    }
    glob(pattern).map(|_| ())
}

fn glob(pattern: &str) -> Result<Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid glob: {}", e.kind()))
}

/// Globs to match artifact paths with.
#[derive(Debug, Clone)]
pub struct Patterns {
    set: GlobSet,
    texts: Vec<String>,
}

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Patterns, String> {
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            check_pattern(p)?;
            b.add(glob(p)?);
        }
        let set = b.build().map_err(|e| e.to_string())?;
        Ok(Patterns { set, texts: patterns.to_vec() })
    }

    /// Whether any glob matches `path`; `hit` counts which did.
    pub fn matches(&self, path: &str, hit: &mut [bool]) -> bool {
        let which = self.set.matches(path);
        for &i in &which {
            if let Some(h) = hit.get_mut(i) {
                *h = true;
            }
        }
        !which.is_empty()
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The first glob `hit` says matched nothing.
    pub fn unmatched<'a>(&'a self, hit: &[bool]) -> Option<&'a str> {
        self.texts.iter().zip(hit).find(|(_, h)| !**h).map(|(t, _)| t.as_str())
    }
}

/// A SHA-256 computed as bytes stream by.
#[derive(Default)]
pub struct Checksum(sha2::Sha256);

impl Checksum {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest, in lowercase hex.
    pub fn finish(self) -> String {
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_working_directory() {
        assert!(check_path("dist/app.tar.gz").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "a\0b"] {
            assert!(check_path(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(check_pattern("dist/*.tar.gz").is_ok());
        assert!(check_pattern("../*").unwrap_err().contains("outside"));
        assert!(check_pattern("/tmp/*").is_err());
        assert!(check_pattern("a[").unwrap_err().contains("not a valid glob"));
    }

    #[test]
    fn star_stays_in_one_component_and_double_star_crosses() {
        let p = Patterns::new(&["dist/*.whl".into(), "**/*.log".into()]).unwrap();
        let mut hit = vec![false; 2];
        assert!(p.matches("dist/a.whl", &mut hit));
        assert!(!p.matches("dist/sub/a.whl", &mut hit));
        assert_eq!(p.unmatched(&hit), Some("**/*.log"));
        assert!(p.matches("x/y/z.log", &mut hit));
        assert_eq!(p.unmatched(&hit), None);
    }

    #[test]
    fn checksums_are_hex_sha256() {
        let mut c = Checksum::default();
        c.update(b"ab");
        c.update(b"c");
        assert_eq!(c.finish(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
