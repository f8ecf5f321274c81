//! Masking secret values in what is kept and shown: output, results, errors, events.
//!
//! A [`Redactor`] knows the values to mask; a [`Stream`] masks output that arrives in
//! chunks, holding back the end of a chunk while it could be the start of a secret,
//! so a secret split across two chunks is still caught (as buildkite/agent's replacer
//! does). Values shorter than [`MIN_LEN`] are not masked: masking every "1" would
//! destroy the output and protect nothing.

use aho_corasick::{AhoCorasick, MatchKind};

/// What a masked value is replaced by.
pub const MASK: &str = "***";

/// Shortest value that is masked.
pub const MIN_LEN: usize = 4;

/// Env names whose values are masked unless the controller is told otherwise.
pub const DEFAULT_ENV_PATTERNS: [&str; 4] = ["*_TOKEN", "*_SECRET", "*_PASSWORD", "*_KEY"];

/// Whether an env variable's name matches a pattern (`*` matches any run of
/// characters; letters match either case).
pub fn env_matches(name: &str, pattern: &str) -> bool {
    fn go(n: &[u8], p: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(&n[i..], rest)),
            Some((c, rest)) => n.first().is_some_and(|x| x.eq_ignore_ascii_case(c)) && go(&n[1..], rest),
        }
    }
    go(name.as_bytes(), pattern.as_bytes())
}

/// The values to mask, ready to search for.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Every form of every value, sorted (to tell whether a text is the start of one).
    patterns: Vec<Vec<u8>>,
    longest: usize,
    matcher: Option<AhoCorasick>,
}

impl Redactor {
    /// A redactor for `values`: each as it is, as it appears inside a JSON string, and
    /// (for a value of several lines) each of its lines.
    pub fn new<I, S>(values: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for v in values {
            let v = v.as_ref();
            let mut forms = vec![v.to_string()];
            if let Ok(json) = serde_json::to_string(v) {
                forms.push(json[1..json.len() - 1].to_string());
            }
            if v.contains('\n') {
                forms.extend(v.lines().map(|l| l.trim_end_matches('\r').to_string()));
            }
            patterns.extend(forms.into_iter().filter(|f| f.len() >= MIN_LEN).map(String::into_bytes));
        }
        patterns.sort();
        patterns.dedup();
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&patterns).ok()
        };
        Redactor { patterns, longest, matcher }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// `bytes` with every value masked.
    pub fn bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.matcher {
            None => bytes.to_vec(),
            Some(m) => m.replace_all_bytes(bytes, &vec![MASK.as_bytes(); self.patterns.len()]),
        }
    }

    /// `text` with every value masked.
    pub fn text(&self, text: &str) -> String {
        match &self.matcher {
            None => text.to_string(),
            Some(m) => m.replace_all(text, &vec![MASK; self.patterns.len()]),
        }
    }

    /// A JSON document with every value masked in its strings (keys included) and a
    /// number that holds one replaced by the string `"***"`, so that it stays JSON;
    /// text that is not JSON is masked as text.
    pub fn json(&self, json: &str) -> String {
        if self.is_empty() {
            return json.to_string();
        }
        fn walk(r: &Redactor, v: serde_json::Value) -> serde_json::Value {
            use serde_json::Value;
            match v {
                Value::String(s) => Value::String(r.text(&s)),
                Value::Number(n) if r.text(&n.to_string()) != n.to_string() => Value::String(MASK.into()),
                Value::Array(a) => Value::Array(a.into_iter().map(|x| walk(r, x)).collect()),
                Value::Object(m) => {
                    Value::Object(m.into_iter().map(|(k, x)| (r.text(&k), walk(r, x))).collect())
                }
                other => other,
            }
        }
        match serde_json::from_str::<serde_json::Value>(json) {
            Ok(v) => walk(self, v).to_string(),
            Err(_) => self.text(json),
        }
    }

    /// Whether `tail` is the start (not the whole) of some value: the values that
    /// extend it sort right after it.
    fn starts_a_value(&self, tail: &[u8]) -> bool {
        let i = self.patterns.partition_point(|p| p.as_slice() <= tail);
        self.patterns.get(i).is_some_and(|p| p.starts_with(tail))
    }

    /// Where, at or after `from`, the end of `buf` could be the start of a value that
    /// more data would complete; `buf.len()` when nowhere.
    fn hold_point(&self, buf: &[u8], from: usize) -> usize {
        let start = from.max(buf.len().saturating_sub(self.longest.saturating_sub(1)));
        (start..buf.len()).find(|&j| self.starts_a_value(&buf[j..])).unwrap_or(buf.len())
    }
}

/// Masks output that arrives in chunks.
#[derive(Debug)]
pub struct Stream {
    redactor: std::sync::Arc<Redactor>,
    held: Vec<u8>,
}

