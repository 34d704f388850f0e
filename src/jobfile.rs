//! Job files: `bq2sftp run JOB.toml` runs the export a TOML file describes.
//!
//! A job file's keys are the `export` flags without their dashes (`from`, `to`, `format`,
//! `max-file-bytes` or `max_file_bytes`, …), so the flags' documentation is the job file's
//! documentation and nothing can drift apart. Values are strings, numbers, booleans (a flag
//! that takes no value is `true` or `false`), or arrays for repeatable flags.
//!
//! Precedence, highest first: flags on the `run` command line, then environment variables
//! (for options that have one, e.g. `SFTP_PASSWORD`), then the job file, then defaults. The
//! file is turned into arguments and clap does the rest, so validation is exactly the flags'.
//! Secrets belong in the environment or behind a reference (`env:NAME`, `file:PATH`,
//! `gcp-secret:…`), not in the file itself.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::{ArgMatches, Args, Command, FromArgMatches, parser::ValueSource};

use crate::cli::ExportArgs;
use crate::error::ConfigError;

/// The `export` command as clap sees it, for introspection.
pub fn export_command() -> Command {
    // The binary's global flags may follow the subcommand (`export ... -v --log-format json`);
    // they are accepted here so that those command lines parse, and belong to the logger.
    ExportArgs::augment_args(Command::new("export").no_binary_name(true))
        .arg(clap::Arg::new(GLOBAL_VERBOSE).short('v').long("verbose").action(clap::ArgAction::Count).hide(true))
        .arg(clap::Arg::new(GLOBAL_LOG_FORMAT).long("log-format").hide(true))
}

const GLOBAL_VERBOSE: &str = "global-verbose";
const GLOBAL_LOG_FORMAT: &str = "global-log-format";

/// Reads `path` and returns the export arguments it describes, with `overrides` (flags from the
/// command line) taking precedence, and the parsed matches (for `--print-config`).
pub fn load(path: &Path, overrides: &[OsString]) -> Result<(ExportArgs, ArgMatches, Vec<String>), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(format!("job file {shown}"), format!("cannot read it: {e}")))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| ConfigError::invalid(format!("job file {shown}"), e.to_string().trim().to_string()))?;
    from_table(&table, overrides, &format!("job file {shown}"))
}

/// The export arguments a table of `flag = value` describes (a job file, or one job of
/// `serve`'s jobs file); `what` names it in errors.
pub fn from_table(
    table: &toml::Table,
    overrides: &[OsString],
    what: &str,
) -> Result<(ExportArgs, ArgMatches, Vec<String>), ConfigError> {
    let command = export_command();
    let mut file_args: Vec<OsString> = Vec::new();
    let mut from_file = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = export_flags(&command).find(|a| a.get_long() == Some(long.as_str())).ok_or_else(|| {
            ConfigError::invalid(what, format!("unknown key '{key}'; keys are the export flags without dashes"))
        })?;
        if given_on_command_line(overrides, &long) {
            continue;
        }
        if let Some(env) = arg.get_env()
            && std::env::var_os(env).is_some()
        {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if *b {
                        file_args.push(format!("--{long}").into());
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::invalid(
                        what,
                        format!("'{key}' must be a string, number, boolean or array of those"),
                    ));
                }
            };
            if !takes_value {
                return Err(ConfigError::invalid(what, format!("'{key}' is a switch: use true or false")));
            }
            file_args.push(format!("--{long}").into());
            file_args.push(text.into());
        }
        from_file.push(arg.get_id().to_string());
    }
    let args: Vec<OsString> = file_args.into_iter().chain(overrides.iter().cloned()).collect();
    let matches = command.try_get_matches_from(args).map_err(|e| ConfigError::invalid(what, clap_message(&e)))?;
    let export = ExportArgs::from_arg_matches(&matches).map_err(|e| ConfigError::invalid(what, clap_message(&e)))?;
    Ok((export, matches, from_file))
}

