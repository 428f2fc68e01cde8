//! Configuration files: `agent.toml` and `gateway.toml`.
//!
//! Each file is read in two steps: serde takes the TOML into plain structs, with every
//! key they do not take reported at once in line order (`keys`), then one validation
//! pass checks every field and collects *all* the problems, each naming its key and the
//! fix, before anything starts. Relative paths
//! are taken from the directory that holds the file.

pub mod agent;
pub mod gateway;
mod keys;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use agent::{
    AgentConfig, Forward, GatewayAddress, GatewayPeer, LocalUsers, Publication, Route,
};
pub use gateway::{AllowRule, AllowTo, GatewayConfig, PublishRule, Service};

/// Everything wrong with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "{}: {one}", self.file.display()),
            many => {
                write!(f, "{}: {} problems:", self.file.display(), many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Collects the problems of one validation pass.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }

    fn finish<T>(self, file: &Path, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                file: file.to_path_buf(),
                problems: self.0,
            })
        }
    }
}

/// Reads the TOML into the plain struct `T`. Every unknown key is a problem (all of
/// them, in line order, beside serde's own error if there is one); the problems found
/// so far come back with the struct, for the validation pass to add to.
fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &Path,
) -> Result<(T, Problems), ConfigError> {
    let located = |error: &toml::de::Error| -> (usize, String) {
        let message = error.message().trim().to_string();
        match error.span() {
            Some(span) => (
                span.start,
                format!("line {}: {message}", line_of(text, span.start)),
            ),
            None => (usize::MAX, message),
        }
    };
    let refuse = |problems: Vec<String>| ConfigError {
        file: file.to_path_buf(),
        problems,
    };
    let document = toml::de::DeTable::parse(text).map_err(|e| refuse(vec![located(&e).1]))?;
    let mut found: Vec<(usize, String)> = keys::Shape::of::<T>()
        .map(|shape| shape.unknown_keys(document.get_ref()))
        .unwrap_or_default()
        .into_iter()
        .map(|u| {
            let line = line_of(text, u.offset);
            (u.offset, format!("line {line}: {}: {}", u.path, u.advice))
        })
        .collect();
    match toml::from_str::<T>(text) {
        Ok(value) => Ok((value, Problems(found.into_iter().map(|(_, p)| p).collect()))),
        Err(error) => {
            found.push(located(&error));
            found.sort_by_key(|(offset, _)| *offset);
            Err(refuse(found.into_iter().map(|(_, p)| p).collect()))
        }
    }
}

/// The line number (1-based) of a byte offset, for messages.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A path from a config file, taken relative to the file's directory.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn base_dir(file: &Path) -> PathBuf {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Seconds from the file, checked: positive, finite, at most a day.
/// An optional `ADDRESS:PORT` setting (`metrics`), checked.
fn socket_address(
    problems: &mut Problems,
    key: &str,
    value: Option<&String>,
) -> Option<std::net::SocketAddr> {
    let text = value?;
    match text.parse() {
        Ok(address) => Some(address),
        Err(_) => {
            problems.add(
                key,
                format!("`{text}` is not ADDRESS:PORT, e.g. \"127.0.0.1:9464\""),
            );
            None
        }
    }
}

fn seconds(problems: &mut Problems, key: &str, value: Option<f64>, default: f64) -> Duration {
    let v = value.unwrap_or(default);
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        problems.add(
            key,
            format!("{v} is not a duration: give seconds, more than 0 and at most 86400"),
        );
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(v)
}

/// A duration written as `30s`, `15m`, `24h` or `7d`, checked against `[min, max]`.
fn written_duration(
    problems: &mut Problems,
    key: &str,
    value: Option<&str>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(text) = value else {
        return default;
    };
    match crate::duration::parse(text) {
        Ok(d) if d >= min && d <= max => d,
        Ok(_) => {
            problems.add(
                key,
                format!(
                    "`{text}` is out of range: give {} to {}",
                    crate::duration::format(min),
                    crate::duration::format(max)
                ),
            );
            default
        }
        Err(e) => {
            problems.add(key, e);
            default
        }
    }
}
