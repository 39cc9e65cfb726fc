//! Replaying withdrawals: the wallets they spend from, their creation (the
//! intent recomputed from the transaction), votes (admitted by
//! [`crate::vote::admit`]), decisions (evaluated again), signatures
//! (verified against the wallet key) and their closing.

use super::*;
use crate::lifecycle::Event as LifecycleEvent;

impl Replayer {
    // Wallets and governance.

    pub(super) fn wallet_created(
        &mut self,
        index: u64,
        wallet_id: &str,
        key_label: &str,
        public_key: &[u8],
        attributes: u8,
    ) {
        // Read back from the HSM: token, private, sensitive, not extractable,
        // always sensitive, never extractable (bits 0 to 5).
        const REQUIRED_ATTRIBUTES: u8 = 0b11_0111;
        if self.wallets.contains_key(wallet_id) {
            return self.flag(
                index,
                code::WALLET_INVALID,
                format!("wallet {wallet_id} was already created"),
            );
        }
        if attributes & 0b11_1111 != REQUIRED_ATTRIBUTES {
            self.flag(
                index,
                code::WALLET_INVALID,
                format!(
                    "wallet {wallet_id}'s key attributes read back as {attributes:#08b}; the engine refuses any key but {REQUIRED_ATTRIBUTES:#08b}"
                ),
            );
        }
        match VerifyingKey::from_sec1_bytes(public_key) {
            Ok(public) => {
                self.wallets.insert(
                    wallet_id.to_owned(),
                    WalletKey {
                        key_label: key_label.to_owned(),
                        public,
                    },
                );
            }
            Err(_) => self.flag(
                index,
                code::WALLET_INVALID,
                format!("wallet {wallet_id}'s public key is not a secp256k1 SEC1 point"),
            ),
        }
    }

    // Withdrawals.

    pub(super) fn withdrawal_created(&mut self, index: u64, c: Created<'_>) {
        self.report.withdrawals += 1;
        let duplicate =
            self.open.contains_key(c.withdrawal_id) || self.finished.contains_key(c.withdrawal_id);
        if duplicate {
            self.flag(
                index,
                code::WITHDRAWAL_INVALID,
                format!("withdrawal id {} was already used", c.withdrawal_id),
            );
            self.expect = Some(Expect::Decision {
                index,
                withdrawal_id: c.withdrawal_id.to_owned(),
                trigger: Trigger::Ignored,
            });
            return;
        }
        self.expect = Some(Expect::Decision {
            index,
            withdrawal_id: c.withdrawal_id.to_owned(),
            trigger: Trigger::Created,
        });
        if !self.request_ids.insert(c.request_id.to_owned()) {
            self.flag(
                index,
                code::WITHDRAWAL_INVALID,
                format!("request id {} already made another withdrawal", c.request_id),
            );
        }
        let (key_label, parsed) = match self.wallets.get(c.wallet_id) {
            None => {
                self.flag(
                    index,
                    code::WITHDRAWAL_INVALID,
                    format!("wallet {} was never created", c.wallet_id),
                );
                (String::new(), None)
            }
            Some(wallet) => {
                let policy = self.active.as_ref().map(|a| &a.policy);
                let (parsed, problem) = recompute_intent(&c, wallet, policy);
                let label = wallet.key_label.clone();
                if let Some(problem) = problem {
                    self.flag(index, code::INTENT_MISMATCH, problem);
                }
                (label, parsed)
            }
        };
        self.open.insert(
            c.withdrawal_id.to_owned(),
            Open {
                wallet_id: c.wallet_id.to_owned(),
                key_label,
                initiator: c.initiator.to_owned(),
                logged_intent_hash: *c.intent_hash,
                intent_hash: parsed.as_ref().map_or(*c.intent_hash, |p| p.intent().hash()),
                parsed,
                state: None,
                expires_at: 0,
                votes: Vec::new(),
                authorized: false,
                counted: None,
            },
        );
    }

