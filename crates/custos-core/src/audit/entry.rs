//! Audit log entries: one per custody event, in a canonical, domain-separated
//! binary encoding that another implementation can reproduce byte for byte
//! (docs/audit-log.md, with test vectors).
//!
//! ```text
//! entry := "custos/audit/v1" || u64(index) || u64(time) || u8(kind) || body
//! ```
//!
//! Integers are big-endian. `str` is a u16 length and UTF-8 bytes, `blob` a
//! u32 length and bytes, `hash` 32 raw bytes, `list(x)` a u16 count followed
//! by that many `x`. Entries carry what a replay needs and nothing secret:
//! public keys, documents, transactions, signed messages and signatures, never
//! a PIN or private key. [`Entry::decode`] accepts only the exact encoding
//! that [`Entry::encode`] produces.

pub use crate::policy::record::WindowUsage;

/// Domain separator at the start of every entry.
pub const ENTRY_DOMAIN: &[u8; 15] = b"custos/audit/v1";

/// Why bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed audit entry: {0}")]
pub struct EntryError(pub &'static str);

/// One custody event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// 0x01: a wallet key was generated in the HSM and registered.
    WalletCreated {
        /// Wallet id.
        wallet_id: String,
        /// CKA_LABEL.
        key_label: String,
        /// CKA_ID.
        key_id: Vec<u8>,
        /// SEC1 compressed public key.
        public_key: Vec<u8>,
        /// Read-back attribute bits: token, private, sensitive, extractable,
        /// always_sensitive, never_extractable (bit 0 first).
        attributes: u8,
    },
    /// 0x02: a policy document was proposed (or set as genesis).
    PolicyProposed {
        /// Policy hash.
        hash: [u8; 32],
        /// Declared version.
        version: u64,
        /// The exact document.
        document: Vec<u8>,
    },
    /// 0x03: an admin signed a proposed policy.
    PolicyApproved {
        /// Policy hash.
        hash: [u8; 32],
        /// The governance message, verbatim.
        message: Vec<u8>,
        /// Its signature.
        signature: Vec<u8>,
    },
    /// 0x04: a policy version became active.
    PolicyActivated {
        /// Policy hash.
        hash: [u8; 32],
        /// Version.
        version: u64,
    },
    /// 0x05: a withdrawal was created.
    WithdrawalCreated {
        /// Withdrawal id.
        withdrawal_id: String,
        /// Request id.
        request_id: String,
        /// Wallet id.
        wallet_id: String,
        /// Initiator.
        initiator: String,
        /// `ethereum` or `bitcoin`.
        chain: String,
        /// The canonical unsigned transaction.
        unsigned_tx: Vec<u8>,
        /// The canonical intent encoding (docs/approval-format.md).
        intent: Vec<u8>,
        /// Its hash.
        intent_hash: [u8; 32],
    },
    /// 0x06: a decision on a withdrawal.
    Decision {
        /// Withdrawal id.
        withdrawal_id: String,
        /// Policy hash decided under (zeros without a policy).
        policy_hash: [u8; 32],
        /// Its version (0 without a policy).
        policy_version: u64,
        /// The resulting state, e.g. `APPROVED`.
        state: String,
        /// Matched rule, or empty.
        rule: String,
        /// Refusal code, or empty.
        reason_code: String,
        /// Refusal in words, or empty.
        reason: String,
        /// Approvers whose approvals counted.
        counted_approvers: Vec<String>,
        /// Limit usage per window.
        usage: Vec<WindowUsage>,
    },
    /// 0x07: a vote, as signed by the approver.
    Vote {
        /// Withdrawal id.
        withdrawal_id: String,
        /// The approval message, verbatim.
        message: Vec<u8>,
        /// Its signature.
        signature: Vec<u8>,
    },
    /// 0x08: the withdrawal was signed.
    Signed {
        /// Withdrawal id.
        withdrawal_id: String,
        /// The broadcastable transaction.
        signed_tx: Vec<u8>,
        /// Its hash or txid.
        tx_hash: Vec<u8>,
    },
    /// 0x09: a state change without a policy decision: EXPIRED or CANCELLED.
    Closed {
        /// Withdrawal id.
        withdrawal_id: String,
        /// `EXPIRED` or `CANCELLED`.
        state: String,
    },
    /// 0x0A: custody frozen.
    Frozen {
        /// The epoch the freeze named.
        epoch: u64,
        /// (message, signature) of the security officer.
        signatures: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// 0x0B: custody unfrozen.
    Unfrozen {
        /// The epoch the unfreeze named.
        epoch: u64,
        /// (message, signature) of each admin.
        signatures: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

/// An entry: an event at a position and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: u64,
    /// Unix seconds when it was committed.
    pub time: u64,
    /// What happened.
    pub event: Event,
}

impl Entry {
    /// The canonical encoding: the Merkle leaf's data.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(256));
        w.0.extend_from_slice(ENTRY_DOMAIN);
        w.u64(self.index);
        w.u64(self.time);
        match &self.event {
            Event::WalletCreated {
                wallet_id,
                key_label,
                key_id,
                public_key,
                attributes,
            } => {
                w.u8(0x01);
                w.str(wallet_id);
                w.str(key_label);
                w.blob(key_id);
                w.blob(public_key);
                w.u8(*attributes);
            }
            Event::PolicyProposed {
                hash,
                version,
                document,
            } => {
                w.u8(0x02);
                w.hash(hash);
                w.u64(*version);
                w.blob(document);
            }
            Event::PolicyApproved {
                hash,
                message,
                signature,
            } => {
                w.u8(0x03);
                w.hash(hash);
                w.blob(message);
                w.blob(signature);
            }
            Event::PolicyActivated { hash, version } => {
                w.u8(0x04);
                w.hash(hash);
                w.u64(*version);
            }
            Event::WithdrawalCreated {
                withdrawal_id,
                request_id,
                wallet_id,
                initiator,
                chain,
                unsigned_tx,
                intent,
                intent_hash,
            } => {
                w.u8(0x05);
                for s in [withdrawal_id, request_id, wallet_id, initiator, chain] {
                    w.str(s);
                }
                w.blob(unsigned_tx);
                w.blob(intent);
                w.hash(intent_hash);
            }
            Event::Decision {
                withdrawal_id,
                policy_hash,
                policy_version,
                state,
                rule,
                reason_code,
                reason,
                counted_approvers,
                usage,
            } => {
                w.u8(0x06);
                w.str(withdrawal_id);
                w.hash(policy_hash);
                w.u64(*policy_version);
                for s in [state, rule, reason_code, reason] {
                    w.str(s);
                }
                w.count(counted_approvers.len());
                for a in counted_approvers {
                    w.str(a);
                }
                w.count(usage.len());
                for u in usage {
                    w.u64(u.seconds);
                    w.str(&u.amount_before);
                    w.u64(u.count_before);
                    w.str(&u.amount_after);
                    w.u64(u.count_after);
                }
            }
            Event::Vote {
                withdrawal_id,
                message,
                signature,
            } => {
                w.u8(0x07);
                w.str(withdrawal_id);
                w.blob(message);
                w.blob(signature);
            }
            Event::Signed {
                withdrawal_id,
                signed_tx,
                tx_hash,
            } => {
                w.u8(0x08);
                w.str(withdrawal_id);
                w.blob(signed_tx);
                w.blob(tx_hash);
            }
            Event::Closed { withdrawal_id, state } => {
                w.u8(0x09);
                w.str(withdrawal_id);
                w.str(state);
            }
            Event::Frozen { epoch, signatures } | Event::Unfrozen { epoch, signatures } => {
                w.u8(if matches!(self.event, Event::Frozen { .. }) {
                    0x0A
                } else {
                    0x0B
                });
                w.u64(*epoch);
                w.count(signatures.len());
                for (message, signature) in signatures {
                    w.blob(message);
                    w.blob(signature);
                }
            }
        }
        w.0
    }

    /// Parses an entry; anything but the exact canonical encoding is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let mut r = Reader(
            bytes
                .strip_prefix(ENTRY_DOMAIN.as_slice())
                .ok_or(EntryError("missing the custos/audit/v1 domain separator"))?,
        );
        let index = r.u64()?;
        let time = r.u64()?;
        let event = match r.u8()? {
            0x01 => Event::WalletCreated {
                wallet_id: r.str()?,
                key_label: r.str()?,
                key_id: r.blob()?,
                public_key: r.blob()?,
                attributes: r.u8()?,
            },
            0x02 => Event::PolicyProposed {
                hash: r.hash()?,
                version: r.u64()?,
                document: r.blob()?,
            },
            0x03 => Event::PolicyApproved {
                hash: r.hash()?,
                message: r.blob()?,
                signature: r.blob()?,
            },
            0x04 => Event::PolicyActivated {
                hash: r.hash()?,
                version: r.u64()?,
            },
            0x05 => Event::WithdrawalCreated {
                withdrawal_id: r.str()?,
                request_id: r.str()?,
                wallet_id: r.str()?,
                initiator: r.str()?,
                chain: r.str()?,
                unsigned_tx: r.blob()?,
                intent: r.blob()?,
                intent_hash: r.hash()?,
            },
            0x06 => {
                let withdrawal_id = r.str()?;
                let policy_hash = r.hash()?;
                let policy_version = r.u64()?;
                let (state, rule, reason_code, reason) = (r.str()?, r.str()?, r.str()?, r.str()?);
                let counted_approvers = (0..r.count()?).map(|_| r.str()).collect::<Result<_, _>>()?;
                let usage = (0..r.count()?)
                    .map(|_| {
                        Ok(WindowUsage {
                            seconds: r.u64()?,
                            amount_before: r.str()?,
                            count_before: r.u64()?,
                            amount_after: r.str()?,
                            count_after: r.u64()?,
                        })
                    })
                    .collect::<Result<_, EntryError>>()?;
                Event::Decision {
                    withdrawal_id,
                    policy_hash,
                    policy_version,
                    state,
                    rule,
                    reason_code,
                    reason,
                    counted_approvers,
                    usage,
                }
            }
            0x07 => Event::Vote {
                withdrawal_id: r.str()?,
                message: r.blob()?,
                signature: r.blob()?,
            },
            0x08 => Event::Signed {
                withdrawal_id: r.str()?,
                signed_tx: r.blob()?,
                tx_hash: r.blob()?,
            },
            0x09 => Event::Closed {
                withdrawal_id: r.str()?,
                state: r.str()?,
            },
            kind @ (0x0A | 0x0B) => {
                let epoch = r.u64()?;
                let signatures = (0..r.count()?)
                    .map(|_| Ok((r.blob()?, r.blob()?)))
                    .collect::<Result<_, EntryError>>()?;
                if kind == 0x0A {
                    Event::Frozen { epoch, signatures }
                } else {
                    Event::Unfrozen { epoch, signatures }
                }
            }
            _ => return Err(EntryError("unknown event kind")),
        };
        if !r.0.is_empty() {
            return Err(EntryError("trailing bytes"));
        }
        Ok(Self { index, time, event })
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn hash(&mut self, v: &[u8; 32]) {
        self.0.extend_from_slice(v);
    }

    // Fields are bounded far below these widths by the request limits
    // (1 MiB requests, 256 KiB policies, 128-byte ids); saturating keeps
    // encoding total, and such an entry would fail to decode, never alias.
    fn count(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
    }

    fn str(&mut self, s: &str) {
        self.count(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn blob(&mut self, b: &[u8]) {
        self.0
            .extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EntryError> {
        if self.0.len() < n {
            return Err(EntryError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, EntryError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, EntryError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn hash(&mut self) -> Result<[u8; 32], EntryError> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32)?);
        Ok(b)
    }

    fn count(&mut self) -> Result<usize, EntryError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn str(&mut self) -> Result<String, EntryError> {
        let n = self.count()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EntryError("a string is not UTF-8"))
    }

    fn blob(&mut self) -> Result<Vec<u8>, EntryError> {
        let b = self.take(4)?;
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let n = usize::try_from(n).map_err(|_| EntryError("blob too long"))?;
        Ok(self.take(n)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    pub(crate) fn samples() -> Vec<Entry> {
        let events = vec![
            Event::WalletCreated {
                wallet_id: "hot".into(),
                key_label: "custos-wallet-hot-0a0b0c0d".into(),
                key_id: vec![0x0a; 16],
                public_key: vec![0x02; 33],
                attributes: 0b11_0111,
            },
            Event::PolicyProposed {
                hash: [0x22; 32],
                version: 2,
                document: b"version = 2\n".to_vec(),
            },
            Event::PolicyApproved {
                hash: [0x22; 32],
                message: vec![1, 2, 3],
                signature: vec![4; 64],
            },
            Event::PolicyActivated {
                hash: [0x22; 32],
                version: 2,
            },
            Event::WithdrawalCreated {
                withdrawal_id: "wd_00".into(),
                request_id: "r-1".into(),
                wallet_id: "hot".into(),
                initiator: "ops".into(),
                chain: "ethereum".into(),
                unsigned_tx: vec![0x02, 0xc0],
                intent: vec![9; 40],
                intent_hash: [0x11; 32],
            },
            Event::Decision {
                withdrawal_id: "wd_00".into(),
                policy_hash: [0x22; 32],
                policy_version: 2,
                state: "APPROVED".into(),
                rule: "auto-small".into(),
                reason_code: String::new(),
                reason: String::new(),
                counted_approvers: vec!["alice".into(), "bob".into()],
                usage: vec![WindowUsage {
                    seconds: 3600,
                    amount_before: "5".into(),
                    count_before: 1,
                    amount_after: "10".into(),
                    count_after: 2,
                }],
            },
            Event::Vote {
                withdrawal_id: "wd_00".into(),
                message: vec![7; 100],
                signature: vec![8; 64],
            },
            Event::Signed {
                withdrawal_id: "wd_00".into(),
                signed_tx: vec![0x02, 0xf8],
                tx_hash: vec![0x33; 32],
            },
            Event::Closed {
                withdrawal_id: "wd_01".into(),
                state: "EXPIRED".into(),
            },
            Event::Frozen {
                epoch: 0,
                signatures: vec![(vec![1], vec![2; 64])],
            },
            Event::Unfrozen {
                epoch: 1,
                signatures: vec![(vec![1], vec![2; 64]), (vec![3], vec![4; 64])],
            },
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Entry {
                index: i as u64,
                time: 1_800_000_000 + i as u64,
                event,
            })
            .collect()
    }

    #[test]
    fn every_event_round_trips_and_rejects_trailing_bytes() {
        for entry in samples() {
            let bytes = entry.encode();
            assert_eq!(Entry::decode(&bytes).unwrap(), entry);
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Entry::decode(&longer).is_err());
            assert!(Entry::decode(&bytes[..bytes.len() - 1]).is_err());
        }
    }

    /// docs/audit-log.md publishes the encoding and leaf hash of the `closed`
    /// sample and the root over all eleven samples.
    #[test]
    fn published_audit_vectors() {
        use crate::audit::merkle::{MemoryNodes, leaf_hash, root};
        let samples = samples();
        let closed = &samples[8];
        let mut tree = MemoryNodes::new();
        for e in &samples {
            tree.append(leaf_hash(&e.encode()));
        }
        let values = [
            hex::encode(closed.encode()),
            hex::encode(leaf_hash(&closed.encode())),
            hex::encode(root(&tree, samples.len() as u64).unwrap()),
        ];
        let spec: String = include_str!("../../../../docs/audit-log.md")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let missing: Vec<&String> = values.iter().filter(|v| !spec.contains(v.as_str())).collect();
        assert!(
            missing.is_empty(),
            "docs/audit-log.md lacks audit vectors; they are:\n{}",
            values.join("\n")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_what_decodes_is_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            kind in 1u8..12,
        ) {
            let mut input = ENTRY_DOMAIN.to_vec();
            input.extend_from_slice(&[0; 16]);
            input.push(kind);
            input.extend_from_slice(&bytes);
            if let Ok(entry) = Entry::decode(&input) {
                prop_assert_eq!(entry.encode(), input);
            }
        }
    }
}
