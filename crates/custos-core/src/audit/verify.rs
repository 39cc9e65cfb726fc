//! Offline verification of an audit log: the export format and the
//! verifier behind `custos audit verify`.
//!
//! An export is a directory (docs/audit-log.md, "Export format"):
//!
//! ```text
//! entries                  u32 big-endian length || entry, for every entry in order
//! leaves                   the 32-byte RFC 6962 leaf hash of every entry, in order
//! checkpoints/<size>.note  every signed checkpoint, verbatim
//! ```
//!
//! [`LogVerifier`] trusts only the pinned note verifier key. Every checkpoint
//! must verify under it; every entry must decode strictly and sit at the
//! index it names; the tree recomputed from the entries must have each
//! checkpoint's root at its size; every checkpoint must be consistent with
//! the ones before (and with a previous checkpoint the auditor kept); and
//! the replay must find every decision justified. The `leaves` file is not
//! trusted either: when it hashes to a signed root, it pins down exactly
//! which entry was altered.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::audit::entry::Entry;
use crate::audit::merkle::{self, MemoryNodes};
use crate::audit::note::{Checkpoint, NoteVerifier};
use crate::audit::replay::{ReplayReport, Replayer};

/// The largest entry the verifier accepts (the service's message limit).
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;

/// One problem found, at an entry when it can be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The entry index, when the problem is in one entry.
    pub entry: Option<u64>,
    /// A stable short code, e.g. `leaf_mismatch`.
    pub code: &'static str,
    /// What is wrong, in words.
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints_verified: u64,
    /// The latest verified checkpoint's size and root (hex).
    pub latest_checkpoint: Option<(u64, String)>,
    /// What the replay counted and found. Its findings are dropped when the
    /// log itself failed (see `replay_withheld`): a log that does not match
    /// its signed checkpoints proves nothing about the history, and its
    /// replay findings would only echo the damage.
    pub replay: ReplayReport,
    /// Why the replay's findings were withheld, if they were.
    pub replay_withheld: Option<String>,
    /// Every failure, in the order found.
    pub failures: Vec<Failure>,
}

impl VerifyReport {
    /// Whether everything verified.
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.replay.findings.is_empty()
    }
}

/// Streams a log through the checks; see the module docs.
pub struct LogVerifier {
    key: NoteVerifier,
    checkpoints: Vec<(String, Checkpoint)>,
    tree: MemoryNodes,
    /// Leaf hashes from the export's `leaves` file, when given.
    exported_leaves: MemoryNodes,
    first_leaf_mismatch: Option<u64>,
    replayer: Replayer,
    /// Decoded entries waiting for the replay, which checks a batch's
    /// signatures on all cores at once.
    batch: Vec<Entry>,
    failures: Vec<Failure>,
    entries: u64,
}

/// Entries handed to the replay at a time.
const REPLAY_BATCH: usize = 4096;