fn given_on_command_line(overrides: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    overrides.iter().any(|a| a.to_str().is_some_and(|a| a == flag || a.starts_with(&format!("{flag}="))))
}

/// clap's message without its usage block, on one line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> =
        text.lines().take_while(|l| !l.starts_with("Usage:") && !l.trim().is_empty()).map(str::trim).collect();
    lines.join(" ").trim_start_matches("error: ").to_string()
}

/// Flags whose values are secrets (masked by `--print-config`, never recorded in a plan): the
/// ones declared with `hide_env_values`, so a new secret flag is covered by its declaration.
pub fn is_secret(arg: &clap::Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// The export flags a user may set: without the binary's global flags, which
/// [`export_command`] accepts only so that command lines parse.
pub fn export_flags(command: &Command) -> impl Iterator<Item = &clap::Arg> {
    command.get_arguments().filter(|a| !a.is_hide_set())
}

/// The effective configuration, one `key = value  # source` line per option, secrets masked.
pub fn describe(matches: &ArgMatches, from_file: &[String]) -> String {
    let command = export_command();
    let mut lines = BTreeMap::new();
    for arg in export_flags(&command) {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        let Some(source) = matches.value_source(id) else { continue };
        let values: Vec<String> = match matches.get_raw(id) {
            Some(raw) => raw.map(|v| v.to_string_lossy().into_owned()).collect(),
            None => continue,
        };
        // A reference (env:, file:, gcp-secret:) names where the secret lives, which is what
        // someone checking the configuration wants to see; the value itself never shows.
        let value = if is_secret(arg) && !(values.len() == 1 && crate::secret::is_reference(&values[0])) {
            "\"***\"".to_string()
        } else if !arg.get_action().takes_values() {
            matches.get_flag(id).to_string()
        } else if values.len() == 1 {
            quote(&values[0])
        } else {
            format!("[{}]", values.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", "))
        };
        let origin = match source {
            ValueSource::CommandLine if from_file.iter().any(|f| f == id) => "job file",
            ValueSource::CommandLine => "flag",
            ValueSource::EnvVariable => "environment",
            _ => "default",
        };
        lines.insert(long.to_string(), format!("{long} = {value}  # {origin}"));
    }
    lines.into_values().collect::<Vec<_>>().join("\n") + "\n"
}

/// A TOML basic string (its escapes are JSON's).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("job.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_job_file_is_the_export_flags() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(
            tmp.path(),
            "from = \"synthetic://?rows=10\"\nto = \"null:\"\nformat = \"ndjson\"\nmax_file_rows = 100\noverwrite = true\nno-header = false\n",
        );
        let (args, matches, from_file) = load(&p, &[]).unwrap();
        assert_eq!(args.format, "ndjson");
        assert_eq!(args.max_file_rows, Some(100));
        assert!(args.overwrite && !args.no_header);
        let text = describe(&matches, &from_file);
        assert!(text.contains("format = \"ndjson\"  # job file"), "{text}");
        assert!(text.contains("csv-delimiter = \",\"  # default"), "{text}");
    }

    #[test]
    fn flags_override_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), "from = \"synthetic://?rows=10\"\nto = \"null:\"\nformat = \"ndjson\"\n");
        let (args, matches, from_file) = load(&p, &["--format".into(), "parquet".into()]).unwrap();
        assert_eq!(args.format, "parquet");
        assert!(describe(&matches, &from_file).contains("format = \"parquet\"  # flag"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load(&write(tmp.path(), "from = \"x\"\nto = \"null:\"\ncolour = \"red\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("unknown key 'colour'"), "{err}");
        let err = load(&write(tmp.path(), "from = \"x\"\nto = \"null:\"\noverwrite = \"yes\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("switch"), "{err}");
        let err = load(&write(tmp.path(), "from = [unclosed\n"), &[]).unwrap_err();
        assert!(err.to_string().starts_with("job file"), "{err}");
        let err = load(&write(tmp.path(), "to = \"null:\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("--from"), "{err}");
    }
}
