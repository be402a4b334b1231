//! Reading a configuration tree key by key: typed values, `${VAR}` expansion, `EVENTBROKER_*`
//! overrides, and an error for every key nobody asked for.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use super::env::{self, Env};
use crate::error::ConfigError;
use crate::redact::redact;

/// A loaded configuration value: what the YAML loader produces, whatever the YAML crate. A
/// boolean or a number keeps its text as the document wrote it (`0x1F`, `True`): a key that
/// takes a string takes that text.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(not(feature = "yaml"), allow(dead_code, reason = "the YAML loader makes the rest"))]
pub(crate) enum Node {
    Null,
    Bool(bool, String),
    Int(i64, String),
    Float(f64, String),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order.
    Map(Vec<(String, Node)>),
}

impl fmt::Display for Node {
    /// How a value is quoted in an error: strings quoted, numbers as they are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("nothing"),
            Self::Bool(_, written) | Self::Int(_, written) | Self::Float(_, written) => f.write_str(written),
            // A URL given where a mapping or a number belongs is quoted with its credentials blanked.
            Self::Str(s) => write!(f, "{:?}", redact(s)),
            Self::Seq(_) => f.write_str("a list"),
            Self::Map(_) => f.write_str("a mapping"),
        }
    }
}

/// What sections share while one configuration is read: the environment, and the override
/// variables used so far (the rest are reported as unknown).
pub(crate) struct Reader<'e> {
    env: &'e Env,
    used: RefCell<BTreeSet<String>>,
    /// The override variable of every key the sections read, set or not: what an unknown one is
    /// told it could have been.
    offered: RefCell<BTreeSet<String>>,
    /// Override prefixes of the nested sections read (`EVENTBROKER_RETRY_POLICY_`, ...).
    sections: RefCell<Vec<String>>,
}

impl<'e> Reader<'e> {
    pub(crate) fn new(env: &'e Env) -> Self {
        Self {
            env,
            used: RefCell::new(BTreeSet::new()),
            offered: RefCell::new(BTreeSet::new()),
            sections: RefCell::new(Vec::new()),
        }
    }

    /// The root section, `event_broker`, over `node` (`Null` when the document has none).
    pub(crate) fn root(&self, node: Node) -> Result<Section<'_, 'e>, ConfigError> {
        Section::new(self, "event_broker".to_owned(), node)
    }

    /// Fails on an `EVENTBROKER_*` variable under a section's prefix that overrides no key
    /// (`EVENTBROKER_RETRY_POLICY_MAX_RETRY`); logs and ignores other unused ones
    /// (`EVENTBROKER_WORKERS`), since other tools, this crate's own tests among them, use the
    /// prefix for settings of their own.
    pub(crate) fn finish(&self) -> Result<(), ConfigError> {
        let used = self.used.borrow();
        let sections = self.sections.borrow();
        for name in self.env.override_names().into_iter().filter(|name| !used.contains(name)) {
            // The longest section prefix it falls under: the section it names a key of.
            if let Some(prefix) =
                sections.iter().filter(|prefix| name.starts_with(prefix.as_str())).max_by_key(|p| p.len())
            {
                let offered = self.offered.borrow();
                let valid: Vec<&str> =
                    offered.iter().filter(|v| v.starts_with(prefix.as_str())).map(String::as_str).collect();
                return Err(ConfigError::new(
                    name,
                    format!("no configuration key has this name; valid here: {}", valid.join(", ")),
                ));
            }
            tracing::warn!(variable = %name, "an EVENTBROKER_ variable names no configuration key; ignored");
        }
        Ok(())
    }
}

impl Reader<'_> {
    /// `error` with the override variable its key was read from, when it was and the error does
    /// not say so yet: a check made after reading (`worker_count` out of range) names the variable
    /// as a conversion error does, rather than send its reader to the file.
    pub(crate) fn with_source(&self, error: ConfigError) -> ConfigError {
        let var = env::override_name(error.key());
        let from = format!("(from {var})");
        if !self.used.borrow().contains(&var) || error.reason().ends_with(&from) {
            return error;
        }
        let reason = format!("{} {from}", error.reason());
        ConfigError::new(error.key(), reason)
    }
}

/// One value to convert: where it is, where it came from, and what it is.
struct Value {
    path: String,
    /// The override variable it came from, when it did.
    from: Option<String>,
    node: Node,
}

impl Value {
    fn error(&self, reason: impl fmt::Display) -> ConfigError {
        match &self.from {
            None => ConfigError::new(&self.path, reason.to_string()),
            Some(var) => ConfigError::new(&self.path, format!("{reason} (from {var})")),
        }
    }

