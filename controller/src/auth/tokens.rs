//! Bearer tokens: `PREFIX_ID_SECRET`, where the prefix tells what the token is (an API
//! token, an agent's credential, a join token), the id finds its row, and only a
//! SHA-256 of the secret is stored.

use sha2::{Digest, Sha256};

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A user's API token, with a role.
    Api,
    /// An enrolled agent's own credential.
    Agent,
    /// A short-lived token an agent trades for its credential.
    Join,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Api => "btk",
            Kind::Agent => "bag",
            Kind::Join => "bjt",
        }
    }
}

/// A token as presented: its kind, id and secret part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub kind: Kind,
    pub id: &'a str,
    pub secret: &'a str,
}

/// A new token: the text handed out once, its id and the hash to store.
pub struct Minted {
    pub token: String,
    pub id: String,
    pub hash: String,
}

pub fn mint(kind: Kind) -> Minted {
    let id = hex(&rand::random::<[u8; 6]>());
    let secret = hex(&rand::random::<[u8; 20]>());
    Minted { token: format!("{}_{id}_{secret}", kind.prefix()), hash: hash(&secret), id }
}

/// Splits a presented token; `None` when it is not one of Baton's.
pub fn parse(token: &str) -> Option<Parsed<'_>> {
    let mut parts = token.splitn(3, '_');
    let kind = match parts.next()? {
        "btk" => Kind::Api,
        "bag" => Kind::Agent,
        "bjt" => Kind::Join,
        _ => return None,
    };
    let id = parts.next()?;
    let secret = parts.next()?;
    let hexy = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(id) && hexy(secret)).then_some(Parsed { kind, id, secret })
}

pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored`, in time that does not depend on where they
/// differ.
pub fn verify(stored: &str, secret: &str) -> bool {
    let got = hash(secret);
    got.len() == stored.len() && got.bytes().zip(stored.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_back_and_verify_only_against_their_hash() {
        let m = mint(Kind::Api);
        let p = parse(&m.token).unwrap();
        assert_eq!((p.kind, p.id), (Kind::Api, m.id.as_str()));
        assert!(verify(&m.hash, p.secret));
        assert!(!verify(&m.hash, "00"));
        assert!(!m.hash.contains(p.secret), "only the hash is kept");
        assert_eq!(parse(&mint(Kind::Join).token).unwrap().kind, Kind::Join);
        assert_eq!(parse(&mint(Kind::Agent).token).unwrap().kind, Kind::Agent);
        assert_ne!(mint(Kind::Api).token, mint(Kind::Api).token);
        for bad in ["", "btk", "btk_ab", "xyz_ab_cd", "btk_zz_cd", "btk__cd"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
