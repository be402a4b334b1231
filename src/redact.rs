//! Credentials kept out of what the crate prints: `Debug` output, error messages and logs.
//!
//! Connection settings carry secrets in three shapes, each blanked to [`MASK`]:
//! - a URL's userinfo: `redis://app:s3cret@host` → `redis://app:***@host` (the user name kept), a
//!   token or password with no user `nats://s3cret@host` → `nats://***@host`; every URL of a text
//!   (a NATS server list, an error quoting two);
//! - libpq's `password=…`, in a key-value string (`host=db password='s3 cret'` →
//!   `host=db password=***`) or a URL's query (`?password=s3cret&sslmode=disable` →
//!   `?password=***&sslmode=disable`);
//! - a setting that is a secret as a whole (a password, a token, an `NKey` seed): `Debug` shows
//!   [`mask`] of it.
//!
//! Where a URL ends is a guess in free text, so the guess errs towards blanking too much: the
//! userinfo runs to the last `@` before whitespace or the next `://`, so a password holding `/`,
//! `#` or `,` unencoded is blanked whole (with the host, when a path or query holds an `@`).

/// What a secret is shown as.
pub(crate) const MASK: &str = "***";

/// A secret setting as `Debug` shows it: `Some("***")` when set, `None` when not.
pub(crate) fn mask<T: ?Sized>(secret: Option<&T>) -> Option<&'static str> {
    secret.map(|_| MASK)
}

/// `text` with the userinfo of every `scheme://…@` and the value of every `password=` blanked.
pub(crate) fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        rest = blank_userinfo(&mut out, tail);
    }
    out.push_str(rest);
    blank_passwords(&out)
}

/// One connection setting, blanked as [`redact`] does; one with no scheme (`app:s3cret@host`, which
/// NATS reads as `nats://app:s3cret@host`) has its userinfo blanked too.
pub(crate) fn redact_url(url: &str) -> String {
    if url.contains("://") {
        return redact(url);
    }
    let url_start = url.trim_start();
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..url.len() - url_start.len()]);
    let rest = blank_userinfo(&mut out, url_start);
    out.push_str(rest);
    blank_passwords(&out)
}

/// A comma-separated list of URLs (NATS servers), each blanked as [`redact_url`] does.
pub(crate) fn redact_url_list(list: &str) -> String {
    list.split(',').map(redact_url).collect::<Vec<_>>().join(",")
}

/// Pushes onto `out` the start of `url` (what follows its `://`, if any) with its userinfo
/// blanked; returns the rest, from the `@` on.
fn blank_userinfo<'a>(out: &mut String, url: &'a str) -> &'a str {
    let end = url.find(char::is_whitespace).unwrap_or(url.len());
    let end = url[..end].find("://").unwrap_or(end);
    match url[..end].rfind('@') {
        Some(0) | None => url,
        Some(at) => {
            let userinfo = &url[..at];
            if let Some((user, _)) = userinfo.split_once(':') {
                out.push_str(user);
                out.push(':');
            }
            out.push_str(MASK);
            &url[at..]
        }
    }
}

/// `text` with the value of every `password=` (any key ending in `password`, spaces around the
/// `=` allowed, as libpq reads them) blanked: a quoted value to its closing quote, an unquoted one
/// to whitespace, or in a URL's query (after `?` or `&`) to the next `&` or `#`. A backslash
/// escapes the next character, as in libpq.
fn blank_passwords(text: &str) -> String {
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(KEY) {
        let key_start = search + found;
        let key_end = key_start + KEY.len();
        search = key_end;
        let after = &text[key_end..];
        let Some(eq) = after.trim_start_matches([' ', '\t']).strip_prefix('=') else { continue };
        let value = eq.trim_start_matches([' ', '\t']);
        let value_start = text.len() - value.len();
        let in_query = text[..key_start].ends_with(['?', '&']);
        let value_len = value_len(value, in_query);
        if value_len == 0 {
            continue;
        }
        out.push_str(&text[done..value_start]);
        out.push_str(MASK);
        done = value_start + value_len;
        search = done;
    }
    out.push_str(&text[done..]);
    out
}

