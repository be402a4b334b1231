//! SQL identifiers the provider splices into statements: schema, table, channel and the names of
//! captured tables. Values are always bound as parameters; identifiers cannot be, so they are
//! validated here and then always written quoted.

use std::fmt;

use crate::error::{ProviderError, ProviderErrorKind};

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); longer ones are silently truncated by
/// the server, so they are refused here instead.
pub(super) const MAX_IDENT_LEN: usize = 63;

/// A validated identifier: an ASCII letter or `_`, then letters, digits or `_`, at most
/// [`MAX_IDENT_LEN`] bytes. Case is kept: it is always written quoted, so `Events` and `events`
/// are two names, as in PostgreSQL's quoted form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Ident(String);

impl Ident {
    /// Validates `name`, the value of `what` (`"schema"`, `"table"`, ...), leaving `reserve`
    /// bytes free for suffixes the provider appends (`_dead_letters`).
    pub(super) fn parse(what: &str, name: &str, reserve: usize) -> Result<Self, IdentError> {
        let max = MAX_IDENT_LEN - reserve;
        let reason = if name.is_empty() {
            Some("it is empty".to_owned())
        } else if name.len() > max {
            Some(format!("it is {} bytes long; the limit is {max}", name.len()))
        } else if let Some((at, ch)) = name.char_indices().find(|&(at, ch)| !is_ident_char(at, ch)) {
            Some(format!(
                "character {ch:?} at byte {at} is not allowed; use ASCII letters, digits and '_', \
                 not starting with a digit"
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => Err(IdentError { what: what.to_owned(), name: name.to_owned(), reason }),
            None => Ok(Self(name.to_owned())),
        }
    }

    /// The name as given.
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }

    /// This name followed by `suffix` (which must itself be identifier characters, and fit in the
    /// `reserve` given to [`Ident::parse`]).
    pub(super) fn with_suffix(&self, suffix: &str) -> Self {
        debug_assert!(self.0.len() + suffix.len() <= MAX_IDENT_LEN, "suffix {suffix} overflows {}", self.0);
        debug_assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        Self(format!("{}{suffix}", self.0))
    }
}

/// Written quoted, ready to splice into SQL. Validation already excludes `"`, so no escaping is
/// needed.
impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

fn is_ident_char(at: usize, ch: char) -> bool {
    ch.is_ascii_alphabetic() || ch == '_' || (at > 0 && ch.is_ascii_digit())
}

/// An identifier that was refused, with what it was for and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IdentError {
    what: String,
    name: String,
    reason: String,
}

impl IdentError {
    pub(super) fn into_provider_error(self, operation: &'static str) -> ProviderError {
        ProviderError::new(super::NAME, operation, ProviderErrorKind::InvalidInput(self.to_string()))
    }
}

impl fmt::Display for IdentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} name {:?}: {}", self.what, self.name, self.reason)
    }
}

/// A table named `table` or `schema.table`, each part an [`Ident`]; `public` when no schema is
/// given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QualifiedTable {
    pub(super) schema: Ident,
    pub(super) table: Ident,
}

impl QualifiedTable {
    pub(super) fn parse(name: &str) -> Result<Self, IdentError> {
        match name.split_once('.') {
            Some((schema, table)) => Ok(Self {
                schema: Ident::parse("schema", schema, 0)?,
                table: Ident::parse("table", table, 0)?,
            }),
            None => Ok(Self {
                schema: Ident::parse("schema", "public", 0)?,
                table: Ident::parse("table", name, 0)?,
            }),
        }
    }
}

impl fmt::Display for QualifiedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_quotes_them() {
        let ident = Ident::parse("table", "Events_2", 0).expect("valid");
        assert_eq!(ident.to_string(), "\"Events_2\"");
        assert_eq!(ident.with_suffix("_claims").as_str(), "Events_2_claims");
    }

    #[test]
    fn refuses_injection_and_odd_names_with_the_reason() {
        let err = Ident::parse("table", "events; drop table x", 0).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "invalid table name \"events; drop table x\": character ';' at byte 6 is not allowed; \
             use ASCII letters, digits and '_', not starting with a digit"
        );
        for bad in ["", "1events", "ev\"ents", "évents", "a b", "a.b"] {
            assert!(Ident::parse("schema", bad, 0).is_err(), "{bad:?}");
        }
        let long = "a".repeat(64);
        assert!(Ident::parse("schema", &long, 0).expect_err("too long").to_string().contains("limit is 63"));
        assert!(Ident::parse("table", &"a".repeat(60), 13).is_err(), "room kept for suffixes");
    }

    #[test]
    fn qualified_tables_default_to_public() {
        let t = QualifiedTable::parse("users").expect("valid");
        assert_eq!(t.to_string(), "\"public\".\"users\"");
        let t = QualifiedTable::parse("app.Users").expect("valid");
        assert_eq!(t.to_string(), "\"app\".\"Users\"");
        assert!(QualifiedTable::parse("app.users; drop table x").is_err());
        assert!(QualifiedTable::parse("a.b.c").is_err());
    }
}