impl std::fmt::Debug for LogVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogVerifier")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl LogVerifier {
    /// A verifier trusting `key` only. With `service_id`, votes and
    /// governance messages must name that deployment; without it, the replay
    /// learns the id from the first signed message.
    pub fn new(key: NoteVerifier, service_id: Option<&str>) -> Self {
        Self {
            key,
            checkpoints: Vec::new(),
            tree: MemoryNodes::new(),
            exported_leaves: MemoryNodes::new(),
            first_leaf_mismatch: None,
            replayer: service_id.map_or_else(Replayer::new, Replayer::for_service),
            batch: Vec::with_capacity(REPLAY_BATCH),
            failures: Vec::new(),
            entries: 0,
        }
    }

    fn fail(&mut self, entry: Option<u64>, code: &'static str, detail: String) {
        self.failures.push(Failure { entry, code, detail });
    }

    /// Adds a signed checkpoint from `source` (a file name or "server").
    /// Checkpoints may come in any order.
    pub fn add_checkpoint(&mut self, source: &str, note: &str) {
        match self.key.open_checkpoint(note) {
            Ok(checkpoint) => {
                if let Some((other, _)) = self
                    .checkpoints
                    .iter()
                    .find(|(_, c)| c.size == checkpoint.size && c.root != checkpoint.root)
                {
                    let detail = format!(
                        "fork: {source} and {other} both sign tree size {} with different roots",
                        checkpoint.size
                    );
                    self.fail(None, "fork", detail);
                }
                self.checkpoints.push((source.to_owned(), checkpoint));
            }
            Err(e) => self.fail(None, "checkpoint_signature", format!("{source}: {e}")),
        }
    }

    /// Feeds the next entry, with the leaf hash the export recorded for it.
    pub fn push_entry(&mut self, bytes: &[u8], exported_leaf: Option<[u8; 32]>) {
        let position = self.entries;
        self.entries += 1;
        let leaf = merkle::leaf_hash(bytes);
        self.tree.append(leaf);
        if let Some(exported) = exported_leaf {
            self.exported_leaves.append(exported);
            if exported != leaf && self.first_leaf_mismatch.is_none() {
                self.first_leaf_mismatch = Some(position);
            }
        }
        match Entry::decode(bytes) {
            Ok(entry) if entry.index == position => {
                self.batch.push(entry);
                if self.batch.len() == REPLAY_BATCH {
                    self.replayer.push_all(&self.batch);
                    self.batch.clear();
                }
            }
            Ok(entry) => self.fail(
                Some(position),
                "index_mismatch",
                format!(
                    "entry at position {position} names index {}: entries were deleted, duplicated or reordered",
                    entry.index
                ),
            ),
            Err(e) => self.fail(Some(position), "malformed_entry", e.to_string()),
        }
    }

    /// Records that the entry stream broke at the next position.
    pub fn push_framing_error(&mut self, detail: String) {
        let position = self.entries;
        self.fail(Some(position), "framing", detail);
    }

    /// Checks a checkpoint the auditor kept from before: it must verify, the
    /// log must not have shrunk below it, and it must be a prefix of the log
    /// now (no fork). Call after every entry and checkpoint was added.
    pub fn check_previous(&mut self, source: &str, note: &str) {
        let previous = match self.key.open_checkpoint(note) {
            Ok(c) => c,
            Err(e) => return self.fail(None, "previous_checkpoint", format!("{source}: {e}")),
        };
        let Some(latest) = self.latest().cloned() else {
            return self.fail(
                None,
                "previous_checkpoint",
                "the log has no verified checkpoint".into(),
            );
        };
        if previous.size > latest.size {
            return self.fail(
                None,
                "rollback",
                format!(
                    "{source} signs {} entries but the latest checkpoint only {}: the log was rolled back",
                    previous.size, latest.size
                ),
            );
        }
        if let Some((other, _)) = self
            .checkpoints
            .iter()
            .find(|(_, c)| c.size == previous.size && c.root != previous.root)
        {
            let detail = format!(
                "fork: {source} and {other} both sign tree size {} with different roots",
                previous.size
            );
            return self.fail(None, "fork", detail);
        }
        if previous.size > self.tree.size() {
            return; // reported as truncation in `finish`
        }
        // The proof a live verifier would ask for, computed from the entries.
        let consistent = merkle::consistency_proof(&self.tree, previous.size, latest.size)
            .ok()
            .is_some_and(|proof| {
                merkle::verify_consistency(previous.size, latest.size, &previous.root, &latest.root, &proof)
                    .is_ok()
            });
        if !consistent {
            self.fail(
                None,
                "fork",
                format!(
                    "{source} (size {}) is not consistent with the latest checkpoint (size {}): the log forked",
                    previous.size, latest.size
                ),
            );
        }
    }

    fn latest(&self) -> Option<&Checkpoint> {
        self.checkpoints.iter().map(|(_, c)| c).max_by_key(|c| c.size)
    }

    /// Runs the tree checks against every checkpoint and ends the replay.
    pub fn finish(mut self) -> VerifyReport {
        self.replayer.push_all(&self.batch);
        let mut checkpoints = std::mem::take(&mut self.checkpoints);
        checkpoints.sort_by_key(|(_, c)| c.size);
        let size = self.tree.size();
        if checkpoints.is_empty() {
            self.fail(
                None,
                "no_checkpoint",
                "no checkpoint verified under the pinned key".into(),
            );
        }
        let mut previous: Option<&Checkpoint> = None;
        for (source, checkpoint) in &checkpoints {
            if checkpoint.size > size {
                let detail = format!(
                    "{source} signs {} entries but the log has {size}: entries {size}.. are missing (truncated)",
                    checkpoint.size
                );
                self.fail(Some(size), "truncated", detail);
                continue;
            }
            let root = merkle::root(&self.tree, checkpoint.size).ok();
            if root != Some(checkpoint.root) {
                let (entry, detail) = self.locate(checkpoint, source);
                self.fail(entry, "root_mismatch", detail);
            } else if let Some(old) = previous {
                let proof =
                    merkle::consistency_proof(&self.tree, old.size, checkpoint.size).unwrap_or_default();
                if merkle::verify_consistency(old.size, checkpoint.size, &old.root, &checkpoint.root, &proof)
                    .is_err()
                {
                    self.fail(
                        None,
                        "inconsistent",
                        format!("{source} is not consistent with size {}", old.size),
                    );
                }
            }
            if root == Some(checkpoint.root) {
                previous = Some(checkpoint);
            }
        }
        let placed_by_root = self.failures.iter().any(|f| f.code == "root_mismatch");
        if let Some(i) = self.first_leaf_mismatch
            && !placed_by_root
        {
            let detail = format!(
                "the leaves file's hash for entry {i} differs from the entry's own hash, while the entries match every checkpoint: the leaves file was altered"
            );
            self.fail(Some(i), "leaf_file_mismatch", detail);
        }
        if let Some(latest) = checkpoints.last().map(|(_, c)| c)
            && latest.size < size
        {
            let detail = format!(
                "entries {}..{size} are not covered by any verified checkpoint",
                latest.size
            );
            self.fail(Some(latest.size), "uncovered", detail);
        }
        let latest = checkpoints.last().map(|(_, c)| (c.size, hex::encode(c.root)));
        let mut replay = self.replayer.finish();
        let replay_withheld = (!self.failures.is_empty() && !replay.findings.is_empty()).then(|| {
            let withheld = std::mem::take(&mut replay.findings);
            format!(
                "{} replay finding(s) withheld: the log failed its integrity checks, so the replay would only echo the damage",
                withheld.len()
            )
        });
        VerifyReport {
            entries: self.entries,
            checkpoints_verified: checkpoints.len() as u64,
            latest_checkpoint: latest,
            replay,
            replay_withheld,
            failures: self.failures,
        }
    }

    /// Places a root mismatch: at the first entry whose leaf differs from an
    /// exported leaf list that itself hashes to the signed root.
    fn locate(&self, checkpoint: &Checkpoint, source: &str) -> (Option<u64>, String) {
        let exported_is_signed = self.exported_leaves.size() >= checkpoint.size
            && merkle::root(&self.exported_leaves, checkpoint.size).ok() == Some(checkpoint.root);
        match self.first_leaf_mismatch {
            Some(i) if exported_is_signed && i < checkpoint.size => (
                Some(i),
                format!("entry {i} was altered: its hash differs from the leaf that {source} signs"),
            ),
            _ => (
                None,
                format!(
                    "the entries before {} do not hash to the root {source} signs (the leaves file cannot place the change)",
                    checkpoint.size
                ),
            ),
        }
    }
}