    pub(super) fn vote(
        &mut self,
        index: u64,
        time: u64,
        withdrawal_id: &str,
        message: &[u8],
        signature: &[u8],
    ) {
        self.report.votes += 1;
        self.expect = Some(Expect::Decision {
            index,
            withdrawal_id: withdrawal_id.to_owned(),
            trigger: Trigger::Vote,
        });
        let m = match ApprovalMessage::parse(message) {
            Ok(m) => m,
            Err(e) => return self.flag(index, code::APPROVAL_MALFORMED, e.to_string()),
        };
        let service_id = self.service_id(&m.service_id);
        let Replayer {
            report,
            open,
            finished,
            active,
            frozen,
            ahead,
            ..
        } = self;
        let w = open.get_mut(withdrawal_id);
        // A withdrawal that is closed or unknown takes no votes; its ballot
        // carries only the state, which the rules check before the rest.
        let (state_name, ballot) = match &w {
            Some(w) => (
                w.state.map_or("undecided", State::name),
                vote::Ballot {
                    withdrawal_id,
                    state: w.state,
                    window_ends_at: w.expires_at,
                    intent_hash: w.logged_intent_hash,
                    initiator: &w.initiator,
                    votes: &w.votes,
                },
            ),
            None => (
                finished.get(withdrawal_id).map_or("unknown", |s| s.name()),
                vote::Ballot {
                    withdrawal_id,
                    state: finished.get(withdrawal_id).copied(),
                    window_ends_at: 0,
                    intent_hash: [0; 32],
                    initiator: "",
                    votes: &[],
                },
            ),
        };
        let custody = vote::Custody {
            service_id: &service_id,
            frozen: *frozen,
            policy: active.as_ref().map(|a| &a.policy),
            now: time,
        };
        let verify = |key: &VerifyingKey| match ahead.votes.remove(&index) {
            Some((checked, result)) if checked == *key => result,
            _ => m.verify(signature, key),
        };
        let admitted = vote::admit(&m, verify, &ballot, &custody);
        let (code, detail) = match admitted {
            Ok(admitted) => {
                let Some(w) = w else {
                    // Unreachable: a withdrawal that is not open has no
                    // PENDING_APPROVAL state, so admission refused it.
                    return;
                };
                if let Some(at) = admitted.replaces {
                    w.votes.remove(at);
                }
                w.votes.push(admitted.approval);
                return;
            }
            Err(refusal) => {
                let version = custody.policy.map_or(0, |p| p.version);
                vote_finding(refusal, &m, withdrawal_id, state_name, &service_id, version)
            }
        };
        report.findings.push(Finding { index, code, detail });
    }

    pub(super) fn decision(&mut self, index: u64, time: u64, trigger: Option<Trigger>, d: &Logged<'_>) {
        self.report.decisions += 1;
        let id = d.withdrawal_id;
        match trigger {
            Some(Trigger::Ignored) => return,
            Some(_) => {}
            None => self.flag(
                index,
                code::DECISION_ORPHAN,
                format!("no withdrawal or vote on {id} just before it; the engine decides only on those"),
            ),
        }
        let Some(logged) = State::from_name(d.state) else {
            return self.flag(
                index,
                code::DECISION_MISMATCH,
                format!("{:?} is not a withdrawal state", d.state),
            );
        };
        let Some(w) = self.open.get(id) else {
            let state = self.finished.get(id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::ILLEGAL_TRANSITION,
                format!("withdrawal {id} is {state}; it takes no decision"),
            );
        };
        let first = w.state.is_none();
        let legal = match w.state {
            None => matches!(logged, State::Approved | State::PendingApproval | State::Denied),
            Some(State::PendingApproval) => matches!(
                logged,
                State::Approved | State::PendingApproval | State::Denied | State::Rejected
            ),
            Some(_) => false,
        };
        if !legal {
            let from = w.state.map_or("a new", State::name);
            return self.flag(
                index,
                code::ILLEGAL_TRANSITION,
                format!("{from} withdrawal {id} cannot be decided {logged}"),
            );
        }
        let outcome = self.replay_decision(id, w, first, time);
        let agreed = match &outcome {
            Replayed::Decided(expected) => {
                let differences = expected.differences(logged, d);
                if self.frozen && !(logged == State::Denied && d.reason_code == "frozen") {
                    self.flag(
                        index,
                        code::DECISION_WHILE_FROZEN,
                        format!(
                            "custody is frozen, but the decision is {}",
                            describe_logged(logged, d)
                        ),
                    );
                } else if !differences.is_empty() {
                    let detail = format!(
                        "replay decides {}; the log says {}; they differ in {}",
                        expected.describe(),
                        describe_logged(logged, d),
                        differences.join(", ")
                    );
                    self.flag(index, code::DECISION_MISMATCH, detail);
                }
                differences.is_empty()
            }
            Replayed::FrozenVote => {
                if !(logged == State::Denied && d.reason_code == "frozen") {
                    self.flag(
                        index,
                        code::DECISION_WHILE_FROZEN,
                        format!(
                            "custody is frozen, but the decision is {}",
                            describe_logged(logged, d)
                        ),
                    );
                }
                false
            }
            Replayed::Unparsed => {
                if logged != State::Denied {
                    self.flag(
                        index,
                        code::DECISION_MISMATCH,
                        format!(
                            "the transaction does not parse for its wallet under the active policy, so only a denial is consistent; the log says {}",
                            describe_logged(logged, d)
                        ),
                    );
                }
                false
            }
        };
        let tainted = self.active.as_ref().is_some_and(|a| a.tainted);
        let window = match (&self.active, self.frozen) {
            (Some(a), false) => a.policy.approval_window_secs,
            _ => 0,
        };
        let Some(w) = self.open.get_mut(id) else { return };
        if first {
            w.expires_at = time.saturating_add(window);
        }
        w.state = Some(logged);
        if logged == State::Approved {
            w.authorized = agreed && !tainted && !self.frozen;
            if let Some(parsed) = &w.parsed {
                let intent = parsed.intent();
                let key = (w.wallet_id.clone(), intent.asset.symbol.clone());
                let amount = intent.total_amount();
                self.usage.entry(key.clone()).or_default().add(time, amount);
                w.counted = Some((key, time, amount));
            }
        }
        if logged.is_terminal() {
            self.finish_withdrawal(id, logged);
        }
    }

