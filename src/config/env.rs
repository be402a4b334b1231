//! Environment variables: where `${VAR}` expansion and `EVENTBROKER_*` overrides read them from,
//! and the expansion itself.

use std::collections::HashMap;

use super::sections::SECRET_KEYS;
use crate::error::ConfigError;
use crate::redact::redact;

/// The prefix of the variables that override configuration keys.
pub(crate) const OVERRIDE_PREFIX: &str = "EVENTBROKER_";

/// Where configuration reads environment variables: the process's, or a map given by the caller
/// (tests, or a service that loads its environment from elsewhere).
///
/// ```
/// use eventbroker::config::{Config, Env};
///
/// let env = Env::from_vars([("EVENTBROKER_WORKER_COUNT", "3")]);
/// let config = Config::from_env_with(&env)?;
/// assert_eq!(config.worker_count, 3);
/// # Ok::<(), eventbroker::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `None`: the process's environment, read when asked.
    vars: Option<HashMap<String, String>>,
}

impl Env {
    /// The process's environment, read at each lookup.
    pub fn process() -> Self {
        Self { vars: None }
    }

    /// No variables at all: every override and `${VAR}` is unset.
    pub fn empty() -> Self {
        Self { vars: Some(HashMap::new()) }
    }

    /// Exactly these variables, and no others.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Self { vars: Some(vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect()) }
    }

    /// The value of `name`, when set; a process variable that is not valid UTF-8 counts as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        match &self.vars {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// Names of the set variables that start with `EVENTBROKER_`, sorted.
    pub(crate) fn override_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.vars {
            Some(vars) => vars.keys().filter(|k| k.starts_with(OVERRIDE_PREFIX)).cloned().collect(),
            None => std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| k.starts_with(OVERRIDE_PREFIX))
                .collect(),
        };
        names.sort_unstable();
        names
    }
}

/// The variable that overrides the key at `path` (`event_broker.retry_policy.max_retries` →
/// `EVENTBROKER_RETRY_POLICY_MAX_RETRIES`).
pub(crate) fn override_name(path: &str) -> String {
    let key = path.strip_prefix("event_broker.").unwrap_or(path);
    let mut name = String::with_capacity(OVERRIDE_PREFIX.len() + key.len());
    name.push_str(OVERRIDE_PREFIX);
    name.extend(key.chars().map(|c| if c == '.' { '_' } else { c.to_ascii_uppercase() }));
    name
}

