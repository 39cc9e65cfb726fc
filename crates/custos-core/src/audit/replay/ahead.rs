//! Signature checks done ahead: [`Replayer::push_all`] runs a batch's vote
//! verifications and Ethereum key recoveries on every core before replaying
//! the batch in order; each result is used only for the same entry, key,
//! prehash and signature.

use super::*;

impl Replayer {
    pub(super) fn check_ahead(&self, entries: &[Entry]) -> Ahead {
        let roster = self.active.as_ref().map(|a| &a.policy);
        let jobs: Vec<Job<'_>> = entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Vote {
                    message, signature, ..
                } => {
                    let m = ApprovalMessage::parse(message).ok()?;
                    let PublicKey::Secp256k1(key) = &roster?.approver(&m.approver)?.key;
                    Some(Job::Vote(e.index, Box::new(m), signature, *key))
                }
                Event::Signed { signed_tx, .. } => Some(Job::Recover(e.index, signed_tx)),
                _ => None,
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let mut ahead = Ahead::default();
        if threads < 2 || jobs.len() < 2 * threads {
            return ahead;
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks(jobs.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || chunk.iter().map(Job::run).collect::<Vec<_>>()))
                .collect();
            for worker in workers {
                // A worker that failed only leaves its checks to `push`.
                for done in worker.join().into_iter().flatten() {
                    match done {
                        Done::Vote(index, key, result) => {
                            ahead.votes.insert(index, (key, result));
                        }
                        Done::Recover(index, recovered) => {
                            ahead.recovered.insert(index, recovered);
                        }
                        Done::Nothing => {}
                    }
                }
            }
        });
        ahead
    }
}

/// Signature checks done ahead for one batch, by entry index.
#[derive(Debug, Default)]
pub(super) struct Ahead {
    /// A vote's signature checked under this key.
    pub(super) votes: HashMap<u64, (VerifyingKey, Result<(), ApprovalError>)>,
    /// The key an Ethereum signature recovers to.
    pub(super) recovered: HashMap<u64, Recovered>,
}

/// The key `signature` with `recovery_id` recovers to over `prehash`.
#[derive(Debug)]
pub(super) struct Recovered {
    pub(super) prehash: [u8; 32],
    pub(super) signature: Signature,
    pub(super) recovery_id: RecoveryId,
    pub(super) key: Option<VerifyingKey>,
}

pub(super) enum Job<'a> {
    Vote(u64, Box<ApprovalMessage>, &'a [u8], VerifyingKey),
    Recover(u64, &'a [u8]),
}

pub(super) enum Done {
    Vote(u64, VerifyingKey, Result<(), ApprovalError>),
    Recover(u64, Recovered),
    Nothing,
}

impl Job<'_> {
    pub(super) fn run(&self) -> Done {
        match self {
            Job::Vote(index, m, signature, key) => Done::Vote(*index, *key, m.verify(signature, key)),
            Job::Recover(index, signed_tx) => {
                let Ok(decoded) = ethereum::decode_signed(signed_tx) else {
                    return Done::Nothing;
                };
                let key = VerifyingKey::recover_from_prehash(
                    decoded.signing_hash.as_slice(),
                    &decoded.signature,
                    decoded.recovery_id,
                )
                .ok();
                Done::Recover(
                    *index,
                    Recovered {
                        prehash: decoded.signing_hash.0,
                        signature: decoded.signature,
                        recovery_id: decoded.recovery_id,
                        key,
                    },
                )
            }
        }
    }
}
