//! `custos audit`: the auditor's commands. `key` and `checkpoint` print what
//! the service reports; `export` writes the log to a directory; `verify`
//! checks an export or a live server against a pinned verifier key, offline
//! in everything but fetching.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{connect, describe, emit};
use custos::proto::{self, audit_service_client::AuditServiceClient};
use custos_core::audit::merkle;
use custos_core::audit::note::NoteVerifier;
use custos_core::audit::verify::{self, ExportWriter, LogVerifier, VerifyReport};

/// Entries between progress-bar redraws.
const PROGRESS_STEP: u64 = 4096;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the log key: algorithm, public key and the note verifier key to pin.
    Key,
    /// Print a signed checkpoint (the latest, or the one at --size), verbatim.
    Checkpoint {
        /// A tree size that has a checkpoint.
        #[arg(long)]
        size: Option<u64>,
    },
    /// Write every entry, its leaf hash and every checkpoint to a directory.
    Export {
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a log: checkpoint signatures, tree, consistency, and a full
    /// replay of every decision. Exits non-zero on any failure.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The pinned note verifier key (name+keyid+key), or a file holding it.
    #[arg(long)]
    key: String,
    /// An export directory; without it, the log is fetched from --server.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A checkpoint kept from an earlier run: the log must extend it.
    #[arg(long)]
    previous_checkpoint: Option<PathBuf>,
    /// The deployment's service id, pinned: every signed vote and governance
    /// message must name it (default: taken from the first one).
    #[arg(long)]
    service_id: Option<String>,
}

pub async fn audit(command: AuditCommand, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    match command {
        AuditCommand::Key => key(server, json).await,
        AuditCommand::Checkpoint { size } => checkpoint(server, size, json).await,
        AuditCommand::Export { out } => export(server, &out, json).await,
        AuditCommand::Verify(args) => verify_log(args, server, json).await,
    }
}

async fn client(server: &crate::ServerArgs) -> Result<AuditServiceClient<tonic::transport::Channel>, String> {
    Ok(AuditServiceClient::new(connect(server).await?)
        .max_decoding_message_size(custos::server::MAX_RESPONSE_BYTES))
}

async fn key(server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let key = client(server)
        .await?
        .get_log_key(proto::GetLogKeyRequest {})
        .await
        .map_err(describe)?
        .into_inner();
    let attributes: Vec<String> = key
        .attributes
        .iter()
        .map(|a| format!("{}={}", a.name, a.value))
        .collect();
    let value = serde_json::json!({
        "algorithm": key.algorithm,
        "public_key": hex::encode(&key.public_key),
        "origin": key.origin,
        "verifier_key": key.verifier_key,
        "key_label": key.key_label,
        "attributes": key.attributes.iter().map(|a| (a.name.clone(), serde_json::Value::Bool(a.value))).collect::<serde_json::Map<_, _>>(),
    });
    let text = format!(
        "origin:       {}\nalgorithm:    {}\npublic key:   {}\nkey label:    {}\nattributes:   {}\nverifier key: {}\n",
        key.origin,
        key.algorithm,
        hex::encode(&key.public_key),
        key.key_label,
        attributes.join(" "),
        key.verifier_key
    );
    emit(json, &value, &text)
}

async fn checkpoint(server: &crate::ServerArgs, size: Option<u64>, json: bool) -> Result<(), String> {
    let checkpoint = client(server)
        .await?
        .get_checkpoint(proto::GetCheckpointRequest {
            tree_size: size.unwrap_or(0),
        })
        .await
        .map_err(describe)?
        .into_inner();
    let value = serde_json::json!({
        "tree_size": checkpoint.tree_size,
        "root_hash": hex::encode(&checkpoint.root_hash),
        "note": checkpoint.note,
    });
    emit(json, &value, &checkpoint.note)
}

async fn fetch_checkpoints(
    audit: &mut AuditServiceClient<tonic::transport::Channel>,
) -> Result<Vec<proto::SignedCheckpoint>, String> {
    let mut stream = audit
        .list_checkpoints(proto::ListCheckpointsRequest {})
        .await
        .map_err(describe)?
        .into_inner();
    let mut all = Vec::new();
    while let Some(c) = stream.message().await.map_err(describe)? {
        all.push(c);
    }
    Ok(all)
}

