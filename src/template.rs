//! File-name templates: `{prefix}-{stream:03}-{seq:05}{ext}` and friends.
//!
//! Placeholders: `{prefix}`, `{stream}` (the read stream's index), `{seq}` (the file's number
//! within its stream, from 0), `{date}` (the job's start date in UTC, `YYYYMMDD`, or
//! `{date:FORMAT}` with a strftime format), `{ext}` (`.csv.gz`, `.parquet`, …). Numbers take
//! an optional zero-padded width, `{seq:05}`. Templates are checked when the job is built, so a
//! typo fails before anything is read.

use chrono::{DateTime, Utc};

use crate::error::ConfigError;

pub const DEFAULT_TEMPLATE: &str = "{prefix}-{stream:03}-{seq:05}{ext}";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Prefix,
    Stream(usize),
    Seq(usize),
    Date(String),
    Ext,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    pieces: Vec<Piece>,
}

/// The values a name is rendered from.
#[derive(Debug, Clone)]
pub struct NameContext<'a> {
    pub prefix: &'a str,
    pub stream: usize,
    pub seq: u64,
    pub date: DateTime<Utc>,
    pub ext: &'a str,
}

impl NameTemplate {
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let what = || format!("--name-template '{template}'");
        let mut pieces = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            let Some(open) = rest.find(['{', '}']) else {
                pieces.push(Piece::Literal(rest.to_string()));
                break;
            };
            if rest.as_bytes()[open] == b'}' {
                return Err(ConfigError::invalid(what(), "unmatched '}'"));
            }
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| ConfigError::invalid(what(), "unclosed '{'"))? + open;
            let inner = &rest[open + 1..close];
            let (name, spec) = inner.split_once(':').unwrap_or((inner, ""));
            let width = |spec: &str| -> Result<usize, ConfigError> {
                if spec.is_empty() {
                    return Ok(0);
                }
                spec.parse::<usize>().ok().filter(|w| *w <= 20).ok_or_else(|| {
                    ConfigError::invalid(
                        what(),
                        format!("'{{{inner}}}': width must be a number up to 20, like {{{name}:05}}"),
                    )
                })
            };
            pieces.push(match name {
                "prefix" if spec.is_empty() => Piece::Prefix,
                "ext" if spec.is_empty() => Piece::Ext,
                "stream" => Piece::Stream(width(spec)?),
                "seq" => Piece::Seq(width(spec)?),
                "date" => {
                    let format = if spec.is_empty() { "%Y%m%d" } else { spec };
                    if chrono::format::StrftimeItems::new(format).parse().is_err() {
                        return Err(ConfigError::invalid(
                            what(),
                            format!("'{format}' is not a valid strftime date format"),
                        ));
                    }
                    Piece::Date(format.to_string())
                }
                _ => {
                    return Err(ConfigError::invalid(
                        what(),
                        format!(
                            "unknown placeholder '{{{inner}}}'; use {{prefix}}, {{stream}}, {{seq}}, {{date}}, {{ext}}"
                        ),
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        for p in &pieces {
            if let Piece::Literal(l) = p
                && (l.contains('/') || l.contains('\\') || l.contains('\0'))
            {
                return Err(ConfigError::invalid(what(), "file names cannot contain '/', '\\' or NUL"));
            }
        }
        if pieces.is_empty() {
            return Err(ConfigError::invalid(what(), "empty template"));
        }
        Ok(NameTemplate { source: template.to_string(), pieces })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn has_stream(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Stream(_)))
    }

    pub fn has_seq(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Seq(_)))
    }

    pub fn render(&self, ctx: &NameContext<'_>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Prefix => out.push_str(ctx.prefix),
                Piece::Ext => out.push_str(ctx.ext),
                Piece::Stream(w) => out.push_str(&format!("{:0w$}", ctx.stream, w = *w)),
                Piece::Seq(w) => out.push_str(&format!("{:0w$}", ctx.seq, w = *w)),
                Piece::Date(f) => out.push_str(&ctx.date.format(f).to_string()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> NameContext<'static> {
        NameContext {
            prefix: "orders",
            stream: 7,
            seq: 12,
            date: DateTime::parse_from_rfc3339("2026-12-04T03:00:00Z").unwrap().with_timezone(&Utc),
            ext: ".csv.gz",
        }
    }

    #[test]
    fn default_template() {
        let t = NameTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.render(&ctx()), "orders-007-00012.csv.gz");
        assert!(t.has_stream() && t.has_seq());
    }

    #[test]
    fn dates_and_literals() {
        let t = NameTemplate::parse("{date}_{prefix}_{stream}_{seq}{ext}").unwrap();
        assert_eq!(t.render(&ctx()), "20261204_orders_7_12.csv.gz");
        let t = NameTemplate::parse("exp-{date:%Y-%m-%d}-{seq:3}.dat").unwrap();
        assert_eq!(t.render(&ctx()), "exp-2026-12-04-012.dat");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (t, why) in [
            ("{prefix", "unclosed"),
            ("a}b", "unmatched"),
            ("{colour}", "unknown placeholder"),
            ("{seq:xx}", "width"),
            ("dir/{seq}", "cannot contain '/'"),
            ("", "empty"),
        ] {
            let err = NameTemplate::parse(t).unwrap_err().to_string();
            assert!(err.contains(why), "{t}: {err}");
        }
    }
}