    fn expected(&self, what: &str) -> ConfigError {
        self.error(format_args!("expected {what}, got {}", self.node))
    }

    /// The text of a scalar (numbers and booleans as written), or `None` for `Null`.
    fn text(&self) -> Result<Option<String>, ConfigError> {
        Ok(Some(match &self.node {
            Node::Null => return Ok(None),
            Node::Str(s) | Node::Bool(_, s) | Node::Int(_, s) | Node::Float(_, s) => s.clone(),
            Node::Seq(_) | Node::Map(_) => return Err(self.expected("a single value")),
        }))
    }
}

/// A mapping of the configuration, read key by key. Absent mappings read as empty, so every key
/// can still come from an override variable.
pub(crate) struct Section<'r, 'e> {
    reader: &'r Reader<'e>,
    path: String,
    entries: Vec<(String, Node)>,
    /// The keys asked for, for the unknown-key error.
    known: Vec<&'static str>,
}

impl<'r, 'e> Section<'r, 'e> {
    fn new(reader: &'r Reader<'e>, path: String, node: Node) -> Result<Self, ConfigError> {
        if path.contains('.') {
            reader.sections.borrow_mut().push(format!("{}_", env::override_name(&path)));
        }
        let entries = match node {
            Node::Null => Vec::new(),
            Node::Map(entries) => entries,
            other => return Err(ConfigError::new(path, format!("expected a mapping of keys, got {other}"))),
        };
        Ok(Self { reader, path, entries, known: Vec::new() })
    }

    fn path_of(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// The value of `key`: its override variable when set, else the document's, with `${VAR}`
    /// expanded; `None` when neither is there.
    fn value(&mut self, key: &'static str) -> Result<Option<Value>, ConfigError> {
        self.known.push(key);
        let path = self.path_of(key);
        let from_doc = self.entries.iter().position(|(k, _)| k == key).map(|i| self.entries.remove(i).1);
        let var = env::override_name(&path);
        self.reader.offered.borrow_mut().insert(var.clone());
        if let Some(text) = self.reader.env.get(&var) {
            self.reader.used.borrow_mut().insert(var.clone());
            return Ok(Some(Value { path, from: Some(var), node: Node::Str(text) }));
        }
        Ok(match from_doc {
            None => None,
            Some(Node::Str(text)) => {
                let expanded = env::expand(&path, &text, self.reader.env)?;
                Some(Value { path, from: None, node: Node::Str(expanded) })
            }
            Some(node) => Some(Value { path, from: None, node }),
        })
    }

    /// A nested mapping (empty when absent).
    pub(crate) fn section(&mut self, key: &'static str) -> Result<Section<'r, 'e>, ConfigError> {
        self.known.push(key);
        let path = self.path_of(key);
        let node =
            self.entries.iter().position(|(k, _)| k == key).map_or(Node::Null, |i| self.entries.remove(i).1);
        Section::new(self.reader, path, node)
    }

    /// A string; numbers and booleans are taken as written. Empty and `null` read as absent.
    pub(crate) fn string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        Ok(value.text()?.filter(|s| !s.is_empty()))
    }

    /// `true` or `false`.
    pub(crate) fn bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        match &value.node {
            Node::Bool(b, _) => Ok(Some(*b)),
            Node::Str(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Node::Str(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            _ => Err(value.expected("true or false")),
        }
    }

    /// A whole number that fits `T`.
    pub(crate) fn uint<T: TryFrom<u64>>(&mut self, key: &'static str) -> Result<Option<T>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        let parsed = match &value.node {
            Node::Int(i, _) => u64::try_from(*i).ok(),
            Node::Str(s) => s.trim().replace('_', "").parse::<u64>().ok(),
            _ => None,
        };
        let Some(n) = parsed else { return Err(value.expected("a whole number")) };
        T::try_from(n).map(Some).map_err(|_| value.error(format_args!("{n} is too large")))
    }

