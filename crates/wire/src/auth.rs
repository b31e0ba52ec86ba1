//! Who may send what: the roles client certificates carry and the role each request needs.
//!
//! A client certificate names its role in a SAN URI (`urn:ringkv:role:read|write|admin`); a node
//! certificate (`node-ID.ringkv`) acts as admin on the client port, where nodes send joins.

use serde::{Deserialize, Serialize};

use crate::ClientRequest;

/// What a client may do. Each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads and status.
    Read,
    /// Reads and data writes.
    Write,
    /// Everything: placement, settings, leader transfer, bootstrap, join, fault injection.
    Admin,
}

/// The prefix of every gateway access token, so a leaked one is recognizable (secret scanners).
pub const TOKEN_PREFIX: &str = "rkv_";

/// A gateway access token as the placement group stores it: only the SHA-256 of the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
}

/// A new token from 32 random bytes: the prefix and the bytes in unpadded base64url.
pub fn token_from_bytes(secret: &[u8; 32]) -> String {
    use base64::Engine;
    format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
}

/// The SHA-256 of a token, as stored and compared. A lookup by hash reveals nothing of the
/// token through its timing.
pub fn token_hash(token: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `name` can name a token: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The URI prefix of the SAN that carries a client certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:ringkv:role:";

/// The role of a client certificate that names none (certificates issued before roles existed).
pub const ROLE_DEFAULT: Role = Role::Write;

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The SAN URI that carries this role.
    pub fn uri(&self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// The role a SAN URI names, if it is a role URI.
    pub fn from_uri(uri: &str) -> Option<Role> {
        Role::parse(uri.strip_prefix(ROLE_URI_PREFIX)?)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::parse(s).ok_or_else(|| format!("unknown role `{s}` (read, write or admin)"))
    }
}

/// The one rule of every protocol (client port, HTTP, Redis): a caller with role `has` may run
/// `request` only if `has` includes `needed`.
pub fn authorize(has: Role, needed: Role, request: &str, who: impl FnOnce() -> String) -> Result<(), crate::RequestError> {
    if has >= needed {
        return Ok(());
    }
    Err(crate::RequestError::PermissionDenied { request: request.into(), needed, has: who() })
}

impl ClientRequest {
    /// The least role that may send this request.
    pub fn required_role(&self) -> Role {
        match self {
            ClientRequest::GetMap
            | ClientRequest::Get { .. }
            | ClientRequest::BatchGet { .. }
            | ClientRequest::NodeStatus
            | ClientRequest::Identify
            | ClientRequest::PlacementStatus => Role::Read,
            ClientRequest::Put { .. }
            | ClientRequest::Delete { .. }
            | ClientRequest::Cas { .. }
            | ClientRequest::BatchPut { .. }
            | ClientRequest::Apply { .. } => Role::Write,
            ClientRequest::TransferLeader { .. }
            | ClientRequest::Bootstrap { .. }
            | ClientRequest::SetPartition { .. }
            | ClientRequest::JoinCluster { .. }
            | ClientRequest::Join { .. }
            | ClientRequest::SetNodeState { .. }
            | ClientRequest::SetPlacementSettings { .. }
            | ClientRequest::Drain { .. }
            | ClientRequest::Init { .. }
            | ClientRequest::CreateToken { .. }
            | ClientRequest::RevokeToken { .. }
            | ClientRequest::ListTokens => Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip_through_their_uri() {
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin);
        for r in [Role::Read, Role::Write, Role::Admin] {
            assert_eq!(Role::from_uri(&r.uri()), Some(r));
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert_eq!(Role::from_uri("urn:ringkv:role:root"), None);
        assert_eq!(Role::from_uri("https://example.com/admin"), None);
    }

    #[test]
    fn tokens_are_prefixed_hashed_and_distinct() {
        let a = token_from_bytes(&[1; 32]);
        let b = token_from_bytes(&[2; 32]);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 43, "{a}");
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(token_hash(&a), token_hash(&a.clone()));
        assert_eq!(token_hash(&a).len(), 32);
        assert!(
            valid_token_name("app-1.prod_x") && !valid_token_name("") && !valid_token_name("a b") && !valid_token_name(&"x".repeat(65))
        );
    }

    #[test]
    fn admin_requests_need_admin() {
        let admin = [
            ClientRequest::TransferLeader { shard: 1, to: 2 },
            ClientRequest::Bootstrap { nodes: vec![], shards: 1, replication: 3 },
            ClientRequest::SetPartition { isolated_from: vec![] },
            ClientRequest::JoinCluster { through: vec![] },
            ClientRequest::SetNodeState { node: 4, state: crate::NodeState::Removed, force: true },
            ClientRequest::SetPlacementSettings { settings: Default::default() },
            ClientRequest::Drain { on: true },
            ClientRequest::Init { shards: 4, replication: 3 },
            ClientRequest::CreateToken { name: "a".into(), role: Role::Read, hash: vec![] },
            ClientRequest::RevokeToken { name: "a".into() },
            ClientRequest::ListTokens,
        ];
        for r in admin {
            assert_eq!(r.required_role(), Role::Admin, "{}", r.kind());
        }
        let put = ClientRequest::Put { shard: 1, epoch: Default::default(), key: vec![], value: vec![], session: None };
        assert_eq!(put.required_role(), Role::Write);
        assert_eq!(ClientRequest::GetMap.required_role(), Role::Read);
    }

    /// Only placement requests are forwarded to the placement leader; data requests and node
    /// orders are served where they arrive.
    #[test]
    fn placement_requests_are_the_ones_forwarded() {
        let placement = [
            ClientRequest::PlacementStatus,
            ClientRequest::SetNodeState { node: 4, state: crate::NodeState::Removed, force: true },
            ClientRequest::SetPlacementSettings { settings: Default::default() },
        ];
        for r in &placement {
            assert!(r.is_placement_admin(), "{}", r.kind());
        }
        let local = [
            ClientRequest::GetMap,
            ClientRequest::NodeStatus,
            ClientRequest::TransferLeader { shard: 1, to: 2 },
            ClientRequest::SetPartition { isolated_from: vec![] },
            ClientRequest::Drain { on: false },
            ClientRequest::Init { shards: 4, replication: 3 },
        ];
        for r in &local {
            assert!(!r.is_placement_admin(), "{}", r.kind());
        }
        // Kinds name requests in refusals and metrics: distinct and readable.
        let kinds: std::collections::BTreeSet<&str> = placement.iter().chain(&local).map(|r| r.kind()).collect();
        assert_eq!(kinds.len(), placement.len() + local.len());
        assert!(kinds.iter().all(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '-') && !k.is_empty()), "{kinds:?}");
        assert_eq!(Role::Admin.to_string(), "admin");
    }
}
