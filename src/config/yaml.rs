//! YAML text to a configuration tree, with saphyr (feature `yaml`).

use saphyr::{LoadableYamlNode, Scalar, Yaml};

use super::reader::Node;
use crate::error::ConfigError;

/// The `event_broker` mapping of a YAML document (`Null` when it has none); the document's other
/// keys belong to the application and are not looked at.
pub(crate) fn event_broker_section(text: &str) -> Result<Option<Node>, ConfigError> {
    let documents = Yaml::load_from_str(text).map_err(|error| {
        let at = error.marker();
        ConfigError::new(
            format!("line {}, column {}", at.line(), at.col() + 1),
            format!("invalid YAML: {}", error.info()),
        )
    })?;
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
        if let Yaml::Value(Scalar::String(name)) = strip_tags(key) {
            if name == "event_broker" {
                return convert("event_broker", value).map(Some);
            }
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

fn convert(path: &str, yaml: &Yaml<'_>) -> Result<Node, ConfigError> {
    Ok(match strip_tags(yaml) {
        Yaml::Value(scalar) => scalar_node(scalar),
        Yaml::Representation(text, ..) => Node::Str(text.to_string()),
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
                let key = match strip_tags(key) {
                    Yaml::Value(Scalar::String(s)) => s.to_string(),
                    Yaml::Value(Scalar::Integer(i)) => i.to_string(),
                    Yaml::Value(Scalar::Boolean(b)) => b.to_string(),
                    _ => return Err(ConfigError::new(path, "a key is not a plain name")),
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

fn scalar_node(scalar: &Scalar<'_>) -> Node {
    match scalar {
        Scalar::Null => Node::Null,
        Scalar::Boolean(b) => Node::Bool(*b),
        Scalar::Integer(i) => Node::Int(*i),
        Scalar::FloatingPoint(x) => Node::Float(x.into_inner()),
        Scalar::String(s) => Node::Str(s.to_string()),
    }
}
