//! The configuration reader on arbitrary YAML text and environment variables: never a panic;
//! every error names a key and says what is wrong; reading is deterministic; and every accepted
//! configuration yields a builder or a typed error, without a panic (nothing is built: no threads,
//! no connections).
//!
//! The input is text: the YAML document, then, after a NUL, the environment as `NAME=value` lines
//! (`EVENTBROKER_*` overrides and variables for `${VAR}` expansion). The seeds in
//! `fuzz/corpus/config` are written that way.

#![no_main]

use eventbroker::config::{Config, Env};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (yaml, vars) = text.split_once('\0').unwrap_or((text, ""));
    let env = Env::from_vars(vars.lines().filter_map(|line| line.split_once('=')));

    let from_yaml = Config::from_yaml_str_with(yaml, &env);
    check(&from_yaml);
    assert_eq!(from_yaml, Config::from_yaml_str_with(yaml, &env), "reading is deterministic");
    check(&Config::from_env_with(&env));
});

fn check(read: &Result<Config, eventbroker::ConfigError>) {
    match read {
        Ok(config) => {
            // A provider whose feature is not compiled (this target has none) or settings out of
            // range are typed errors; the memory provider is made, holding nothing yet.
            let _ = config.builder();
        }
        Err(error) => {
            assert!(!error.key().is_empty(), "an error names its key: {error}");
            assert!(!error.reason().is_empty(), "an error says what is wrong: {error}");
            assert!(error.to_string().starts_with("invalid configuration: "), "{error}");
        }
    }
}