/// Reads `u32 length || entry` frames, feeding each to `verifier`; a broken
/// frame is reported at its position and ends the stream.
pub fn read_entries(
    entries: impl Read,
    mut leaves: Option<impl Read>,
    verifier: &mut LogVerifier,
    mut progress: impl FnMut(u64),
) -> std::io::Result<()> {
    let mut entries = std::io::BufReader::with_capacity(1 << 20, entries);
    let mut frame = Vec::new();
    loop {
        let mut length = [0u8; 4];
        match read_full(&mut entries, &mut length)? {
            0 => return Ok(()),
            4 => {}
            n => {
                verifier.push_framing_error(format!("the file ends inside a length prefix ({n} of 4 bytes)"));
                return Ok(());
            }
        }
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_ENTRY_BYTES {
            verifier.push_framing_error(format!(
                "length prefix {length} exceeds the {MAX_ENTRY_BYTES}-byte limit"
            ));
            return Ok(());
        }
        frame.resize(length, 0);
        let got = read_full(&mut entries, &mut frame)?;
        if got != length {
            verifier.push_framing_error(format!("the file ends inside an entry ({got} of {length} bytes)"));
            return Ok(());
        }
        let exported_leaf = match leaves.as_mut() {
            Some(leaves) => {
                let mut leaf = [0u8; 32];
                (read_full(leaves, &mut leaf)? == 32).then_some(leaf)
            }
            None => None,
        };
        verifier.push_entry(&frame, exported_leaf);
        progress(verifier.entries);
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes an export directory as entries arrive, without holding the log
/// in memory.
#[derive(Debug)]
pub struct ExportWriter {
    dir: PathBuf,
    entries: BufWriter<File>,
    leaves: BufWriter<File>,
    frame: Vec<u8>,
}

impl ExportWriter {
    /// Creates `dir` (and `dir/checkpoints`) with empty entry files.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let checkpoints = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints).map_err(|e| at(&checkpoints, e))?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path).map(BufWriter::new).map_err(|e| at(&path, e))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            entries: open("entries")?,
            leaves: open("leaves")?,
            frame: Vec::new(),
        })
    }

    /// Appends the next entry and its leaf hash.
    pub fn entry(&mut self, entry: &[u8]) -> std::io::Result<()> {
        self.frame.clear();
        write_frame(&mut self.frame, entry);
        self.entries.write_all(&self.frame)?;
        self.leaves.write_all(&merkle::leaf_hash(entry))
    }

    /// Writes the signed checkpoint at `size`, verbatim.
    pub fn checkpoint(&self, size: u64, note: &str) -> std::io::Result<()> {
        let path = self.dir.join("checkpoints").join(checkpoint_file_name(size));
        std::fs::write(&path, note).map_err(|e| at(&path, e))
    }

    /// Flushes the entry files.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.entries.flush()?;
        self.leaves.flush()
    }
}