/// How many bytes of `value` (what follows `password=`) are the password.
fn value_len(value: &str, in_query: bool) -> usize {
    let quoted = value.starts_with('\'');
    let mut chars = value.char_indices().skip(usize::from(quoted));
    while let Some((at, c)) = chars.next() {
        let ends = if quoted { c == '\'' } else { c.is_whitespace() || (in_query && (c == '&' || c == '#')) };
        if ends {
            return if quoted { at + 1 } else { at };
        }
        if c == '\\' {
            chars.next();
        }
    }
    value.len()
}

/// Asserts that `secret` is nowhere in `error`'s `Display` or `Debug`, nor in those of any error
/// in its source chain.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_hidden(error: &(dyn std::error::Error + 'static), secret: &str) {
    let mut next = Some(error);
    while let Some(error) = next {
        let (shown, debug) = (error.to_string(), format!("{error:?}"));
        assert!(!shown.contains(secret), "{secret:?} is in the error: {shown}");
        assert!(!debug.contains(secret), "{secret:?} is in the error's Debug: {debug}");
        next = error.source();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://app:s3cret@10.0.0.1:6379/0"), "redis://app:***@10.0.0.1:6379/0");
        assert_eq!(redact("rediss://:s3cret@host"), "rediss://:***@host");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("no url here"), "no url here");
    }

    #[test]
    fn a_token_or_password_without_a_user_is_redacted() {
        assert_eq!(redact("nats://s3cret@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(redact("redis://s3cret@host/0"), "redis://***@host/0");
        assert_eq!(redact("redis://@host"), "redis://@host", "nothing to blank");
    }

    #[test]
    fn every_url_of_a_text_is_redacted() {
        assert_eq!(
            redact("nats://a:s3cret@h1:4222,nats://t0ken@h2,nats://h3"),
            "nats://a:***@h1:4222,nats://***@h2,nats://h3"
        );
        assert_eq!(
            redact("from redis://a:one@h1 to \"redis://b:two@h2/0\""),
            "from redis://a:***@h1 to \"redis://b:***@h2/0\""
        );
    }

    #[test]
    fn a_password_holding_url_delimiters_is_redacted_whole() {
        for url in ["redis://u:p/ss@h", "redis://u:p@ss@h", "redis://u:p,ss@h", "redis://u:p#s?s@h/0"] {
            let redacted = redact(url);
            assert!(redacted.starts_with("redis://u:***@") && !redacted.contains('p'), "{url} → {redacted}");
        }
    }

    #[test]
    fn libpq_passwords_are_redacted() {
        assert_eq!(redact("host=db password=s3cret dbname=app"), "host=db password=*** dbname=app");
        assert_eq!(redact("host=db password = 's3 \\' cret' user=u"), "host=db password = *** user=u");
        assert_eq!(redact("host=db password=s3\\ cret"), "host=db password=***");
        assert_eq!(redact("password='unterminated"), "password=***");
        assert_eq!(redact("host=db PASSWORD=s3cret"), "host=db PASSWORD=***");
        assert_eq!(
            redact("postgresql://h/db?password=s3cret&sslmode=disable"),
            "postgresql://h/db?password=***&sslmode=disable"
        );
        assert_eq!(redact("postgresql://u:s3cret@h/db"), "postgresql://u:***@h/db");
        // libpq skips the spaces after `=`: the next word is the password.
        assert_eq!(redact("host=db password= dbname=app"), "host=db password= ***");
        assert_eq!(redact("host=db user=password"), "host=db user=password");
    }

    #[test]
    fn a_setting_without_a_scheme_is_redacted() {
        assert_eq!(redact_url("app:s3cret@cache:6379"), "app:***@cache:6379");
        assert_eq!(redact_url("s3cret@127.0.0.1"), "***@127.0.0.1");
        assert_eq!(redact_url("host=db password=s3cret"), "host=db password=***");
        assert_eq!(redact_url("redis://u:s3cret@h"), "redis://u:***@h");
        assert_eq!(redact_url_list("nats://u:one@h1, two@h2,h3:4222"), "nats://u:***@h1, ***@h2,h3:4222");
    }

    #[test]
    fn masks_show_only_whether_a_secret_is_set() {
        assert_eq!(mask(Some("s3cret")), Some(MASK));
        assert_eq!(mask::<str>(None), None);
    }
}
