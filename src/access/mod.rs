//! Who may call what: client identities, their roles, and the authorization
//! matrix every RPC is checked against.
//!
//! A caller is known only by the client certificate it presented in the mTLS
//! handshake (the transport, `tls`, records it). Its SAN (a URI or DNS name)
//! is looked up in the configured [`ClientRegistry`], which grants roles.
//! [`RPC_ACCESS`] is the single table that says which roles may call each
//! RPC; a method absent from it is refused to everyone, so a new RPC is
//! unreachable until someone decides who may call it. The `guard` module,
//! above this one, enforces the table, with the request limits, as a tower
//! layer in front of every service.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A role a client identity holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The exchange backend: creates and follows withdrawals.
    Backend,
    /// An approver: submits approvals for its own approver id.
    Approver,
    /// An auditor: reads the audit log, nothing else.
    Auditor,
    /// An admin: wallets, policy, freeze.
    Admin,
}

impl Role {
    /// Every role, in table order.
    pub const ALL: [Role; 4] = [Role::Backend, Role::Approver, Role::Auditor, Role::Admin];

    /// The role's name in config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Backend => "backend",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Role::Backend => 1,
            Role::Approver => 2,
            Role::Auditor => 4,
            Role::Admin => 8,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of roles, as a bit set so that checks on the request path are free.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// No role.
    pub const NONE: Roles = Roles(0);

    /// The set holding exactly `roles`.
    pub const fn of(roles: &[Role]) -> Roles {
        let mut bits = 0;
        let mut i = 0;
        while i < roles.len() {
            bits |= roles[i].bit();
            i += 1;
        }
        Roles(bits)
    }

    /// Whether `role` is in the set.
    pub const fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Whether the two sets share a role.
    pub const fn intersects(self, other: Roles) -> bool {
        self.0 & other.0 != 0
    }

    /// The roles in the set.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a client certificate (health checks, which
    /// load balancers make without one).
    Public,
    /// Any authenticated client holding one of these roles.
    Roles(Roles),
}

const BACKEND: Roles = Roles::of(&[Role::Backend]);
const ADMIN: Roles = Roles::of(&[Role::Admin]);
const AUDITOR: Roles = Roles::of(&[Role::Auditor]);
const APPROVER: Roles = Roles::of(&[Role::Approver]);
const ANY_ROLE: Roles = Roles::of(&Role::ALL);

/// The authorization matrix: every RPC custos serves and who may call it.
///
/// Approvers read the withdrawal, its wallet and the policy because `custos
/// approve` recomputes the intent hash from them before the approver signs.
/// The backend reads wallets for their addresses. Auditors read only the
/// audit log. Admins read withdrawals to answer incidents but cannot create
/// or cancel them.
pub const RPC_ACCESS: &[(&str, Access)] = &[
    ("/custos.v1.WalletService/CreateWallet", Access::Roles(ADMIN)),
    (
        "/custos.v1.WalletService/GetWallet",
        Access::Roles(Roles::of(&[Role::Admin, Role::Backend, Role::Approver])),
    ),
    (
        "/custos.v1.WalletService/ListWallets",
        Access::Roles(Roles::of(&[Role::Admin, Role::Backend])),
    ),
    (
        "/custos.v1.WithdrawalService/CreateWithdrawal",
        Access::Roles(BACKEND),
    ),
    (
        "/custos.v1.WithdrawalService/GetWithdrawal",
        Access::Roles(Roles::of(&[Role::Backend, Role::Approver, Role::Admin])),
    ),
    (
        "/custos.v1.WithdrawalService/ListWithdrawals",
        Access::Roles(Roles::of(&[Role::Backend, Role::Admin])),
    ),
    (
        "/custos.v1.WithdrawalService/WatchWithdrawal",
        Access::Roles(Roles::of(&[Role::Backend, Role::Admin])),
    ),
    (
        "/custos.v1.WithdrawalService/CancelWithdrawal",
        Access::Roles(BACKEND),
    ),
    (
        "/custos.v1.ApprovalService/ListPendingApprovals",
        Access::Roles(APPROVER),
    ),
    (
        "/custos.v1.ApprovalService/SubmitApproval",
        Access::Roles(APPROVER),
    ),
    (
        "/custos.v1.PolicyService/GetPolicy",
        Access::Roles(Roles::of(&[Role::Admin, Role::Approver])),
    ),
    ("/custos.v1.PolicyService/ProposePolicy", Access::Roles(ADMIN)),
    ("/custos.v1.PolicyService/ApprovePolicy", Access::Roles(ADMIN)),
    ("/custos.v1.PolicyService/Freeze", Access::Roles(ADMIN)),
    ("/custos.v1.PolicyService/Unfreeze", Access::Roles(ADMIN)),
    ("/custos.v1.AuditService/GetLogKey", Access::Roles(AUDITOR)),
    ("/custos.v1.AuditService/GetCheckpoint", Access::Roles(AUDITOR)),
    ("/custos.v1.AuditService/ListCheckpoints", Access::Roles(AUDITOR)),
    ("/custos.v1.AuditService/ListEntries", Access::Roles(AUDITOR)),
    (
        "/custos.v1.AuditService/GetInclusionProof",
        Access::Roles(AUDITOR),
    ),
    (
        "/custos.v1.AuditService/GetConsistencyProof",
        Access::Roles(AUDITOR),
    ),
    ("/grpc.health.v1.Health/Check", Access::Public),
    ("/grpc.health.v1.Health/Watch", Access::Public),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Roles(ANY_ROLE),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Roles(ANY_ROLE),
    ),
];