    /// A number.
    pub(crate) fn float(&mut self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        #[allow(clippy::cast_precision_loss, reason = "a configured number, exact below 2^53")]
        let parsed = match &value.node {
            Node::Int(i, _) => Some(*i as f64),
            Node::Float(x, _) => Some(*x),
            Node::Str(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        parsed.filter(|x| x.is_finite()).map(Some).ok_or_else(|| value.expected("a number"))
    }

    /// A duration like `250ms`, `1s`, `1m30s` or `1.5h` (units `ns`, `us`, `ms`, `s`, `m`, `h`).
    pub(crate) fn duration(&mut self, key: &'static str) -> Result<Option<Duration>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        let parsed = match &value.node {
            Node::Int(0, _) => Some(Duration::ZERO),
            Node::Str(s) => parse_duration(s),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| value.expected("a duration like 250ms, 1s or 1m30s"))
    }

    /// A duration, or `none` (also `off`, or `null`) for no limit: `Some(None)`.
    #[allow(clippy::option_option, reason = "absent, no limit, or a limit: the sections' fields")]
    pub(crate) fn duration_or_none(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Option<Duration>>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        let parsed = match &value.node {
            Node::Null => Some(None),
            Node::Str(s) if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("off") => Some(None),
            Node::Int(0, _) => Some(Some(Duration::ZERO)),
            Node::Str(s) => parse_duration(s).map(Some),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| value.expected("a duration like 250ms, 1s or 1m30s, or none"))
    }

    /// A mapping of names to values (`broker: orders`), in document order; written as one string
    /// (as an override variable is), `name=value` pairs separated by commas. Values are taken as
    /// strings, as [`Section::string`] takes them.
    pub(crate) fn string_map(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Vec<(String, String)>>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        let pairs = match &value.node {
            Node::Null => return Ok(None),
            Node::Map(entries) => {
                let mut pairs = Vec::with_capacity(entries.len());
                for (name, node) in entries {
                    let path = format!("{}.{name}", value.path);
                    let text = match node {
                        Node::Str(text) => env::expand(&path, text, self.reader.env)?,
                        Node::Bool(_, written) | Node::Int(_, written) | Node::Float(_, written) => {
                            written.clone()
                        }
                        other => {
                            return Err(ConfigError::new(
                                path,
                                format!("expected a single value, got {other}"),
                            ));
                        }
                    };
                    pairs.push((name.clone(), text));
                }
                pairs
            }
            Node::Str(text) => {
                let mut pairs = Vec::new();
                for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
                    let Some((name, text)) = item.split_once('=') else {
                        return Err(value.error(format_args!(
                            "expected name=value pairs separated by commas, got {item:?}"
                        )));
                    };
                    pairs.push((name.trim().to_owned(), text.trim().to_owned()));
                }
                pairs
            }
            _ => return Err(value.expected("a mapping of names to values")),
        };
        Ok(Some(pairs))
    }

    /// One of `choices`, as written.
    pub(crate) fn choice(
        &mut self,
        key: &'static str,
        choices: &[&'static str],
    ) -> Result<Option<&'static str>, ConfigError> {
        let Some(value) = self.value(key)? else { return Ok(None) };
        let text = value.text()?;
        match text.and_then(|t| choices.iter().find(|c| c.eq_ignore_ascii_case(t.trim())).copied()) {
            Some(choice) => Ok(Some(choice)),
            None => Err(value.expected(&one_of(choices))),
        }
    }

    /// An error about `key` of this section, for checks across keys.
    pub(crate) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path_of(key), reason)
    }

    /// Fails on a key of the document nobody asked for.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        match self.entries.first() {
            None => Ok(()),
            Some((key, _)) => Err(ConfigError::new(
                self.path_of(key),
                format!("unknown key; expected {}", one_of(&self.known)),
            )),
        }
    }
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(choices: &[&str]) -> String {
    match choices {
        [] => "no keys here".to_owned(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Parses a duration the way Go's `time.ParseDuration` does, without signs: a sequence of decimal
/// numbers, each with a unit (`ns`, `us` or `µs`, `ms`, `s`, `m`, `h`); `0` alone is zero.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
        ("d", 86_400_000_000_000),
    ];
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = UNITS.iter().find(|(name, _)| *name == unit)?.1;
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
        let mut part = whole.checked_mul(scale)?;
        let mut place = scale;
        for digit in fraction.chars() {
            place /= 10;
            part = part.checked_add(u128::from(digit.to_digit(10)?) * place)?;
        }
        nanos = nanos.checked_add(part)?;
        rest = next;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    // The remainder is below 10⁹, so it fits.
    let subsec = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_go_writes_them() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("250ms"), Some(ms(250)));
        assert_eq!(parse_duration("1s"), Some(ms(1000)));
        assert_eq!(parse_duration("1m30s"), Some(ms(90_000)));
        assert_eq!(parse_duration("1.5h"), Some(ms(5_400_000)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse_duration("10us"), Some(Duration::from_micros(10)));
        assert_eq!(parse_duration("10µs"), Some(Duration::from_micros(10)));
        assert_eq!(parse_duration(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_duration(".5s"), Some(ms(500)));
        for bad in ["", "5", "1x", "s", "1s5", "-1s", "1.2.3s", "99999999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lists_read_as_prose() {
        assert_eq!(one_of(&["sync", "async"]), "sync or async");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
    }
}