    /// What the engine decides for `w` at `time`: under the active policy,
    /// with the votes that verified and the usage the log accumulated.
    pub(super) fn replay_decision(&self, id: &str, w: &Open, first: bool, time: u64) -> Replayed {
        let active = self.active.as_ref().map(|a| &a.policy);
        if self.frozen {
            if !first {
                return Replayed::FrozenVote;
            }
            let frozen = frozen_decision(None);
            let record = DecisionRecord {
                policy_hash: active.map(|p| p.hash),
                policy_version: active.map_or(0, |p| p.version),
                ..frozen
            };
            return Replayed::Decided(Expected {
                state: State::Denied,
                record,
                usage: Vec::new(),
            });
        }
        let Some(policy) = active else {
            return Replayed::Decided(Expected {
                state: State::Denied,
                record: no_policy_decision(),
                usage: Vec::new(),
            });
        };
        let Some(parsed) = &w.parsed else {
            return Replayed::Unparsed;
        };
        let intent = parsed.intent();
        let pw = policy::Withdrawal {
            id,
            wallet: &w.wallet_id,
            key_label: &w.key_label,
            intent,
            intent_hash: w.intent_hash,
            initiator: &w.initiator,
        };
        let empty = UsageLedger::default();
        let ledger = self
            .usage
            .get(&(w.wallet_id.clone(), intent.asset.symbol.clone()))
            .unwrap_or(&empty);
        let decision = policy::evaluate(policy, &pw, ledger, &w.votes, time);
        let state = match (&decision.outcome, first) {
            (Outcome::Allow, _) => State::Approved,
            (Outcome::Pending(_), _) => State::PendingApproval,
            (Outcome::Deny(DenyReason::Rejected { .. }), false) => State::Rejected,
            (Outcome::Deny(_), _) => State::Denied,
        };
        Replayed::Decided(Expected {
            state,
            record: record(&decision, policy.version),
            usage: window_usage(policy, &pw, ledger, time, state == State::Approved),
        })
    }

