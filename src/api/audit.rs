//! `custos.v1.AuditService`: the audit log, its checkpoints and proofs,
//! read-only. Proofs come from the stored complete subtrees, so each costs
//! O(log n) reads whatever the log's size; entries stream in bounded pages.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::withdrawal::timestamp;
use super::{FieldViolation, reason, status};
use crate::checkpoints::{Checkpointer, attribute_names};
use crate::proto::{self, audit_service_server::AuditService};
use crate::store::audit::{self as log, SqlNodes, StoredCheckpoint};
use crate::store::{Store, StoreError};
use custos_core::audit::merkle::{self, MerkleError};

/// Entries read from the store per page of a ListEntries stream.
const ENTRY_PAGE: u64 = 512;

/// The AuditService implementation.
#[derive(Debug, Clone)]
pub struct AuditApi {
    store: Arc<Store>,
    checkpointer: Arc<Checkpointer>,
}

impl AuditApi {
    /// Serves the log in `store`, signed by `checkpointer`'s key.
    pub fn new(store: Arc<Store>, checkpointer: Arc<Checkpointer>) -> Self {
        Self { store, checkpointer }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(crate::store::sql::Conn<'_>) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|_| unavailable(&"worker task failed"))?
            .map_err(ReadError::into_status)
    }
}

/// A read that failed: the request's fault, or the store's.
enum ReadError {
    Field(FieldViolation),
    Store(StoreError),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

impl ReadError {
    fn into_status(self) -> Status {
        match self {
            ReadError::Field(v) => v.into(),
            ReadError::Store(e) => unavailable(&e),
        }
    }
}

fn unavailable(error: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %error, "audit log read failed");
    status(
        Code::Unavailable,
        reason::INTERNAL,
        "the audit log is unavailable; see the server log",
    )
}

/// Maps a proof failure: sizes the log does not have are the caller's fault.
fn proof_error(e: MerkleError<StoreError>, field: &str, size: u64) -> ReadError {
    match e {
        MerkleError::Store(e) => ReadError::Store(e),
        MerkleError::MissingNode { .. } => {
            ReadError::Field(FieldViolation::new(field, format!("exceeds the log size {size}")))
        }
        other => ReadError::Field(FieldViolation::new(field, other.to_string())),
    }
}

impl AuditApi {
    /// Runs a proof over the stored tree once `tree` (field, size) is within
    /// the log; other failures name `other_field`.
    async fn proof(
        &self,
        tree: (&'static str, u64),
        other_field: &'static str,
        prove: impl FnOnce(&SqlNodes<'_>) -> Result<Vec<[u8; 32]>, MerkleError<StoreError>> + Send + 'static,
    ) -> Result<Vec<Vec<u8>>, Status> {
        let hashes = self
            .read(move |conn| {
                let size = log::size(conn)?;
                if tree.1 > size {
                    let violation = FieldViolation::new(tree.0, format!("exceeds the log size {size}"));
                    return Err(ReadError::Field(violation));
                }
                prove(&SqlNodes(conn)).map_err(|e| proof_error(e, other_field, size))
            })
            .await?;
        Ok(hashes.into_iter().map(|h| h.to_vec()).collect())
    }
}

fn checkpoint_message(c: StoredCheckpoint) -> proto::SignedCheckpoint {
    proto::SignedCheckpoint {
        tree_size: c.size,
        root_hash: c.root.to_vec(),
        note: c.note,
        sign_time: timestamp(c.signed_at),
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<proto::LogEntry, Status>> + Send>>;
type CheckpointStream = Pin<Box<dyn Stream<Item = Result<proto::SignedCheckpoint, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn get_log_key(
        &self,
        _: Request<proto::GetLogKeyRequest>,
    ) -> Result<Response<proto::LogKey>, Status> {
        let key = self.checkpointer.key();
        Ok(Response::new(proto::LogKey {
            algorithm: key.kind.name().to_owned(),
            public_key: key.public_key.clone(),
            origin: key.origin.clone(),
            verifier_key: self.checkpointer.verifier().encode(),
            key_label: key.key_label.clone(),
            attributes: attribute_names(&key.attributes)
                .into_iter()
                .map(|(name, value)| proto::KeyAttribute {
                    name: name.to_owned(),
                    value,
                })
                .collect(),
            create_time: timestamp(key.created_at),
        }))
    }

    async fn get_checkpoint(
        &self,
        request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::SignedCheckpoint>, Status> {
        let size = Some(request.into_inner().tree_size).filter(|s| *s > 0);
        let found = self
            .read(move |conn| Ok(log::checkpoint(conn, size)?))
            .await?
            .ok_or_else(|| {
                let what = size.map_or("no checkpoint has been signed yet".to_owned(), |s| {
                    format!("no checkpoint at tree size {s}")
                });
                status(Code::NotFound, reason::NOT_FOUND, what)
            })?;
        Ok(Response::new(checkpoint_message(found)))
    }

    type ListCheckpointsStream = CheckpointStream;

    async fn list_checkpoints(
        &self,
        _: Request<proto::ListCheckpointsRequest>,
    ) -> Result<Response<CheckpointStream>, Status> {
        let all = self.read(|conn| Ok(log::checkpoints(conn)?)).await?;
        let stream = tokio_stream::iter(all.into_iter().map(|c| Ok(checkpoint_message(c))));
        Ok(Response::new(Box::pin(stream)))
    }

    type ListEntriesStream = EntryStream;

    async fn list_entries(
        &self,
        request: Request<proto::ListEntriesRequest>,
    ) -> Result<Response<EntryStream>, Status> {
        let request = request.into_inner();
        let size = self.read(|conn| Ok(log::size(conn)?)).await?;
        let end = if request.end == 0 { size } else { request.end };
        if end > size {
            return Err(FieldViolation::new("end", format!("exceeds the log size {size}")).into());
        }
        if request.start > end {
            return Err(FieldViolation::new("start", "is after end").into());
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let api = self.clone();
        tokio::spawn(async move {
            let mut next = request.start;
            while next < end {
                let page_end = end.min(next + ENTRY_PAGE);
                let page = api
                    .read(move |conn| Ok(log::entries(conn, next, page_end)?))
                    .await;
                let entries = match page {
                    Ok(entries) => entries,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                for (offset, data) in entries.into_iter().enumerate() {
                    let entry = proto::LogEntry {
                        index: next + offset as u64,
                        data,
                    };
                    if sender.send(Ok(entry)).await.is_err() {
                        return; // the client went away
                    }
                }
                next = page_end;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<proto::GetInclusionProofRequest>,
    ) -> Result<Response<proto::InclusionProof>, Status> {
        let proto::GetInclusionProofRequest { index, tree_size } = request.into_inner();
        let hashes = self
            .proof(("tree_size", tree_size), "index", move |nodes| {
                merkle::inclusion_proof(nodes, index, tree_size)
            })
            .await?;
        Ok(Response::new(proto::InclusionProof {
            index,
            tree_size,
            hashes,
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::GetConsistencyProofRequest>,
    ) -> Result<Response<proto::ConsistencyProof>, Status> {
        let proto::GetConsistencyProofRequest { old_size, new_size } = request.into_inner();
        let hashes = self
            .proof(("new_size", new_size), "old_size", move |nodes| {
                merkle::consistency_proof(nodes, old_size, new_size)
            })
            .await?;
        Ok(Response::new(proto::ConsistencyProof {
            old_size,
            new_size,
            hashes,
        }))
    }
}