/// Expands `${VAR}` (empty when unset, as a shell does), `${VAR:-default}` (the default when unset
/// or empty, itself expanded) and `$$` (a literal `$`) in the value of the key at `path`. Any other
/// `$` is kept.
pub(crate) fn expand(path: &str, text: &str, env: &Env) -> Result<String, ConfigError> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = closing_brace(body) else {
                return Err(ConfigError::new(path, format!("unterminated ${{ in {}", quoted(path, text))));
            };
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            if !is_variable_name(name) {
                let reason = "is not a variable name (letters, digits and _, not first a digit)";
                // The name is part of the value, and so as secret as the rest of it.
                let reason = if is_secret(path) {
                    format!("a ${{…}} {reason} in {}", quoted(path, text))
                } else {
                    format!("{name:?} {reason} in {}", quoted(path, text))
                };
                return Err(ConfigError::new(path, reason));
            }
            match (env.get(name).filter(|v| default.is_none() || !v.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                // Expanded only when used, as a shell does: `${A:-${B}}` is B's value.
                (None, Some(default)) => out.push_str(&expand(path, default, env)?),
                (None, None) => {}
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `text`, the value of the key at `path`, as an error quotes it: with any URL credentials
/// blanked, or not at all when the key holds a secret.
fn quoted(path: &str, text: &str) -> String {
    if is_secret(path) { "the value (a secret, not shown)".to_owned() } else { format!("{:?}", redact(text)) }
}

/// Whether the key at `path` holds a secret.
fn is_secret(path: &str) -> bool {
    path.rsplit('.').next().is_some_and(|key| SECRET_KEYS.contains(&key))
}

/// Where the `}` that closes a `${` is in `body` (the text after the `${`): past any `${…}` in
/// its default, and past `$$`.
fn closing_brace(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut depth = 0_usize;
    let mut at = 0;
    while at < bytes.len() {
        match (bytes[at], bytes.get(at + 1)) {
            (b'$', Some(b'$')) => at += 1,
            (b'$', Some(b'{')) => {
                depth += 1;
                at += 1;
            }
            (b'}', _) if depth == 0 => return Some(at),
            (b'}', _) => depth -= 1,
            _ => {}
        }
        at += 1;
    }
    None
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::assert_hidden;

    fn env() -> Env {
        Env::from_vars([("HOST", "db1"), ("EMPTY", ""), ("PORT", "5432")])
    }

    fn ok(text: &str) -> String {
        expand("k", text, &env()).unwrap()
    }

    #[test]
    fn expands_variables_and_defaults_as_a_shell_does() {
        assert_eq!(ok("${HOST}:${PORT}"), "db1:5432");
        assert_eq!(ok("${MISSING}"), "");
        assert_eq!(ok("${MISSING:-local}"), "local");
        assert_eq!(ok("${EMPTY:-fallback}"), "fallback");
        assert_eq!(ok("${EMPTY}"), "");
        assert_eq!(ok("${HOST:-x}"), "db1");
        assert_eq!(ok("${MISSING:-}"), "");
        assert_eq!(ok("cost: $$5 and $x"), "cost: $5 and $x");
        assert_eq!(ok("no variables"), "no variables");
    }

    #[test]
    fn a_default_may_hold_variables_of_its_own() {
        assert_eq!(ok("${MISSING:-${HOST}}"), "db1");
        assert_eq!(ok("${MISSING:-${EMPTY:-${PORT}}}:x"), "5432:x");
        assert_eq!(ok("${HOST:-${MISSING}}"), "db1");
        assert_eq!(ok("${MISSING:-$${HOST}}"), "${HOST}");
        assert_eq!(ok("${MISSING:-a}}"), "a}");
        let err = expand("k", "${MISSING:-${HOST}", &env()).unwrap_err();
        assert!(err.reason().contains("unterminated"), "{err}");
    }

    #[test]
    fn bad_references_name_the_key() {
        let err = expand("event_broker.instance_id", "${HOST", &env()).unwrap_err();
        assert_eq!(err.key(), "event_broker.instance_id");
        assert!(err.reason().contains("unterminated"), "{err}");
        let err = expand("k", "${1X}", &env()).unwrap_err();
        assert!(err.reason().contains("\"1X\" is not a variable name"), "{err}");
    }

    /// A password's value is not quoted in an error at all; a URL's is, its credentials blanked.
    #[test]
    fn bad_references_keep_secrets_out() {
        for text in ["hunter2${oops", "hunter2${no-name}"] {
            for path in ["event_broker.redis.password", "event_broker.nats.token", "event_broker.nats.nkey"] {
                let err = expand(path, text, &env()).unwrap_err();
                assert_hidden(&err, "hunter2");
                assert_hidden(&err, "no-name");
            }
        }
        let err = expand("event_broker.redis.url", "redis://app:hunter2@h/${DB", &env()).unwrap_err();
        assert!(err.reason().contains("\"redis://app:***@h/${DB\""), "{err}");
        assert_hidden(&err, "hunter2");
    }

    #[test]
    fn override_names_follow_the_key_path() {
        assert_eq!(override_name("event_broker.worker_count"), "EVENTBROKER_WORKER_COUNT");
        assert_eq!(
            override_name("event_broker.retry_policy.max_retries"),
            "EVENTBROKER_RETRY_POLICY_MAX_RETRIES"
        );
    }
}