/// Streams entries `[0, end)`, calling `each` on every one in order.
async fn fetch_entries(
    audit: &mut AuditServiceClient<tonic::transport::Channel>,
    end: u64,
    mut each: impl FnMut(&[u8]),
) -> Result<(), String> {
    let mut stream = audit
        .list_entries(proto::ListEntriesRequest { start: 0, end })
        .await
        .map_err(describe)?
        .into_inner();
    let mut expected = 0;
    while let Some(entry) = stream.message().await.map_err(describe)? {
        if entry.index != expected {
            return Err(format!(
                "server sent entry {} where {expected} was due",
                entry.index
            ));
        }
        each(&entry.data);
        expected += 1;
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} entries ({per_sec}, {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn export(server: &crate::ServerArgs, out: &Path, json: bool) -> Result<(), String> {
    let mut audit = client(server).await?;
    let checkpoints = fetch_checkpoints(&mut audit).await?;
    // Entries up to the latest checkpoint are what an auditor can check; with
    // none yet there is nothing to export (and an end of 0 would ask the
    // server for the whole, uncheckable, log).
    let end = checkpoints
        .iter()
        .map(|c| c.tree_size)
        .max()
        .filter(|size| *size > 0)
        .ok_or("the log has no signed checkpoint yet; custosd signs one within [audit] checkpoint_every_seconds of the first entry")?;
    let mut writer = ExportWriter::create(out).map_err(|e| format!("cannot write the export: {e}"))?;
    let bar = progress_bar(end);
    bar.set_message("exporting");
    let (mut written, mut failed) = (0u64, None);
    fetch_entries(&mut audit, end, |data| {
        if failed.is_none()
            && let Err(e) = writer.entry(data)
        {
            failed = Some(e);
        }
        written += 1;
        if written % PROGRESS_STEP == 0 {
            bar.set_position(written);
        }
    })
    .await?;
    bar.finish_and_clear();
    let written = failed.map_or_else(
        || {
            checkpoints
                .iter()
                .try_for_each(|c| writer.checkpoint(c.tree_size, &c.note))
                .and_then(|()| writer.finish())
        },
        Err,
    );
    written.map_err(|e| format!("cannot write the export in {}: {e}", out.display()))?;
    let value = serde_json::json!({
        "dir": out.display().to_string(),
        "entries": end,
        "checkpoints": checkpoints.len(),
    });
    let text = format!(
        "exported {end} entries and {} checkpoints to {}\n",
        checkpoints.len(),
        out.display()
    );
    emit(json, &value, &text)
}

fn pinned_key(key: &str) -> Result<NoteVerifier, String> {
    let text = match std::fs::read_to_string(key) {
        Ok(text) => text,
        Err(_) => key.to_owned(),
    };
    NoteVerifier::parse(text.trim()).map_err(|e| format!("--key: {e}"))
}

async fn verify_log(args: VerifyArgs, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let key = pinned_key(&args.key)?;
    let mut verifier = LogVerifier::new(key.clone(), args.service_id.as_deref());
    let mut live_latest = None;
    match &args.dir {
        Some(dir) => read_export(dir, &mut verifier)?,
        None => {
            let mut audit = client(server).await?;
            let checkpoints = fetch_checkpoints(&mut audit).await?;
            for c in &checkpoints {
                verifier.add_checkpoint(&format!("server checkpoint at size {}", c.tree_size), &c.note);
            }
            let end = checkpoints.iter().map(|c| c.tree_size).max().unwrap_or(0);
            let bar = progress_bar(end);
            bar.set_message("verifying");
            let mut count = 0u64;
            fetch_entries(&mut audit, end, |data| {
                verifier.push_entry(data, None);
                count += 1;
                if count % PROGRESS_STEP == 0 {
                    bar.set_position(count);
                }
            })
            .await?;
            bar.finish_and_clear();
            live_latest = checkpoints
                .into_iter()
                .max_by_key(|c| c.tree_size)
                .map(|c| (c, audit));
        }
    }
    if let Some(path) = &args.previous_checkpoint {
        let note =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let source = path.display().to_string();
        verifier.check_previous(&source, &note);
        // A witness's question to a live log: prove the new tree extends the old.
        if let (Some((latest, mut audit)), Ok(previous)) = (live_latest, key.open_checkpoint(&note))
            && previous.size > 0
            && previous.size <= latest.tree_size
        {
            let proof = audit
                .get_consistency_proof(proto::GetConsistencyProofRequest {
                    old_size: previous.size,
                    new_size: latest.tree_size,
                })
                .await
                .map_err(describe)?
                .into_inner();
            let hashes: Vec<[u8; 32]> = proof
                .hashes
                .iter()
                .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
                .collect();
            let latest_root = <[u8; 32]>::try_from(latest.root_hash.as_slice()).unwrap_or_default();
            if hashes.len() != proof.hashes.len()
                || merkle::verify_consistency(
                    previous.size,
                    latest.tree_size,
                    &previous.root,
                    &latest_root,
                    &hashes,
                )
                .is_err()
            {
                return Err(format!(
                    "the server's consistency proof from {source} (size {}) to size {} does not verify: refusing the log",
                    previous.size, latest.tree_size
                ));
            }
        }
    }
    let report = verifier.finish();
    print_report(&report, json)?;
    if report.ok() {
        Ok(())
    } else {
        Err(format!(
            "verification failed: {} problem(s)",
            report.failures.len() + report.replay.findings.len()
        ))
    }
}

fn read_export(dir: &Path, verifier: &mut LogVerifier) -> Result<(), String> {
    let bar = progress_bar(verify::export_len(dir));
    bar.set_message("verifying");
    verify::read_export(dir, verifier, |n| {
        if n % PROGRESS_STEP == 0 {
            bar.set_position(n);
        }
    })
    .map_err(|e| format!("reading the export: {e}"))?;
    bar.finish_and_clear();
    Ok(())
}

fn print_report(report: &VerifyReport, json: bool) -> Result<(), String> {
    let value = serde_json::to_value(report).map_err(|e| e.to_string())?;
    let r = &report.replay;
    let mut text = String::new();
    for f in &report.failures {
        match f.entry {
            Some(i) => text.push_str(&format!("FAIL entry {i}: {} ({})\n", f.detail, f.code)),
            None => text.push_str(&format!("FAIL: {} ({})\n", f.detail, f.code)),
        }
    }
    for f in &r.findings {
        text.push_str(&format!("FAIL entry {}: {} ({})\n", f.index, f.detail, f.code));
    }
    if let Some(withheld) = &report.replay_withheld {
        text.push_str(&format!("note: {withheld}\n"));
    }
    text.push_str(&format!(
        "{} entries, {} checkpoints verified{}; replayed {} policy versions, {} withdrawals, {} decisions, {} votes, {} signatures\n",
        report.entries,
        report.checkpoints_verified,
        report
            .latest_checkpoint
            .as_ref()
            .map(|(size, root)| format!(" (latest: size {size}, root {root})"))
            .unwrap_or_default(),
        r.policy_versions,
        r.withdrawals,
        r.decisions,
        r.votes,
        r.signatures,
    ));
    if report.ok() {
        text.push_str(&format!("all {} entries verified\n", report.entries));
    }
    emit(json, &value, &text)
}