    pub(super) fn signed(&mut self, index: u64, withdrawal_id: &str, signed_tx: &[u8], tx_hash: &[u8]) {
        self.report.signatures += 1;
        let Some(w) = self.open.get(withdrawal_id) else {
            let state = self.finished.get(withdrawal_id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::SIGNATURE_UNAUTHORIZED,
                format!("withdrawal {withdrawal_id} is {state}; nothing authorizes signing it"),
            );
        };
        let approved = w.state == Some(State::Approved);
        let unauthorized = if !approved {
            let state = w.state.map_or("undecided", State::name);
            Some(format!(
                "withdrawal {withdrawal_id} is {state}; only an APPROVED withdrawal is signed"
            ))
        } else if !w.authorized {
            Some(format!(
                "withdrawal {withdrawal_id} has no valid authorizing decision: its APPROVED decision is not the one replay reaches, or was made while frozen or under a policy that was not validly activated"
            ))
        } else if self.frozen || self.held {
            // The engine checks the freeze before it signs; a signature that
            // had passed that check when a freeze committed still completes,
            // so this is either that race or a signature while frozen.
            Some(format!(
                "withdrawal {withdrawal_id} is signed while custody is frozen"
            ))
        } else {
            None
        };
        let invalid = match (&w.parsed, self.wallets.get(&w.wallet_id)) {
            (Some(parsed), Some(wallet)) => {
                let ahead = self.ahead.recovered.remove(&index);
                verify_signed_tx(parsed, &wallet.public, signed_tx, tx_hash, ahead).err()
            }
            _ => Some("the withdrawal's transaction does not parse for its wallet".to_owned()),
        };
        if let Some(detail) = unauthorized {
            self.flag(index, code::SIGNATURE_UNAUTHORIZED, detail);
        }
        if let Some(detail) = invalid {
            self.flag(index, code::SIGNATURE_INVALID, detail);
        }
        if approved {
            self.finish_withdrawal(withdrawal_id, State::Signed);
        }
    }

    pub(super) fn closed(&mut self, index: u64, time: u64, withdrawal_id: &str, state: &str) {
        let target = State::from_name(state).filter(|s| matches!(s, State::Expired | State::Cancelled));
        let Some(target) = target else {
            return self.flag(
                index,
                code::CLOSE_INVALID,
                format!("{state:?} is neither EXPIRED nor CANCELLED"),
            );
        };
        let Some(w) = self.open.get(withdrawal_id) else {
            let state = self.finished.get(withdrawal_id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::CLOSE_INVALID,
                format!("withdrawal {withdrawal_id} is {state}; it cannot become {target}"),
            );
        };
        // The transition is the lifecycle's, as in the engine; only the
        // time of an expiry is the replay's own check.
        let event = match target {
            State::Expired => LifecycleEvent::WindowElapsed,
            _ => LifecycleEvent::Cancel,
        };
        let legal = w.state.is_some_and(|from| from.apply(event) == Ok(target));
        let problem = if !legal {
            Some(format!(
                "a {} withdrawal cannot become {target}",
                w.state.map_or("undecided", State::name)
            ))
        } else if target == State::Expired && time < w.expires_at {
            Some(format!(
                "withdrawal {withdrawal_id} expired at {time}, before its approval window ended at {}",
                w.expires_at
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => self.flag(index, code::CLOSE_INVALID, problem),
            None => self.finish_withdrawal(withdrawal_id, target),
        }
    }

    /// Moves a withdrawal to its terminal state, dropping all but the state.
    /// A cancelled APPROVED withdrawal stops counting against limits.
    pub(super) fn finish_withdrawal(&mut self, withdrawal_id: &str, state: State) {
        if let Some(w) = self.open.remove(withdrawal_id) {
            if state == State::Cancelled
                && let Some((key, at, amount)) = w.counted
                && let Some(ledger) = self.usage.get_mut(&key)
            {
                ledger.remove(at, amount);
            }
            self.finished.insert(withdrawal_id.to_owned(), state);
        }
    }
}

/// The fields of a withdrawal-created entry.
pub(super) struct Created<'a> {
    pub(super) withdrawal_id: &'a str,
    pub(super) request_id: &'a str,
    pub(super) wallet_id: &'a str,
    pub(super) initiator: &'a str,
    pub(super) chain: &'a str,
    pub(super) unsigned_tx: &'a [u8],
    pub(super) intent: &'a [u8],
    pub(super) intent_hash: &'a [u8; 32],
}

/// The fields of a decision entry.
pub(super) struct Logged<'a> {
    pub(super) withdrawal_id: &'a str,
    pub(super) policy_hash: &'a [u8; 32],
    pub(super) policy_version: u64,
    pub(super) state: &'a str,
    pub(super) rule: &'a str,
    pub(super) reason_code: &'a str,
    pub(super) reason: &'a str,
    pub(super) counted_approvers: &'a [String],
    pub(super) usage: &'a [WindowUsage],
}