/// Feeds the export in `dir` to `verifier`: every checkpoint note, then the
/// entries with the leaf hashes the export recorded. `progress` is told how
/// many entries were read so far.
pub fn read_export(dir: &Path, verifier: &mut LogVerifier, progress: impl FnMut(u64)) -> std::io::Result<()> {
    let checkpoint_dir = dir.join("checkpoints");
    let mut notes: Vec<PathBuf> = std::fs::read_dir(&checkpoint_dir)
        .map_err(|e| at(&checkpoint_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    notes.sort();
    for path in &notes {
        let note = std::fs::read(path).map_err(|e| at(path, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Not UTF-8 is not a note; the control character makes it refused.
        verifier.add_checkpoint(&name, &String::from_utf8(note).unwrap_or_else(|_| "\u{0}".into()));
    }
    let entries_path = dir.join("entries");
    let entries = File::open(&entries_path).map_err(|e| at(&entries_path, e))?;
    let leaves = File::open(dir.join("leaves")).ok();
    read_entries(entries, leaves, verifier, progress).map_err(|e| at(&entries_path, e))
}

/// How many entries an export holds, from its leaves file (for a progress
/// total; 0 when it has none).
pub fn export_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("leaves")).map_or(0, |m| m.len() / 32)
}

fn at(path: &Path, error: std::io::Error) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// Appends one entry frame to `out`.
pub fn write_frame(out: &mut Vec<u8>, entry: &[u8]) {
    // Entries are far below 4 GiB: the service caps messages at a few MiB.
    out.extend_from_slice(&(entry.len() as u32).to_be_bytes());
    out.extend_from_slice(entry);
}

/// The file name of the checkpoint at `size` in an export.
pub fn checkpoint_file_name(size: u64) -> String {
    format!("{size:020}.note")
}