/// Who may call the RPC at `path` (`/package.Service/Method`); `None` for a
/// path custos does not serve: an authenticated client gets UNIMPLEMENTED
/// for it, anyone else UNAUTHENTICATED.
pub fn rpc_access(path: &str) -> Option<Access> {
    RPC_ACCESS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// A client identity as written in config and found in certificates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientIdentity {
    /// A URI SAN, e.g. `spiffe://exchange.example/backend`.
    Uri(String),
    /// A DNS-name SAN, e.g. `backend.custos.internal`.
    Dns(String),
}

impl ClientIdentity {
    /// Parses `uri:<uri>` or `dns:<name>`, the form used in config.
    pub fn parse(text: &str) -> Option<Self> {
        let valid = |s: &str| !s.is_empty() && s.len() <= 512 && s.bytes().all(|b| b.is_ascii_graphic());
        if let Some(uri) = text.strip_prefix("uri:") {
            valid(uri).then(|| ClientIdentity::Uri(uri.to_owned()))
        } else if let Some(name) = text.strip_prefix("dns:") {
            valid(name).then(|| ClientIdentity::Dns(name.to_ascii_lowercase()))
        } else {
            None
        }
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientIdentity::Uri(uri) => write!(f, "uri:{uri}"),
            ClientIdentity::Dns(name) => write!(f, "dns:{name}"),
        }
    }
}

/// One configured client: its identity, roles and, for approvers, the
/// approver id it may approve as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    /// The certificate identity.
    pub identity: ClientIdentity,
    /// Its roles.
    pub roles: Roles,
    /// The policy's approver id this client submits approvals for; required
    /// with the approver role and refused without it.
    pub approver_id: Option<String>,
}

/// Why a client list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientListError {
    /// The same identity appears twice.
    #[error("clients: identity {0} is listed twice")]
    Duplicate(ClientIdentity),
    /// An approver entry without an approver id, or an approver id without the role.
    #[error("clients: {0}: approver_id is required with the approver role, and only with it")]
    ApproverId(ClientIdentity),
    /// An entry with no roles.
    #[error("clients: {0} has no roles")]
    NoRoles(ClientIdentity),
    /// Two identities approve as the same approver id.
    #[error("clients: approver_id {0:?} is bound to two identities")]
    ApproverTwice(String),
}

/// The configured clients, by identity.
#[derive(Debug, Clone, Default)]
pub struct ClientRegistry {
    clients: BTreeMap<ClientIdentity, ClientEntry>,
}

impl ClientRegistry {
    /// Builds the registry, refusing duplicates and inconsistent entries.
    pub fn new(entries: Vec<ClientEntry>) -> Result<Self, ClientListError> {
        let mut clients = BTreeMap::new();
        let mut approver_ids = std::collections::BTreeSet::new();
        for entry in entries {
            if entry.roles == Roles::NONE {
                return Err(ClientListError::NoRoles(entry.identity));
            }
            if entry.roles.contains(Role::Approver) != entry.approver_id.is_some() {
                return Err(ClientListError::ApproverId(entry.identity));
            }
            if let Some(id) = &entry.approver_id
                && !approver_ids.insert(id.clone())
            {
                return Err(ClientListError::ApproverTwice(id.clone()));
            }
            if clients.contains_key(&entry.identity) {
                return Err(ClientListError::Duplicate(entry.identity));
            }
            clients.insert(entry.identity.clone(), entry);
        }
        Ok(Self { clients })
    }

    /// The entry a certificate's SANs name. A certificate naming two
    /// configured identities is ambiguous and matches none.
    pub fn lookup<'a>(&self, sans: impl IntoIterator<Item = &'a ClientIdentity>) -> Option<&ClientEntry> {
        let mut found = None;
        for san in sans {
            if let Some(entry) = self.clients.get(san) {
                if found.is_some() {
                    return None;
                }
                found = Some(entry);
            }
        }
        found
    }

    /// Number of configured clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is configured.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The caller of one request, as the guard established it. Handlers find
/// it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A client authenticated by certificate and found in the registry.
    Client {
        /// The identity that matched.
        identity: ClientIdentity,
        /// Its roles.
        roles: Roles,
        /// The approver id it may approve as.
        approver_id: Option<String>,
    },
    /// A plaintext connection (`--insecure-plaintext`, loopback only): no
    /// identity at all, so roles are not checked and approvals are bound
    /// only by their signatures.
    InsecurePlaintext,
}

