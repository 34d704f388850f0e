//! Scale-out: one plan, many shard processes, one finalize.
//!
//! `bq2sftp plan [export flags] > plan.json` opens the source once (for BigQuery: one read
//! session, whose streams every shard then reads) and writes a [`PlanFile`]: the session's
//! streams, schema, snapshot and expiry, and the export's own flags (secrets excluded), so a
//! shard needs nothing but the plan and its secrets.
//!
//! `bq2sftp export --plan plan.json --shard I/N` reads streams I, I+N, … into files named by
//! stream index, so shards never collide, and writes `_MANIFEST.shard-I-of-N.json` listing the
//! streams it completed. A killed shard is re-run with `--resume` like any export.
//!
//! `bq2sftp finalize --plan plan.json` reads the shard manifests back from the target, checks
//! that every stream of the plan is complete exactly once, and only then writes the combined
//! `_MANIFEST.json` and (when asked) `_SUCCESS`. While a shard is missing it refuses, naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Error};
use crate::manifest::{FileRecord, Manifest};
use crate::pipeline::PipelineOptions;
use crate::read::{ReadPlan, SourceDescription, StreamSpec};
use crate::write::{PutMode, Sink, WriteError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    pub plan_version: u32,
    pub created_at: String,
    pub source: SourceDescription,
    /// The Arrow schema, as a base64 IPC schema message.
    pub schema: String,
    pub streams: Vec<StreamSpec>,
    pub estimated_rows: Option<u64>,
    /// The export's flags as given (`flag = value`), secrets left out.
    pub export: serde_json::Map<String, serde_json::Value>,
}

impl PlanFile {
    pub const VERSION: u32 = 1;

    pub fn new(plan: &ReadPlan, export: serde_json::Map<String, serde_json::Value>) -> Self {
        PlanFile {
            plan_version: Self::VERSION,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            source: plan.description.clone(),
            schema: crate::state::encode_schema(&plan.schema),
            streams: plan.streams.clone(),
            estimated_rows: plan.estimated_rows,
            export,
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let what = format!("--plan {}", path.display());
        let bytes = std::fs::read(path).map_err(|e| ConfigError::invalid(&what, format!("cannot read it: {e}")))?;
        let plan: PlanFile = serde_json::from_slice(&bytes)
            .map_err(|e| ConfigError::invalid(&what, format!("not a bq2sftp plan: {e}")))?;
        if plan.plan_version != Self::VERSION {
            return Err(ConfigError::invalid(&what, format!("plan version {} is not supported", plan.plan_version)));
        }
        Ok(plan)
    }

    /// When the plan was made: the `{date}` of every shard's file names.
    pub fn created(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.created_at).ok().map(|d| d.with_timezone(&chrono::Utc))
    }

    pub fn read_plan(&self) -> Result<ReadPlan, ConfigError> {
        let schema = crate::state::decode_schema(&self.schema)
            .map_err(|e| ConfigError::invalid("--plan", format!("its schema cannot be read: {e}")))?;
        Ok(ReadPlan {
            schema: Arc::new(schema),
            streams: self.streams.clone(),
            estimated_rows: self.estimated_rows,
            description: self.source.clone(),
        })
    }

    /// The export flags as a job-file table, for [`crate::jobfile::from_table`].
    pub fn export_table(&self) -> toml::Table {
        let mut table = toml::Table::new();
        for (key, value) in &self.export {
            let value = match value {
                serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
                serde_json::Value::Array(items) => toml::Value::Array(
                    items.iter().map(|v| toml::Value::String(v.as_str().unwrap_or_default().to_string())).collect(),
                ),
                serde_json::Value::String(s) => toml::Value::String(s.clone()),
                other => toml::Value::String(other.to_string()),
            };
            table.insert(key.clone(), value);
        }
        table
    }
}

/// The flags a user gave (not defaults), secrets and plan/shard flags left out, as a plan records them.
pub fn given_flags(matches: &clap::ArgMatches) -> serde_json::Map<String, serde_json::Value> {
    let command = crate::jobfile::export_command();
    let mut out = serde_json::Map::new();
    for arg in crate::jobfile::export_flags(&command) {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if crate::jobfile::is_secret(arg)
            || matches!(long, "plan" | "shard" | "shard-count" | "print-config" | "resume")
        {
            continue;
        }
        if !matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        ) {
            continue;
        }
        let value = if !arg.get_action().takes_values() {
            serde_json::Value::Bool(matches.get_flag(id))
        } else {
            let values: Vec<String> =
                matches.get_raw(id).into_iter().flatten().map(|v| v.to_string_lossy().into_owned()).collect();
            match values.as_slice() {
                [one] => serde_json::Value::String(one.clone()),
                many => serde_json::Value::Array(many.iter().cloned().map(serde_json::Value::String).collect()),
            }
        };
        out.insert(long.to_string(), value);
    }
    out
}

