//! YAML text to a configuration tree, with saphyr (feature `yaml`).

use saphyr::{Scalar, Yaml, YamlLoader};
use saphyr_parser::{BufferedInput, Parser};

use super::reader::Node;
use crate::error::ConfigError;

/// The `event_broker` mapping of a YAML document (`Null` when it has none); the document's other
/// keys belong to the application and are not looked at.
pub(crate) fn event_broker_section(text: &str) -> Result<Option<Node>, ConfigError> {
    // Scalars stay as written (`Representation`), resolved here, so that a string key takes
    // `0123` or `True` as it is written rather than as the number or boolean YAML reads it as.
    let mut loader = YamlLoader::<Yaml<'_>>::default();
    loader.early_parse(false);
    let parsed = Parser::new(BufferedInput::new(text.chars())).load(&mut loader, true);
    if let Some(error) = parsed.err().or_else(|| loader.error().cloned()) {
        let at = error.marker();
        return Err(ConfigError::new(
            format!("line {}, column {}", at.line(), at.col() + 1),
            format!("invalid YAML: {}", error.info()),
        ));
    }
    let documents = loader.into_documents();
    let root = match documents.as_slice() {
        [] => return Ok(None),
        [root] => root,
        more => {
            return Err(ConfigError::new(
                "document",
                format!("the text holds {} YAML documents; expected one", more.len()),
            ));
        }
    };
    let Yaml::Mapping(entries) = strip_tags(root) else {
        return Ok(None);
    };
    for (key, value) in entries {
        if key_text(key).as_deref() == Some("event_broker") {
            return convert("event_broker", value).map(Some);
        }
    }
    Ok(None)
}

fn strip_tags<'a, 'input>(mut yaml: &'a Yaml<'input>) -> &'a Yaml<'input> {
    while let Yaml::Tagged(_, inner) = yaml {
        yaml = inner;
    }
    yaml
}

/// A mapping key's name: a scalar as written.
fn key_text(key: &Yaml<'_>) -> Option<String> {
    match strip_tags(key) {
        Yaml::Representation(text, ..) => Some(text.to_string()),
        Yaml::Value(Scalar::String(s)) => Some(s.to_string()),
        Yaml::Value(Scalar::Integer(i)) => Some(i.to_string()),
        Yaml::Value(Scalar::Boolean(b)) => Some(b.to_string()),
        _ => None,
    }
}

fn convert(path: &str, yaml: &Yaml<'_>) -> Result<Node, ConfigError> {
    Ok(match strip_tags(yaml) {
        Yaml::Value(scalar) => {
            let written = match scalar {
                Scalar::Boolean(b) => b.to_string(),
                Scalar::Integer(i) => i.to_string(),
                Scalar::FloatingPoint(x) => x.to_string(),
                Scalar::Null | Scalar::String(_) => String::new(),
            };
            scalar_node(scalar, written)
        }
        Yaml::Representation(text, style, tag) => {
            let Some(scalar) = Scalar::parse_from_cow_and_metadata(text.clone(), *style, tag.as_ref()) else {
                return Err(ConfigError::new(path, format!("{text:?} is not a value of its YAML tag")));
            };
            scalar_node(&scalar, text.to_string())
        }
        Yaml::Sequence(items) => Node::Seq(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| convert(&format!("{path}[{i}]"), item))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Mapping(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let Some(key) = key_text(key) else {
                    return Err(ConfigError::new(path, "a key is not a plain name"));
                };
                let value = convert(&format!("{path}.{key}"), value)?;
                out.push((key, value));
            }
            Node::Map(out)
        }
        Yaml::Alias(_) => return Err(ConfigError::new(path, "YAML aliases are not supported here")),
        Yaml::Tagged(..) | Yaml::BadValue => {
            return Err(ConfigError::new(path, "not a value this configuration understands"));
        }
    })
}

/// `scalar`, `written` as the document wrote it (`0x1F` for 31).
fn scalar_node(scalar: &Scalar<'_>, written: String) -> Node {
    match scalar {
        Scalar::Null => Node::Null,
        Scalar::Boolean(b) => Node::Bool(*b, written),
        Scalar::Integer(i) => Node::Int(*i, written),
        Scalar::FloatingPoint(x) => Node::Float(x.into_inner(), written),
        Scalar::String(s) => Node::Str(s.to_string()),
    }
}