pub(super) enum Replayed {
    Decided(Expected),
    /// A vote's decision while frozen: the engine refuses such votes.
    FrozenVote,
    /// The transaction does not parse for its wallet: nothing to evaluate.
    Unparsed,
}

/// The decision replay reaches, in the engine's own record.
pub(super) struct Expected {
    pub(super) state: State,
    pub(super) record: DecisionRecord,
    pub(super) usage: Vec<WindowUsage>,
}

impl Expected {
    pub(super) fn differences(&self, state: State, d: &Logged<'_>) -> Vec<&'static str> {
        let r = &self.record;
        let policy_hash = r.logged_policy_hash() == *d.policy_hash;
        [
            ("policy_hash", policy_hash),
            ("policy_version", r.policy_version == d.policy_version),
            ("state", self.state == state),
            ("rule", r.rule.as_deref().unwrap_or_default() == d.rule),
            (
                "reason_code",
                r.reason_code.as_deref().unwrap_or_default() == d.reason_code,
            ),
            ("reason", r.reason.as_deref().unwrap_or_default() == d.reason),
            ("counted_approvers", r.counted_approvers == d.counted_approvers),
            ("usage", self.usage == d.usage),
        ]
        .into_iter()
        .filter_map(|(field, same)| (!same).then_some(field))
        .collect()
    }

    pub(super) fn describe(&self) -> String {
        let r = &self.record;
        let mut text = format!("{} under policy version {}", self.state, r.policy_version);
        if let Some(rule) = &r.rule {
            text.push_str(&format!(", rule {rule}"));
        }
        if let (Some(code), Some(reason)) = (&r.reason_code, &r.reason) {
            text.push_str(&format!(", {code}: {reason}"));
        }
        if !r.counted_approvers.is_empty() {
            text.push_str(&format!(", counting {}", r.counted_approvers.join(" and ")));
        }
        text.push_str(&format!(", usage {}", describe_usage(&self.usage)));
        text
    }
}

/// The finding of a vote that [`vote::admit`] refused, with the code and
/// the words the replay reports.
pub(super) fn vote_finding(
    refusal: vote::Refusal,
    m: &ApprovalMessage,
    withdrawal_id: &str,
    state_name: &str,
    service_id: &str,
    version: u64,
) -> (&'static str, String) {
    use vote::Refusal as R;
    match refusal {
        R::WrongService { named } => (
            code::APPROVAL_UNBOUND,
            format!("the approval names service {named}, not {service_id}"),
        ),
        R::WrongWithdrawal { named } => (
            code::APPROVAL_UNBOUND,
            format!("the approval names withdrawal {named}"),
        ),
        R::NotPending { .. } => (
            code::VOTE_REFUSED,
            format!("withdrawal {withdrawal_id} is {state_name}; it takes no votes"),
        ),
        R::WindowEnded { at } => (code::VOTE_REFUSED, format!("the approval window ended at {at}")),
        R::Frozen => (code::VOTE_REFUSED, "custody is frozen".into()),
        R::NoPolicy => (code::VOTE_REFUSED, "no policy is active".into()),
        R::UnknownApprover { approver, version } => (
            code::APPROVAL_UNAUTHORIZED,
            format!("{approver} is not on the roster of policy version {version}"),
        ),
        R::BadSignature(e) => (
            code::APPROVAL_UNAUTHORIZED,
            format!(
                "{e}: the vote is not signed by {}'s key on the roster of policy version {version}",
                m.approver
            ),
        ),
        R::WrongIntent { named, actual } => (
            code::APPROVAL_UNBOUND,
            format!(
                "the approval names intent {}, the withdrawal's is {}",
                hex::encode(named),
                hex::encode(actual)
            ),
        ),
        R::StalePolicy {
            named,
            version,
            active,
        } => (
            code::APPROVAL_UNBOUND,
            format!(
                "the approval names policy {}, the active policy is version {version} ({})",
                hex::encode(named),
                hex::encode(active)
            ),
        ),
        R::Expired { at } => (code::APPROVAL_UNBOUND, format!("the approval expired at {at}")),
        R::Initiator => (
            code::APPROVAL_UNAUTHORIZED,
            format!("{} initiated the withdrawal and cannot vote on it", m.approver),
        ),
        R::AlreadyCounted => (
            code::VOTE_REFUSED,
            format!("{}'s earlier vote still counts", m.approver),
        ),
    }
}

pub(super) fn describe_logged(state: State, d: &Logged<'_>) -> String {
    let mut text = format!("{state} under policy version {}", d.policy_version);
    if !d.rule.is_empty() {
        text.push_str(&format!(", rule {}", d.rule));
    }
    if !d.reason_code.is_empty() {
        text.push_str(&format!(", {}: {}", d.reason_code, d.reason));
    }
    if !d.counted_approvers.is_empty() {
        text.push_str(&format!(", counting {}", d.counted_approvers.join(" and ")));
    }
    text.push_str(&format!(", usage {}", describe_usage(d.usage)));
    text
}

pub(super) fn describe_usage(usage: &[WindowUsage]) -> String {
    if usage.is_empty() {
        return "none".into();
    }
    usage
        .iter()
        .map(|u| {
            format!(
                "[{} s: {}/{} before, {}/{} after]",
                u.seconds, u.amount_before, u.count_before, u.amount_after, u.count_after
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Recomputes a withdrawal's intent and compares it with the logged one.
/// Returns the transaction as replay parsed it (if it parses) and what is
/// wrong with the logged intent, if anything.
///
/// The engine parses with its configured network and token registry, which
/// the log does not hold. Replay parses first as the active policy governs
/// the wallet, which is what `custos approve` does; if that does not give
/// the logged intent (the policy may not govern the wallet, or name another
/// network, and the engine then denies), it parses on the transaction's own
/// chain id (Ethereum) or each Bitcoin network in turn, with the policy's
/// token registry. Any of these giving exactly the logged intent proves the
/// intent is the transaction's.
pub(super) fn recompute_intent(
    c: &Created<'_>,
    wallet: &WalletKey,
    policy: Option<&Policy>,
) -> (Option<ParsedTx>, Option<String>) {
    let tx = match recompute::decode(c.chain, c.unsigned_tx) {
        Ok(tx) => tx,
        Err(e) => {
            return (
                None,
                Some(format!("the unsigned transaction does not decode: {e}")),
            );
        }
    };
    // `None`: as the policy governs the wallet; then the fallbacks.
    let mut attempts: Vec<Option<Network>> = Vec::new();
    if policy.is_some() {
        attempts.push(None);
    }
    match &tx {
        UnsignedTx::Ethereum(t) => {
            attempts.extend(recompute::chain_id(t).map(|chain_id| Some(Network::Ethereum { chain_id })));
        }
        UnsignedTx::Bitcoin(_) => attempts.extend(BITCOIN_NETWORKS.map(|n| Some(Network::Bitcoin(n)))),
    }
    let mut first: Option<Result<ParsedTx, String>> = None;
    for attempt in attempts {
        let parsed = match (attempt, policy) {
            (Some(network), _) => recompute::parse_on(tx.clone(), network, policy, &wallet.public),
            (None, Some(policy)) => {
                recompute::parse_under_policy(tx.clone(), policy, c.wallet_id, &wallet.public)
            }
            (None, None) => continue,
        }
        .map_err(|e| e.to_string());
        if let Ok(p) = &parsed
            && p.intent().canonical_bytes() == c.intent
        {
            let problem = (p.intent().hash() != *c.intent_hash).then(|| {
                format!(
                    "the logged intent hash {} is not the hash of the logged intent, {}",
                    hex::encode(c.intent_hash),
                    hex::encode(p.intent().hash())
                )
            });
            return (parsed.ok(), problem);
        }
        first.get_or_insert(parsed);
    }
    match first {
        Some(Ok(p)) => {
            let problem = format!(
                "the transaction gives intent {} ({} {} base units of {} to {}), not the logged intent {}",
                hex::encode(p.intent().hash()),
                p.intent().network.caip2(),
                p.intent().total_amount(),
                p.intent().asset.symbol,
                p.intent()
                    .destinations
                    .iter()
                    .map(|d| d.to.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                hex::encode(c.intent_hash)
            );
            (Some(p), Some(problem))
        }
        Some(Err(e)) => (
            None,
            Some(format!(
                "the transaction does not parse for wallet {}: {e}",
                c.wallet_id
            )),
        ),
        None => (None, Some("the transaction names no chain id".into())),
    }
}

/// Checks that `signed_tx` is the parsed transaction with a valid signature
/// by the wallet's key, and that `tx_hash` is its hash.
///
/// Ethereum: alloy decodes the signed transaction; its unsigned part must
/// be the withdrawal's, and the signature (low-S) must recover to the
/// wallet's key over the signing hash. Bitcoin: rust-bitcoin decodes the
/// transaction; without witnesses it must be the PSBT's unsigned
/// transaction, and each input's witness must be a SIGHASH_ALL low-S
/// signature by the wallet's key over that input's BIP-143 sighash,
/// followed by the wallet's key.
pub(super) fn verify_signed_tx(
    parsed: &ParsedTx,
    key: &VerifyingKey,
    signed_tx: &[u8],
    tx_hash: &[u8],
    ahead: Option<Recovered>,
) -> Result<(), String> {
    match parsed {
        ParsedTx::Ethereum(p) => {
            let decoded = ethereum::decode_signed(signed_tx)?;
            let (unsigned, signature, recovery_id, hash) = (
                decoded.unsigned,
                decoded.signature,
                decoded.recovery_id,
                decoded.hash,
            );
            if unsigned != *p.transaction() {
                return Err("the signed transaction is not the withdrawal's transaction".into());
            }
            if hash.as_slice() != tx_hash {
                return Err(format!(
                    "the logged transaction hash {} is not the signed transaction's, {hash}",
                    hex::encode(tx_hash)
                ));
            }
            if !crate::signature::is_low_s(&signature) {
                return Err("the signature has high S".into());
            }
            let recovered = match ahead {
                Some(a)
                    if a.prehash == p.signing_hash()
                        && a.signature == signature
                        && a.recovery_id == recovery_id =>
                {
                    a.key
                }
                _ => VerifyingKey::recover_from_prehash(&p.signing_hash(), &signature, recovery_id).ok(),
            }
            .ok_or_else(|| "no key recovers from the signature".to_owned())?;
            if recovered != *key {
                return Err(format!(
                    "the transaction is signed by {}, not by the wallet's key ({})",
                    crate::address::ethereum_address_checksummed(&recovered),
                    crate::address::ethereum_address_checksummed(key)
                ));
            }
            Ok(())
        }
        ParsedTx::Bitcoin(p) => {
            use ::bitcoin::hashes::Hash;
            let tx: ::bitcoin::Transaction = ::bitcoin::consensus::encode::deserialize(signed_tx)
                .map_err(|e| format!("the signed transaction does not decode: {e}"))?;
            let mut stripped = tx.clone();
            for input in &mut stripped.input {
                input.witness = ::bitcoin::Witness::new();
            }
            if stripped != *p.unsigned_tx() {
                return Err("the signed transaction is not the withdrawal's transaction".into());
            }
            let txid = tx.compute_txid();
            if txid.as_byte_array().as_slice() != tx_hash {
                return Err(format!(
                    "the logged txid {} is not the signed transaction's, {txid}",
                    hex::encode(tx_hash)
                ));
            }
            let wallet_key = crate::address::bitcoin_public_key(key).to_bytes();
            for (i, (input, sighash)) in tx.input.iter().zip(p.sighashes()).enumerate() {
                let items: Vec<&[u8]> = input.witness.iter().collect();
                let [sig, public] = items.as_slice() else {
                    return Err(format!("input {i}'s witness is not a signature and a key"));
                };
                if *public != wallet_key.as_slice() {
                    return Err(format!("input {i} is signed with another key than the wallet's"));
                }
                let sig = ::bitcoin::ecdsa::Signature::from_slice(sig)
                    .map_err(|e| format!("input {i}'s signature is malformed: {e}"))?;
                if sig.sighash_type != ::bitcoin::EcdsaSighashType::All {
                    return Err(format!("input {i}'s signature is not SIGHASH_ALL"));
                }
                let signature = Signature::from_slice(&sig.signature.serialize_compact())
                    .map_err(|_| format!("input {i}'s signature is out of range"))?;
                if !crate::signature::is_low_s(&signature) {
                    return Err(format!("input {i}'s signature has high S"));
                }
                key.verify_prehash(sighash.as_bytes(), &signature)
                    .map_err(|_| format!("input {i}'s signature does not verify under the wallet's key"))?;
            }
            Ok(())
        }
    }
}