impl Stream {
    pub fn new(redactor: std::sync::Arc<Redactor>) -> Stream {
        Stream { redactor, held: Vec::new() }
    }

    /// The masked output that `chunk` makes final; the end that could still be the
    /// start of a value is held back for the next chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let r = &self.redactor;
        let Some(matcher) = &r.matcher else {
            return chunk.to_vec();
        };
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        let mut hold = r.hold_point(&buf, 0);
        for m in matcher.find_iter(&buf) {
            // A match that starts where more data could make a longer one is not final.
            if m.start() >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(MASK.as_bytes());
            pos = m.end();
            if pos > hold {
                hold = r.hold_point(&buf, pos);
            }
        }
        if pos < hold {
            out.extend_from_slice(&buf[pos..hold]);
            pos = hold;
        }
        self.held = buf.split_off(pos);
        out
    }

    /// What is held back, masked: the output has ended.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.redactor.bytes(&held)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_are_masked_in_text_json_and_lines() {
        let r = Redactor::new([
            "hunter22",
            "pa\"ss",
            "-----BEGIN KEY-----\nMIIEsecretline\n-----END KEY-----",
            "ab",
        ]);
        assert_eq!(r.text("user hunter22 logged in"), "user *** logged in");
        assert_eq!(r.text("ab is too short to mask"), "ab is too short to mask");
        assert_eq!(
            r.json(r#"{"p": "x pa\"ss y", "hunter22": [1, "hunter22"]}"#),
            r#"{"***":[1,"***"],"p":"x *** y"}"#
        );
        assert_eq!(r.text("line: MIIEsecretline"), "line: ***");
        assert_eq!(r.json("not json hunter22"), "not json ***");
        let digits = Redactor::new(["12345678"]);
        assert_eq!(
            digits.json(r#"{"n": 12345678, "m": 1}"#),
            r#"{"m":1,"n":"***"}"#,
            "a number that is a value"
        );
        assert!(Redactor::new(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let r = Arc::new(Redactor::new(["secret-value"]));
        let mut s = Stream::new(r);
        let mut out = s.push(b"start secr");
        assert_eq!(out, b"start ", "the possible start of a value is held back");
        out.extend(s.push(b"et-val"));
        out.extend(s.push(b"ue end se"));
        out.extend(s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "start *** end se");
    }

    #[test]
    fn env_patterns_match_names() {
        assert!(env_matches("API_TOKEN", "*_TOKEN"));
        assert!(env_matches("aws_secret_access_key", "*_KEY"));
        assert!(!env_matches("TOKENS", "*_TOKEN"));
        assert!(env_matches("DB_PASSWORD_FILE", "*_PASSWORD*"));
        assert!(!env_matches("PATH", "*_KEY"));
    }

    /// Random secrets (from a small alphabet, so that they overlap and repeat), text
    /// full of them, split into random chunks: the stream masks exactly what masking
    /// the whole text does, and no secret is left.
    fn case() -> impl Strategy<Value = (Vec<String>, Vec<u8>, Vec<usize>)> {
        let secret =
            proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), Just(b'-')], 4..12)
                .prop_map(|v| String::from_utf8(v).unwrap());
        (proptest::collection::vec(secret, 1..4)).prop_flat_map(|secrets| {
            let n = secrets.len();
            let piece = prop_oneof![(0..n).prop_map(Some), Just(None),];
            let filler =
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'x'), Just(b'\n')], 0..6);
            (
                Just(secrets),
                proptest::collection::vec((piece, filler), 0..12),
                proptest::collection::vec(1usize..9, 0..12),
            )
                .prop_map(|(secrets, parts, cuts)| {
                    let mut text = Vec::new();
                    for (p, fill) in parts {
                        if let Some(i) = p {
                            text.extend_from_slice(secrets[i].as_bytes());
                        }
                        text.extend(fill);
                    }
                    (secrets, text, cuts)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn streaming_masks_what_whole_text_masking_does((secrets, text, cuts) in case()) {
            let r = Arc::new(Redactor::new(&secrets));
            let whole = r.bytes(&text);
            let mut s = Stream::new(r.clone());
            let mut out = Vec::new();
            let mut rest = text.as_slice();
            for c in cuts {
                let (chunk, tail) = rest.split_at(c.min(rest.len()));
                out.extend(s.push(chunk));
                rest = tail;
            }
            out.extend(s.push(rest));
            out.extend(s.finish());
            prop_assert_eq!(&out, &whole);
            for secret in &secrets {
                prop_assert!(!out.windows(secret.len()).any(|w| w == secret.as_bytes()), "{} left in {:?}", secret, String::from_utf8_lossy(&out));
            }
        }
    }
}
