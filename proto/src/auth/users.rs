//! The credentials file (`--users`): one `NAME@DOMAIN SCRAM-SHA-256$...` line per user, in
//! PostgreSQL's verifier format, and how identities compare.

use std::collections::HashMap;

use super::scram::ScramVerifier;

/// The most PBKDF2 iterations a users-file verifier may ask for: PLAIN (RFC 4616) makes the
/// relay compute them for every attempt, on the shard's thread (about 40 ms at this count).
pub const MAX_ITERATIONS: u32 = 100_000;

/// The users who may authenticate, by canonical identity.
#[derive(Debug, Clone, Default)]
pub struct Users {
    verifiers: HashMap<String, (String, ScramVerifier)>,
}

/// A line of the file that is not a user, with the file and line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {reason}")]
pub struct UsersError {
    /// The file.
    pub origin: String,
    /// The line, from 1.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The form identities are compared in: the local part as written, the domain lower-cased
/// (RFC 3340 §2.2: domains compare case-insensitively).
fn canonical(identity: &str) -> Option<String> {
    let (local, domain) = identity.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || local.contains('@') {
        return None;
    }
    Some(format!("{local}@{}", domain.to_ascii_lowercase()))
}

/// Whether two identities are the same: the local part exactly, the domain case-insensitively.
pub fn same_identity(a: &str, b: &str) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

impl Users {
    /// Parses the file's `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Users, UsersError> {
        let mut verifiers = HashMap::new();
        let mut lines_of: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let error = |reason: String| UsersError {
                origin: origin.to_owned(),
                line,
                reason,
            };
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let mut fields = entry.split_whitespace();
            let (Some(name), Some(verifier), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(error(
                    "expected NAME@DOMAIN and a SCRAM-SHA-256 verifier".into(),
                ));
            };
            let key =
                canonical(name).ok_or_else(|| error(format!("'{name}' is not NAME@DOMAIN")))?;
            let verifier = ScramVerifier::parse(verifier).map_err(|e| error(e.to_string()))?;
            if verifier.iterations() > MAX_ITERATIONS {
                return Err(error(format!(
                    "{} iterations: at most {MAX_ITERATIONS} (checking a PLAIN password costs \
                     the relay that many, on a shard's thread)",
                    verifier.iterations()
                )));
            }
            if let Some(first) = lines_of.insert(key.clone(), line) {
                return Err(error(format!("{name} is already on line {first}")));
            }
            verifiers.insert(key, (name.to_owned(), verifier));
        }
        Ok(Users { verifiers })
    }

    /// The verifier of `identity`.
    pub fn verifier(&self, identity: &str) -> Option<&ScramVerifier> {
        self.verifiers.get(&canonical(identity)?).map(|(_, v)| v)
    }

    /// `identity` as the file spells it, when it is a user.
    pub fn spelled(&self, identity: &str) -> Option<&str> {
        self.verifiers
            .get(&canonical(identity)?)
            .map(|(name, _)| name.as_str())
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.verifiers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.verifiers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(name: &str) -> String {
        format!("{name} {}", ScramVerifier::from_password("pw", b"salt", 1))
    }

    #[test]
    fn a_file_parses_with_comments_and_blank_lines() {
        let text = format!(
            "# users\n\n  {}  \n{}\n",
            line("fred@Example.COM"),
            line("barney@example.com")
        );
        let users = Users::parse(&text, "users.txt").unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verifier("fred@example.com").is_some());
        assert_eq!(users.spelled("fred@EXAMPLE.com"), Some("fred@Example.COM"));
        assert!(
            users.verifier("Fred@example.com").is_none(),
            "local parts are exact"
        );
        assert!(users.verifier("wilma@example.com").is_none());
    }

    #[test]
    fn bad_lines_name_the_file_line_and_reason() {
        let cases = [
            (
                format!("\n{}\nfred", line("a@b")),
                "users.txt:3: expected NAME@DOMAIN",
            ),
            (
                "fred SCRAM-SHA-256$1:AA==$x:y".to_owned(),
                "users.txt:1: 'fred' is not NAME@DOMAIN",
            ),
            (
                "fred@x SCRAM-SHA-256$many:AA==$x:y".to_owned(),
                "users.txt:1: bad verifier: the iteration count is not a number",
            ),
            (
                format!("{}\n{}", line("a@b"), line("a@B")),
                "users.txt:2: a@B is already on line 1",
            ),
            (format!("{} extra", line("a@b")), "users.txt:1: expected"),
            (
                "@b SCRAM-SHA-256$1:AA==$x:y".to_owned(),
                "is not NAME@DOMAIN",
            ),
            (
                format!(
                    "a@b {}",
                    ScramVerifier::from_password("pw", b"salt", 100_001)
                ),
                "users.txt:1: 100001 iterations: at most 100000",
            ),
        ];
        for (text, expected) in cases {
            let error = Users::parse(&text, "users.txt").unwrap_err().to_string();
            assert!(error.contains(expected), "{error} / {expected}");
        }
    }

    #[test]
    fn identities_compare_local_exactly_and_domain_case_insensitively() {
        assert!(same_identity("fred@Example.com", "fred@example.COM"));
        assert!(!same_identity("Fred@example.com", "fred@example.com"));
        assert!(!same_identity("fred@example.com", "fred@example.org"));
    }
}