/// Checks every shard's manifest and writes the combined manifest (and `_SUCCESS`), with the
/// job's output options (`opts`): manifest and marker names, and the empty-table file.
pub async fn finalize(
    plan: &PlanFile,
    sink: Arc<dyn Sink>,
    opts: &PipelineOptions,
    shard_count: usize,
) -> Result<Manifest, Error> {
    // A wrong or missing target directory would otherwise read as "shards not finished"
    // (exit 6), which a scheduler retries forever.
    sink.check().await?;
    let manifest_name = opts.manifest_name.as_deref().unwrap_or(crate::manifest::DEFAULT_MANIFEST_NAME);
    let put_mode = opts.put_mode;
    let mut files: Vec<FileRecord> = Vec::new();
    let mut covered: BTreeMap<usize, usize> = BTreeMap::new();
    let mut missing = Vec::new();
    let mut started_at: Option<String> = None;
    let mut first: Option<Manifest> = None;
    for index in 0..shard_count {
        let shard = crate::pipeline::Shard { index, count: shard_count };
        let name = shard.manifest_name(manifest_name);
        let Some(bytes) = sink.get(&name).await? else {
            missing.push(format!("{index}/{shard_count}"));
            continue;
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| WriteError::Other {
            target: format!("{}/{name}", sink.describe()),
            message: format!("not a manifest: {e}"),
        })?;
        if m.shard != Some(shard) {
            return Err(ConfigError::invalid(
                "finalize",
                format!(
                    "{name} belongs to shard {:?}, not {index}/{shard_count}; were the shards run with another count?",
                    m.shard
                ),
            )
            .into());
        }
        for s in &m.streams {
            *covered.entry(*s).or_default() += 1;
        }
        started_at = match started_at {
            Some(s) if s <= m.started_at => Some(s),
            _ => Some(m.started_at.clone()),
        };
        files.extend(m.files.iter().cloned());
        first.get_or_insert(m);
    }
    if !missing.is_empty() {
        return Err(Error::Interrupted(format!(
            "shard(s) {} have not finished (no shard manifest in {}); run them (with --resume) and finalize again",
            missing.join(", "),
            sink.describe()
        )));
    }
    let incomplete: Vec<String> =
        plan.streams.iter().filter(|s| covered.get(&s.index) != Some(&1)).map(|s| s.index.to_string()).collect();
    if !incomplete.is_empty() {
        return Err(Error::Interrupted(format!(
            "stream(s) {} of the plan are not covered exactly once by the shard manifests",
            incomplete.join(", ")
        )));
    }
    for f in &files {
        if !sink.exists(&f.name).await? {
            return Err(WriteError::Other {
                target: sink.describe(),
                message: format!("{} is listed by a shard manifest but is not in the target", f.name),
            }
            .into());
        }
    }
    files.sort_by_key(|f| (f.stream, f.seq));
    let Some(first) = first else {
        return Err(ConfigError::invalid("finalize", "the plan has no shards").into());
    };
    if files.is_empty() {
        // An empty table: one header-only file, as a single export would have written.
        let data = crate::pipeline::empty_file(opts, &plan.read_plan()?.schema)?;
        let name = crate::pipeline::file_name(opts, 0, 0, opts.name_date.unwrap_or_else(chrono::Utc::now));
        files.push(FileRecord {
            name: name.clone(),
            stream: 0,
            seq: 0,
            rows: 0,
            bytes: data.len() as u64,
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data)),
        });
        put(&sink, &name, Bytes::from(data), put_mode).await?;
    }
    let manifest = Manifest {
        manifest_version: Manifest::VERSION,
        tool: concat!("bq2sftp ", env!("CARGO_PKG_VERSION")).to_string(),
        source: plan.source.clone(),
        target: sink.describe(),
        format: first.format.clone(),
        compression: first.compression.clone(),
        started_at: started_at.unwrap_or_default(),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        total_rows: files.iter().map(|f| f.rows).sum(),
        total_bytes: files.iter().map(|f| f.bytes).sum(),
        total_files: files.len(),
        files,
        shard: None,
        streams: plan.streams.iter().map(|s| s.index).collect(),
    };
    put(&sink, manifest_name, Bytes::from(manifest.to_json()), put_mode).await?;
    if let Some(marker) = &opts.success_marker {
        put(&sink, marker, Bytes::new(), put_mode).await?;
    }
    Ok(manifest)
}

async fn put(sink: &Arc<dyn Sink>, name: &str, data: Bytes, mode: PutMode) -> Result<(), WriteError> {
    let mut upload = sink.create(name, mode).await?;
    if !data.is_empty() {
        upload.put_part(data).await?;
    }
    upload.complete().await?;
    Ok(())
}