impl Principal {
    /// The name rate limits and logs use.
    pub fn name(&self) -> String {
        match self {
            Principal::Client { identity, .. } => identity.to_string(),
            Principal::InsecurePlaintext => "insecure-plaintext".to_owned(),
        }
    }

    /// Whether this caller may submit an approval signed as `approver_id`.
    pub fn may_approve_as(&self, approver_id: &str) -> bool {
        match self {
            Principal::Client {
                approver_id: Some(bound),
                ..
            } => bound == approver_id,
            Principal::Client {
                approver_id: None, ..
            } => false,
            Principal::InsecurePlaintext => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_rpc_is_in_the_matrix_once() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let mut served = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(
            served.len() >= 20,
            "descriptor set lists {} methods",
            served.len()
        );
        for path in &served {
            let entries = RPC_ACCESS.iter().filter(|(p, _)| p == path).count();
            assert_eq!(entries, 1, "{path} must appear exactly once in RPC_ACCESS");
        }
        for (path, _) in RPC_ACCESS {
            assert!(
                served.iter().any(|s| s == path) || path.starts_with("/grpc."),
                "{path} in RPC_ACCESS is not a custos RPC"
            );
        }
        assert_eq!(rpc_access("/custos.v1.WalletService/DeleteWallet"), None);
    }

    #[test]
    fn the_auditor_reads_only_the_audit_log() {
        for (path, access) in RPC_ACCESS {
            let Access::Roles(roles) = access else { continue };
            assert_eq!(
                roles.contains(Role::Auditor),
                path.starts_with("/custos.v1.AuditService/") || path.starts_with("/grpc.reflection"),
                "{path}"
            );
        }
    }

    fn entry(identity: &str, roles: &[Role], approver_id: Option<&str>) -> ClientEntry {
        ClientEntry {
            identity: ClientIdentity::parse(identity).unwrap(),
            roles: Roles::of(roles),
            approver_id: approver_id.map(str::to_owned),
        }
    }

    #[test]
    fn registry_refuses_inconsistent_entries() {
        let alice = entry("uri:spiffe://x/alice", &[Role::Approver], Some("alice"));
        assert!(ClientRegistry::new(vec![alice.clone()]).is_ok());
        assert!(matches!(
            ClientRegistry::new(vec![alice.clone(), alice.clone()]),
            Err(ClientListError::ApproverTwice(_))
        ));
        assert!(matches!(
            ClientRegistry::new(vec![entry("uri:spiffe://x/a", &[Role::Approver], None)]),
            Err(ClientListError::ApproverId(_))
        ));
        assert!(matches!(
            ClientRegistry::new(vec![entry("uri:spiffe://x/a", &[Role::Backend], Some("a"))]),
            Err(ClientListError::ApproverId(_))
        ));
        assert!(matches!(
            ClientRegistry::new(vec![entry("dns:a.example", &[], None)]),
            Err(ClientListError::NoRoles(_))
        ));
        let twice = vec![
            entry("dns:a.example", &[Role::Backend], None),
            entry("dns:A.example", &[Role::Admin], None),
        ];
        assert!(matches!(
            ClientRegistry::new(twice),
            Err(ClientListError::Duplicate(_))
        ));
    }

    #[test]
    fn a_certificate_naming_two_clients_matches_none() {
        let registry = ClientRegistry::new(vec![
            entry("dns:backend.example", &[Role::Backend], None),
            entry("dns:admin.example", &[Role::Admin], None),
        ])
        .unwrap();
        let backend = ClientIdentity::parse("dns:backend.example").unwrap();
        let admin = ClientIdentity::parse("dns:admin.example").unwrap();
        let other = ClientIdentity::parse("uri:spiffe://x/other").unwrap();
        assert_eq!(
            registry.lookup([&other, &backend]).map(|e| e.roles),
            Some(Roles::of(&[Role::Backend]))
        );
        assert!(registry.lookup([&backend, &admin]).is_none());
        assert!(registry.lookup([&other]).is_none());
    }

    #[test]
    fn approvals_are_bound_to_the_certificate_identity() {
        let alice = Principal::Client {
            identity: ClientIdentity::parse("uri:spiffe://x/alice").unwrap(),
            roles: Roles::of(&[Role::Approver]),
            approver_id: Some("alice".into()),
        };
        assert!(alice.may_approve_as("alice"));
        assert!(!alice.may_approve_as("bob"));
        assert!(!alice.may_approve_as("alice "));
        let admin = Principal::Client {
            identity: ClientIdentity::parse("uri:spiffe://x/admin").unwrap(),
            roles: Roles::of(&[Role::Admin]),
            approver_id: None,
        };
        assert!(!admin.may_approve_as("alice"));
    }
}
