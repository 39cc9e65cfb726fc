//! The withdrawal lifecycle as a state machine.
//!
//! ```text
//!                 ┌────────── Deny ──────────► DENIED
//!   (created) ────┼── Allow ──► APPROVED ── Signed ──► SIGNED
//!                 └── Pending ► PENDING_APPROVAL ── QuorumMet ──► APPROVED
//!                                 │  Reject ──► REJECTED
//!                                 │  Deny ──► DENIED   (re-evaluated at quorum)
//!                                 │  WindowElapsed ──► EXPIRED
//!                                 └  Cancel ──► CANCELLED   (also from APPROVED)
//! ```
//!
//! [`State::apply`] is the only way to move between states. Every other
//! combination is an [`IllegalTransition`], so a terminal state (SIGNED,
//! DENIED, REJECTED, EXPIRED, CANCELLED) can never change, and only APPROVED
//! can become SIGNED. That makes "signed at most once" a property of the type.
//! The store persists these states; the withdrawal service drives them.

use std::fmt;

/// Where a withdrawal is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for approvals.
    PendingApproval,
    /// Policy allows it; signing is next.
    Approved,
    /// Signed; terminal.
    Signed,
    /// Refused by policy; terminal.
    Denied,
    /// Refused by an approver; terminal.
    Rejected,
    /// The approval window passed; terminal.
    Expired,
    /// Cancelled by its initiator; terminal.
    Cancelled,
}

/// The first decision on a new withdrawal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstDecision {
    /// Policy allows it at once.
    Allow,
    /// A quorum is needed.
    Pending,
    /// Policy denies it.
    Deny,
}

/// Something that happened to a withdrawal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Re-evaluation with the approvals so far met every quorum.
    QuorumMet,
    /// A member of a required group rejected.
    Reject,
    /// Re-evaluation when the quorum was met denied it (a limit filled up,
    /// or the policy changed, in the meantime).
    Deny,
    /// The approval window passed.
    WindowElapsed,
    /// The initiator cancelled.
    Cancel,
    /// The signature's log entry and state were committed.
    Signed,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} withdrawal cannot take event {event:?}")]
pub struct IllegalTransition {
    /// The current state.
    pub from: State,
    /// The refused event.
    pub event: Event,
}

impl State {
    /// The state a new withdrawal starts in.
    pub fn initial(decision: FirstDecision) -> Self {
        match decision {
            FirstDecision::Allow => State::Approved,
            FirstDecision::Pending => State::PendingApproval,
            FirstDecision::Deny => State::Denied,
        }
    }

    /// The state after `event`, or why it cannot happen.
    pub fn apply(self, event: Event) -> Result<Self, IllegalTransition> {
        match (self, event) {
            (State::PendingApproval, Event::QuorumMet) => Ok(State::Approved),
            (State::PendingApproval, Event::Reject) => Ok(State::Rejected),
            (State::PendingApproval, Event::Deny) => Ok(State::Denied),
            (State::PendingApproval, Event::WindowElapsed) => Ok(State::Expired),
            (State::PendingApproval | State::Approved, Event::Cancel) => Ok(State::Cancelled),
            (State::Approved, Event::Signed) => Ok(State::Signed),
            (from, event) => Err(IllegalTransition { from, event }),
        }
    }

    /// Whether nothing can happen to it any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Signed | State::Denied | State::Rejected | State::Expired | State::Cancelled
        )
    }

    /// The name used in the API and the store, e.g. `PENDING_APPROVAL`.
    pub fn name(self) -> &'static str {
        match self {
            State::PendingApproval => "PENDING_APPROVAL",
            State::Approved => "APPROVED",
            State::Signed => "SIGNED",
            State::Denied => "DENIED",
            State::Rejected => "REJECTED",
            State::Expired => "EXPIRED",
            State::Cancelled => "CANCELLED",
        }
    }

    /// Parses [`State::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const ALL: [State; 7] = [
    State::PendingApproval,
    State::Approved,
    State::Signed,
    State::Denied,
    State::Rejected,
    State::Expired,
    State::Cancelled,
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const EVENTS: [Event; 6] = [
        Event::QuorumMet,
        Event::Reject,
        Event::Deny,
        Event::WindowElapsed,
        Event::Cancel,
        Event::Signed,
    ];

    #[test]
    fn the_allowed_transitions_and_only_those() {
        let allowed = [
            (State::PendingApproval, Event::QuorumMet, State::Approved),
            (State::PendingApproval, Event::Reject, State::Rejected),
            (State::PendingApproval, Event::Deny, State::Denied),
            (State::PendingApproval, Event::WindowElapsed, State::Expired),
            (State::PendingApproval, Event::Cancel, State::Cancelled),
            (State::Approved, Event::Cancel, State::Cancelled),
            (State::Approved, Event::Signed, State::Signed),
        ];
        for from in ALL {
            for event in EVENTS {
                let expected = allowed
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match expected {
                    Some(to) => assert_eq!(from.apply(event), Ok(to)),
                    None => assert_eq!(from.apply(event), Err(IllegalTransition { from, event })),
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in ALL {
            assert_eq!(State::from_name(state.name()), Some(state));
        }
        assert_eq!(State::from_name("signed"), None);
    }

    proptest! {
        /// Along any sequence of events, a withdrawal is signed at most once,
        /// only from APPROVED, and never leaves a terminal state.
        #[test]
        fn signed_at_most_once_and_terminal_states_stick(
            first in 0usize..3,
            events in proptest::collection::vec(0usize..6, 0..20),
        ) {
            let decision = [FirstDecision::Allow, FirstDecision::Pending, FirstDecision::Deny][first];
            let mut state = State::initial(decision);
            let mut signed = 0;
            for e in events {
                let event = EVENTS[e];
                if let Ok(next) = state.apply(event) {
                    prop_assert!(!state.is_terminal());
                    if next == State::Signed {
                        prop_assert_eq!(state, State::Approved);
                        signed += 1;
                    }
                    state = next;
                }
            }
            prop_assert!(signed <= 1);
            if decision == FirstDecision::Deny {
                prop_assert_eq!(state, State::Denied);
            }
        }
    }
}
