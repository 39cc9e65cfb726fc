//! The audit log's Merkle tree (RFC 6962 §2.1, RFC 9162 §2.1): leaf and node
//! hashing, tree heads, inclusion and consistency proofs, and their verifiers.
//!
//! The tree is stored as its complete subtrees only. Node `(level, index)` is
//! the hash of leaves `index·2^level .. (index+1)·2^level`; it is written once,
//! when its last leaf is appended ([`append_nodes`]), and never changes. The
//! root of any tree size, and every hash a proof needs, is either one stored
//! node or a "ragged right" subtree folded from at most log2(n) of them, so
//! roots and proofs cost O(log n) reads however long the log grows.
//!
//! The verifiers ([`verify_inclusion`], [`verify_consistency`]) are pure and
//! follow RFC 9162 §2.1.3.2 and §2.1.4.2. They check the proof length against
//! the tree sizes first, so a proof of the wrong shape is refused as such; a
//! proof of the right shape that walks off its path (which the length check
//! already rules out) or lands elsewhere is a [`MerkleError::RootMismatch`].

use std::convert::Infallible;
use std::fmt;

use k256::sha2::{Digest, Sha256};

/// The root of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27,
    0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The hash of a leaf: SHA-256(0x00 || entry).
pub fn leaf_hash(entry: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(entry);
    hasher.finalize().into()
}

/// The hash of an interior node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// Why a tree computation or a proof failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError<E> {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The proof does not have the number of hashes its tree sizes call for.
    #[error("proof has {actual} hashes; the tree sizes call for {expected}")]
    WrongProofLength {
        /// Hashes the tree sizes call for.
        expected: usize,
        /// Hashes the proof has.
        actual: usize,
    },
    /// The proof does not lead to the given root (or roots).
    #[error("proof does not lead to the given root")]
    RootMismatch,
    /// A consistency proof was asked from a larger tree to a smaller one.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    SizesReversed {
        /// The old (first) tree size.
        old_size: u64,
        /// The new (second) tree size.
        new_size: u64,
    },
    /// A complete subtree the computation needs is not in the store: the tree
    /// is smaller than the size asked for, or the store is damaged.
    #[error("Merkle node at level {level}, index {index} is missing from the store")]
    MissingNode {
        /// Height of the subtree (0 = leaf).
        level: u8,
        /// Position among subtrees of that height.
        index: u64,
    },
    /// The node store failed.
    #[error("node store: {0}")]
    Store(#[source] E),
}

/// A complete subtree to store: `(level, index, hash)`.
pub type StoredNode = (u8, u64, [u8; 32]);

/// Read access to the stored complete subtrees.
pub trait NodeStore {
    /// What a failed read returns.
    type Error;

    /// Hash of the complete subtree at `level` (0 = leaves) and `index` (its
    /// position among subtrees of that size), if stored.
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, Self::Error>;
}

/// The nodes to store when leaf `leaf_index` (the tree's size before this
/// append) with hash `leaf` is appended: the leaf itself and every parent it
/// completes, as `(level, index, hash)`, lowest first.
///
/// Returns at most log2(n) + 1 nodes and reads one stored left sibling per
/// parent. If a left sibling is missing (a damaged store, or `leaf_index` is
/// not the tree's size) no parent above it is returned; the gap then surfaces
/// as [`MerkleError::MissingNode`] from every root or proof that needs it, so
/// a damaged tree never yields a root.
pub fn append_nodes<S: NodeStore>(
    store: &S,
    leaf_index: u64,
    leaf: [u8; 32],
) -> Result<Vec<StoredNode>, S::Error> {
    let mut nodes = vec![(0, leaf_index, leaf)];
    let (mut level, mut index, mut hash) = (0u8, leaf_index, leaf);
    // An odd index is a right child: appending it completes its parent.
    while index & 1 == 1 {
        let Some(left) = store.node(level, index - 1)? else {
            break;
        };
        hash = node_hash(&left, &hash);
        level += 1;
        index >>= 1;
        nodes.push((level, index, hash));
    }
    Ok(nodes)
}

/// The tree head (RFC 6962 MTH) of the first `size` leaves, folded from the
/// at most log2(n) complete subtrees that make up that size.
pub fn root<S: NodeStore>(store: &S, size: u64) -> Result<[u8; 32], MerkleError<S::Error>> {
    match size {
        0 => Ok(EMPTY_ROOT),
        _ => subtree(store, 0, size),
    }
}

/// The inclusion proof (RFC 6962 §2.1.1 PATH) of leaf `index` in the tree of
/// the first `size` leaves, lowest sibling first.
///
/// Every sibling is a complete subtree (one read) except at most one ragged
/// right subtree (at most log2(n) reads).
pub fn inclusion_proof<S: NodeStore>(
    store: &S,
    index: u64,
    size: u64,
) -> Result<Vec<[u8; 32]>, MerkleError<S::Error>> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    // Walk down from the root; the siblings come out highest first.
    let mut path = Vec::new();
    let (mut start, mut end) = (0, size);
    while end - start > 1 {
        let mid = start + split(end - start);
        if index < mid {
            path.push(subtree(store, mid, end)?);
            end = mid;
        } else {
            path.push(subtree(store, start, mid)?);
            start = mid;
        }
    }
    path.reverse();
    Ok(path)
}

/// The consistency proof (RFC 6962 §2.1.2 PROOF) that the tree of the first
/// `old_size` leaves is a prefix of the tree of the first `new_size`, lowest
/// node first. Empty when `old_size` is 0 or equals `new_size`.
///
/// Every node is a complete subtree (one read) except at most one ragged
/// right subtree (at most log2(n) reads).
pub fn consistency_proof<S: NodeStore>(
    store: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<[u8; 32]>, MerkleError<S::Error>> {
    if old_size > new_size {
        return Err(MerkleError::SizesReversed { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[start:end], whole), walked down from the root; the nodes
    // come out highest first. Invariant: start < old_size <= end.
    let mut proof = Vec::new();
    let (mut start, mut end, mut whole) = (0, new_size, true);
    while old_size != end {
        let mid = start + split(end - start);
        if old_size <= mid {
            proof.push(subtree(store, mid, end)?);
            end = mid;
        } else {
            proof.push(subtree(store, start, mid)?);
            start = mid;
            whole = false;
        }
    }
    // The old tree's own root is left out: the verifier already has it.
    if !whole {
        proof.push(subtree(store, start, end)?);
    }
    proof.reverse();
    Ok(proof)
}

/// Checks that `proof` shows the leaf with hash `leaf_hash` at `index` in the
/// tree of `size` leaves with head `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &[u8; 32],
    index: u64,
    size: u64,
    proof: &[[u8; 32]],
    root: &[u8; 32],
) -> Result<(), MerkleError<Infallible>> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    check_length(inclusion_proof_len(index, size), proof)?;
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if sn == 0 {
            return Err(MerkleError::RootMismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::RootMismatch);
    }
    check_root(&r, root)
}

/// Checks that `proof` shows the tree of `old_size` leaves with head
/// `old_root` to be a prefix of the tree of `new_size` leaves with head
/// `new_root` (RFC 9162 §2.1.4.2).
///
/// Equal sizes need an empty proof and equal roots. An old size of 0 needs an
/// empty proof and `old_root` equal to [`EMPTY_ROOT`]; the empty tree is a
/// prefix of every tree, so `new_root` is not constrained then.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &[u8; 32],
    new_root: &[u8; 32],
    proof: &[[u8; 32]],
) -> Result<(), MerkleError<Infallible>> {
    if old_size > new_size {
        return Err(MerkleError::SizesReversed { old_size, new_size });
    }
    if old_size == new_size {
        check_length(0, proof)?;
        return check_root(old_root, new_root);
    }
    if old_size == 0 {
        check_length(0, proof)?;
        return check_root(old_root, &EMPTY_ROOT);
    }
    check_length(consistency_proof_len(old_size, new_size), proof)?;

    // When the old tree is complete its root starts the path; otherwise the
    // proof's first hash does (the length check guarantees there is one).
    let (seed, rest) = match (old_size.is_power_of_two(), proof.split_first()) {
        (true, _) => (old_root, proof),
        (false, Some((first, rest))) => (first, rest),
        (false, None) => return Err(MerkleError::RootMismatch),
    };
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if sn == 0 {
            return Err(MerkleError::RootMismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::RootMismatch);
    }
    check_root(&fr, old_root)?;
    check_root(&sr, new_root)
}

/// A whole tree in memory, grown leaf by leaf: for tests and for checking a
/// log offline.
#[derive(Clone, Default)]
pub struct MemoryNodes {
    /// Complete subtrees per level, in index order: a level only ever grows
    /// at its end, so a vector per level is the whole index.
    levels: Vec<Vec<[u8; 32]>>,
    size: u64,
}

impl MemoryNodes {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends the leaf with hash `leaf` (see [`leaf_hash`]); returns its index.
    pub fn append(&mut self, leaf: [u8; 32]) -> u64 {
        let index = self.size;
        let nodes = match append_nodes(self, index, leaf) {
            Ok(nodes) => nodes,
            Err(never) => match never {},
        };
        for (level, i, hash) in nodes {
            let level = usize::from(level);
            if self.levels.len() <= level {
                self.levels.resize_with(level + 1, Vec::new);
            }
            debug_assert_eq!(self.levels[level].len() as u64, i, "subtrees complete in order");
            self.levels[level].push(hash);
        }
        // Cannot overflow: `size` counts leaves held in this map, and no
        // machine holds 2^64 of them.
        self.size += 1;
        index
    }
}

impl NodeStore for MemoryNodes {
    type Error = Infallible;

    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, Infallible> {
        Ok(self
            .levels
            .get(usize::from(level))
            .and_then(|nodes| nodes.get(usize::try_from(index).ok()?))
            .copied())
    }
}

impl fmt::Debug for MemoryNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryNodes")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// MTH of leaves `start..end`, where `start` is a multiple of a power of two
/// at least `end - start` (true of the root and of every subtree RFC 6962's
/// recursion visits). The range splits into complete subtrees of decreasing
/// size, one per set bit of `end - start`, folded right to left.
fn subtree<S: NodeStore>(store: &S, start: u64, end: u64) -> Result<[u8; 32], MerkleError<S::Error>> {
    let mut parts = Vec::new();
    let mut at = start;
    while at < end {
        // The largest aligned subtree starting at `at` that fits.
        let fits = 63 - (end - at).leading_zeros();
        let level = at.trailing_zeros().min(fits);
        parts.push(read(store, level as u8, at >> level)?);
        at += 1 << level;
    }
    // Callers pass `start < end`, so there is at least one part.
    let mut hash = parts.pop().ok_or(MerkleError::MissingNode {
        level: 0,
        index: start,
    })?;
    while let Some(left) = parts.pop() {
        hash = node_hash(&left, &hash);
    }
    Ok(hash)
}

fn read<S: NodeStore>(store: &S, level: u8, index: u64) -> Result<[u8; 32], MerkleError<S::Error>> {
    store
        .node(level, index)
        .map_err(MerkleError::Store)?
        .ok_or(MerkleError::MissingNode { level, index })
}

/// Where RFC 6962 splits a tree of `n >= 2` leaves: the largest power of two
/// smaller than `n`.
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// PATH length for leaf `index < size`: the levels where the leaf's path and
/// the last leaf's path differ, plus the complete left siblings above them.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner + border) as usize
}

/// PROOF length for `0 < old_size < new_size`: the inclusion path of the old
/// tree's last leaf, less the levels inside the old tree's rightmost complete
/// subtree, plus that subtree's root unless it is the whole old tree.
fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    let last = old_size - 1;
    let inner = 64 - (last ^ (new_size - 1)).leading_zeros();
    let border = last.checked_shr(inner).unwrap_or(0).count_ones();
    // `old_size < new_size` puts a differing bit above the trailing zeros of
    // `old_size`, so this does not underflow.
    let inner = inner - old_size.trailing_zeros();
    let seed = u32::from(!old_size.is_power_of_two());
    (inner + border + seed) as usize
}

fn check_length(expected: usize, proof: &[[u8; 32]]) -> Result<(), MerkleError<Infallible>> {
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength {
            expected,
            actual: proof.len(),
        });
    }
    Ok(())
}

fn check_root(computed: &[u8; 32], expected: &[u8; 32]) -> Result<(), MerkleError<Infallible>> {
    if computed != expected {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use proptest::prelude::*;

    use super::*;

    // Reference data for RFC 6962 trees, transcribed from
    // transparency-dev/merkle: testonly/constants.go (leaf inputs, node
    // hashes, roots) and proof/verify_test.go (inclusion and consistency
    // proofs; leaf numbers there are 1-based). The same values appear in
    // google/certificate-transparency cpp/merkletree/merkle_tree_test.cc.

    const LEAF_INPUTS: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];

    /// Roots of the trees of the first 1..=8 leaves.
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// Every complete subtree of the 8-leaf tree, by level then index.
    const NODES: [&[&str]; 4] = [
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        ],
        &[
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        ],
        &[
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
        &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
    ];

    /// (leaf index, tree size, PATH).
    const INCLUSION: [(u64, u64, &[&str]); 5] = [
        (0, 1, &[]),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    /// (old size, new size, PROOF).
    const CONSISTENCY: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    type NodeIds = &'static [(u8, u64)];

    /// Stored nodes (level, index) each proof is built from, transcribed from
    /// the node-id tables in transparency-dev/merkle proof/proof_test.go:
    /// (leaf index, tree size, nodes).
    const INCLUSION_NODES: &[(u64, u64, NodeIds)] = &[
        (0, 1, &[]),
        (0, 2, &[(0, 1)]),
        (1, 2, &[(0, 0)]),
        (1, 3, &[(0, 0), (0, 2)]),
        (0, 7, &[(0, 1), (1, 1), (0, 6), (1, 2)]),
        (1, 7, &[(0, 0), (1, 1), (0, 6), (1, 2)]),
        (2, 7, &[(0, 3), (1, 0), (0, 6), (1, 2)]),
        (3, 7, &[(0, 2), (1, 0), (0, 6), (1, 2)]),
        (4, 7, &[(0, 5), (0, 6), (2, 0)]),
        (5, 7, &[(0, 4), (0, 6), (2, 0)]),
        (6, 7, &[(1, 2), (2, 0)]),
        (2, 4, &[(0, 3), (1, 0)]),
        (3, 5, &[(0, 2), (1, 0), (0, 4)]),
        (3, 6, &[(0, 2), (1, 0), (1, 2)]),
        (4, 6, &[(0, 5), (2, 0)]),
        (10, 15, &[(0, 11), (1, 4), (0, 14), (1, 6), (3, 0)]),
        (24, 31, &[(0, 25), (1, 13), (0, 30), (1, 14), (3, 2), (4, 0)]),
        (
            81,
            95,
            &[
                (0, 80),
                (1, 41),
                (2, 21),
                (0, 94),
                (1, 46),
                (2, 22),
                (4, 4),
                (6, 0),
            ],
        ),
    ];

    /// (old size, new size, nodes), from the same file.
    const CONSISTENCY_NODES: &[(u64, u64, NodeIds)] = &[
        (1, 2, &[(0, 1)]),
        (1, 4, &[(0, 1), (1, 1)]),
        (1, 6, &[(0, 1), (1, 1), (1, 2)]),
        (2, 3, &[(0, 2)]),
        (2, 8, &[(1, 1), (2, 1)]),
        (3, 7, &[(0, 2), (0, 3), (1, 0), (0, 6), (1, 2)]),
        (4, 7, &[(0, 6), (1, 2)]),
        (5, 7, &[(0, 4), (0, 5), (0, 6), (2, 0)]),
        (6, 7, &[(1, 2), (0, 6), (2, 0)]),
        (7, 8, &[(0, 6), (0, 7), (1, 2), (2, 0)]),
        (1, 1, &[]),
        (2, 2, &[]),
        (3, 3, &[]),
        (4, 4, &[]),
        (5, 5, &[]),
        (7, 7, &[]),
        (8, 8, &[]),
        (2, 4, &[(1, 1)]),
        (3, 5, &[(0, 2), (0, 3), (1, 0), (0, 4)]),
        (3, 6, &[(0, 2), (0, 3), (1, 0), (1, 2)]),
        (4, 6, &[(1, 2)]),
        (1, 7, &[(0, 1), (1, 1), (0, 6), (1, 2)]),
        (10, 15, &[(1, 4), (1, 5), (0, 14), (1, 6), (3, 0)]),
        (24, 31, &[(3, 2), (0, 30), (1, 14), (2, 6), (4, 0)]),
        (
            81,
            95,
            &[
                (0, 80),
                (0, 81),
                (1, 41),
                (2, 21),
                (0, 94),
                (1, 46),
                (2, 22),
                (4, 4),
                (6, 0),
            ],
        ),
    ];

    const SOME_HASH: [u8; 32] = [0xab; 32];

    fn h(hex: &str) -> [u8; 32] {
        hex::decode(hex).unwrap().try_into().unwrap()
    }

    fn hashes(hex: &[&str]) -> Vec<[u8; 32]> {
        hex.iter().map(|x| h(x)).collect()
    }

    fn reference_leaves() -> Vec<[u8; 32]> {
        LEAF_INPUTS
            .iter()
            .map(|x| leaf_hash(&hex::decode(x).unwrap()))
            .collect()
    }

    fn tree_of(leaves: &[[u8; 32]]) -> MemoryNodes {
        let mut tree = MemoryNodes::new();
        for leaf in leaves {
            tree.append(*leaf);
        }
        tree
    }

    fn generated_leaves(seed: u64, n: u64) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| leaf_hash(&[seed.to_be_bytes(), i.to_be_bytes()].concat()))
            .collect()
    }

    /// A store that records every read.
    struct Counting<'a> {
        inner: &'a MemoryNodes,
        reads: RefCell<Vec<(u8, u64)>>,
    }

    impl<'a> Counting<'a> {
        fn new(inner: &'a MemoryNodes) -> Self {
            Self {
                inner,
                reads: RefCell::new(Vec::new()),
            }
        }

        fn take(&self) -> Vec<(u8, u64)> {
            self.reads.take()
        }
    }

    impl NodeStore for Counting<'_> {
        type Error = Infallible;

        fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, Infallible> {
            self.reads.borrow_mut().push((level, index));
            self.inner.node(level, index)
        }
    }

    /// A store whose every read fails.
    struct Offline;

    impl NodeStore for Offline {
        type Error = &'static str;

        fn node(&self, _: u8, _: u64) -> Result<Option<[u8; 32]>, &'static str> {
            Err("offline")
        }
    }

    // RFC 6962 §2.1, written straight from the text over a slice of leaf hashes.

    fn ref_split(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn ref_mth(d: &[[u8; 32]]) -> [u8; 32] {
        match d.len() {
            0 => EMPTY_ROOT,
            1 => d[0],
            n => {
                let k = ref_split(n);
                node_hash(&ref_mth(&d[..k]), &ref_mth(&d[k..]))
            }
        }
    }

    fn ref_path(m: usize, d: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let n = d.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = ref_split(n);
        let (mut path, sibling) = match m < k {
            true => (ref_path(m, &d[..k]), ref_mth(&d[k..])),
            false => (ref_path(m - k, &d[k..]), ref_mth(&d[..k])),
        };
        path.push(sibling);
        path
    }

    fn ref_subproof(m: usize, d: &[[u8; 32]], b: bool) -> Vec<[u8; 32]> {
        let n = d.len();
        if m == n {
            return match b {
                true => Vec::new(),
                false => vec![ref_mth(d)],
            };
        }
        let k = ref_split(n);
        let (mut proof, node) = match m <= k {
            true => (ref_subproof(m, &d[..k], b), ref_mth(&d[k..])),
            false => (ref_subproof(m - k, &d[k..], false), ref_mth(&d[..k])),
        };
        proof.push(node);
        proof
    }

    fn ref_proof(m: usize, d: &[[u8; 32]]) -> Vec<[u8; 32]> {
        match m == 0 || m == d.len() {
            true => Vec::new(),
            false => ref_subproof(m, d, true),
        }
    }

    /// The arguments of one inclusion check.
    #[derive(Clone)]
    struct Inclusion {
        leaf: [u8; 32],
        index: u64,
        size: u64,
        proof: Vec<[u8; 32]>,
        root: [u8; 32],
    }

    impl Inclusion {
        fn verify(&self) -> Result<(), MerkleError<Infallible>> {
            verify_inclusion(&self.leaf, self.index, self.size, &self.proof, &self.root)
        }

        /// Tampered variants, each of which must fail.
        fn probes(&self) -> Vec<(String, Inclusion)> {
            let mut probes = Vec::new();
            let mut probe = |what: String, change: &dyn Fn(&mut Inclusion)| {
                let mut bad = self.clone();
                change(&mut bad);
                probes.push((what, bad));
            };
            if let Some(i) = self.index.checked_sub(1) {
                probe("index - 1".into(), &|b| b.index = i);
            }
            probe("index + 1".into(), &|b| b.index += 1);
            probe("index ^ 2".into(), &|b| b.index ^= 2);
            // Not size + 1 and the like: a proof fits every size whose path
            // has the same shape, which is why a checkpoint signs the size.
            probe("size * 2".into(), &|b| b.size *= 2);
            probe("size / 2".into(), &|b| b.size /= 2);
            probe("wrong leaf".into(), &|b| b.leaf = leaf_hash(b"WrongLeaf"));
            probe("empty root".into(), &|b| b.root = EMPTY_ROOT);
            probe("some root".into(), &|b| b.root = SOME_HASH);
            for extra in [SOME_HASH, self.root, self.leaf] {
                probe("trailing hash".into(), &|b| b.proof.push(extra));
                probe("preceding hash".into(), &|b| b.proof.insert(0, extra));
            }
            if !self.proof.is_empty() {
                probe("truncated".into(), &|b| {
                    b.proof.pop();
                });
            }
            for i in 0..self.proof.len() {
                for byte in 0..32 {
                    probe(format!("proof[{i}][{byte}] flipped"), &|b| {
                        b.proof[i][byte] ^= 0x01
                    });
                }
            }
            for byte in 0..32 {
                probe(format!("leaf[{byte}] flipped"), &|b| b.leaf[byte] ^= 0x80);
                probe(format!("root[{byte}] flipped"), &|b| b.root[byte] ^= 0x80);
            }
            probes
        }
    }

    fn assert_inclusion_verifies(leaf: [u8; 32], index: u64, size: u64, proof: &[[u8; 32]], root: [u8; 32]) {
        let good = Inclusion {
            leaf,
            index,
            size,
            proof: proof.to_vec(),
            root,
        };
        assert_eq!(good.verify(), Ok(()), "{index}/{size}");
        for (what, bad) in good.probes() {
            assert!(bad.verify().is_err(), "accepted {what} at {index}/{size}");
        }
    }

    /// The arguments of one consistency check.
    #[derive(Clone)]
    struct Consistency {
        old: u64,
        new: u64,
        old_root: [u8; 32],
        new_root: [u8; 32],
        proof: Vec<[u8; 32]>,
    }

    impl Consistency {
        fn verify(&self) -> Result<(), MerkleError<Infallible>> {
            verify_consistency(self.old, self.new, &self.old_root, &self.new_root, &self.proof)
        }

        /// Tampered variants of a valid, non-empty proof; each must fail.
        fn probes(&self) -> Vec<(String, Consistency)> {
            let mut probes = Vec::new();
            let mut probe = |what: String, change: &dyn Fn(&mut Consistency)| {
                let mut bad = self.clone();
                change(&mut bad);
                probes.push((what, bad));
            };
            probe("old - 1".into(), &|b| b.old -= 1);
            probe("old + 1".into(), &|b| b.old += 1);
            probe("old ^ 2".into(), &|b| b.old ^= 2);
            probe("new * 2".into(), &|b| b.new *= 2);
            probe("new / 2".into(), &|b| b.new /= 2);
            probe("wrong old root".into(), &|b| b.old_root = SOME_HASH);
            probe("wrong new root".into(), &|b| b.new_root = SOME_HASH);
            probe("swapped roots".into(), &|b| {
                std::mem::swap(&mut b.old_root, &mut b.new_root)
            });
            probe("empty proof".into(), &|b| b.proof.clear());
            probe("truncated".into(), &|b| {
                b.proof.pop();
            });
            for extra in [SOME_HASH, self.old_root, self.new_root, self.proof[0]] {
                probe("trailing hash".into(), &|b| b.proof.push(extra));
                probe("preceding hash".into(), &|b| b.proof.insert(0, extra));
            }
            for i in 0..self.proof.len() {
                for byte in 0..32 {
                    probe(format!("proof[{i}][{byte}] flipped"), &|b| {
                        b.proof[i][byte] ^= 0x10
                    });
                }
            }
            for byte in 0..32 {
                probe(format!("old_root[{byte}] flipped"), &|b| b.old_root[byte] ^= 0x01);
                probe(format!("new_root[{byte}] flipped"), &|b| b.new_root[byte] ^= 0x01);
            }
            probes
        }
    }

    fn assert_consistency_verifies(
        old: u64,
        new: u64,
        old_root: [u8; 32],
        new_root: [u8; 32],
        proof: &[[u8; 32]],
    ) {
        let good = Consistency {
            old,
            new,
            old_root,
            new_root,
            proof: proof.to_vec(),
        };
        assert_eq!(good.verify(), Ok(()), "{old}->{new}");
        if proof.is_empty() {
            return;
        }
        for (what, bad) in good.probes() {
            assert!(bad.verify().is_err(), "accepted {what} at {old}->{new}");
        }
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(EMPTY_ROOT, <[u8; 32]>::from(Sha256::digest(b"")));
        assert_eq!(root(&MemoryNodes::new(), 0), Ok(EMPTY_ROOT));
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        let leaf = leaf_hash(b"x");
        assert_eq!(leaf, <[u8; 32]>::from(Sha256::digest(b"\x00x")));
        let node = node_hash(&[1; 32], &[2; 32]);
        let mut preimage = vec![0x01];
        preimage.extend_from_slice(&[1; 32]);
        preimage.extend_from_slice(&[2; 32]);
        assert_eq!(node, <[u8; 32]>::from(Sha256::digest(&preimage)));
    }

    #[test]
    fn reference_roots_leaf_by_leaf() {
        let leaves = reference_leaves();
        let mut tree = MemoryNodes::new();
        assert_eq!(root(&tree, 0), Ok(EMPTY_ROOT));
        for (i, leaf) in leaves.iter().enumerate() {
            assert_eq!(tree.append(*leaf), i as u64);
            assert_eq!(tree.size(), i as u64 + 1);
            // Every earlier size's root stays readable as the tree grows.
            for size in 1..=tree.size() {
                assert_eq!(root(&tree, size), Ok(h(ROOTS[size as usize - 1])), "size {size}");
            }
            // One leaf further is not stored yet.
            assert!(matches!(
                root(&tree, tree.size() + 1),
                Err(MerkleError::MissingNode { .. })
            ));
        }
    }

    #[test]
    fn reference_node_hashes_are_exactly_what_is_stored() {
        let tree = tree_of(&reference_leaves());
        let mut count = 0;
        for (level, row) in NODES.iter().enumerate() {
            for (index, hash) in row.iter().enumerate() {
                assert_eq!(
                    tree.node(level as u8, index as u64),
                    Ok(Some(h(hash))),
                    "({level}, {index})"
                );
                count += 1;
            }
        }
        assert_eq!(tree.levels.iter().map(Vec::len).sum::<usize>(), count);
    }

    #[test]
    fn reference_inclusion_proofs() {
        let leaves = reference_leaves();
        let tree = tree_of(&leaves);
        for (index, size, want) in INCLUSION {
            let want = hashes(want);
            assert_eq!(
                inclusion_proof(&tree, index, size),
                Ok(want.clone()),
                "{index}/{size}"
            );
            let root = h(ROOTS[size as usize - 1]);
            assert_inclusion_verifies(leaves[index as usize], index, size, &want, root);
        }
    }

    #[test]
    fn reference_consistency_proofs() {
        let tree = tree_of(&reference_leaves());
        for (old, new, want) in CONSISTENCY {
            let want = hashes(want);
            assert_eq!(
                consistency_proof(&tree, old, new),
                Ok(want.clone()),
                "{old}->{new}"
            );
            let (old_root, new_root) = (h(ROOTS[old as usize - 1]), h(ROOTS[new as usize - 1]));
            assert_consistency_verifies(old, new, old_root, new_root, &want);
        }
    }

    #[test]
    fn every_proof_of_the_reference_tree_matches_the_rfc() {
        let leaves = reference_leaves();
        let tree = tree_of(&leaves);
        for new in 1..=8u64 {
            let new_root = h(ROOTS[new as usize - 1]);
            for index in 0..new {
                let proof = inclusion_proof(&tree, index, new).unwrap();
                assert_eq!(proof, ref_path(index as usize, &leaves[..new as usize]));
                assert_inclusion_verifies(leaves[index as usize], index, new, &proof, new_root);
            }
            for old in 1..=new {
                let proof = consistency_proof(&tree, old, new).unwrap();
                assert_eq!(proof, ref_proof(old as usize, &leaves[..new as usize]));
                assert_consistency_verifies(old, new, h(ROOTS[old as usize - 1]), new_root, &proof);
            }
        }
    }

    #[test]
    fn proofs_read_exactly_the_nodes_transparency_dev_names() {
        let tree = tree_of(&generated_leaves(7, 128));
        let counting = Counting::new(&tree);
        for &(index, size, want) in INCLUSION_NODES {
            inclusion_proof(&counting, index, size).unwrap();
            let (mut got, mut want) = (counting.take(), want.to_vec());
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "inclusion {index}/{size}");
        }
        for &(old, new, want) in CONSISTENCY_NODES {
            consistency_proof(&counting, old, new).unwrap();
            let (mut got, mut want) = (counting.take(), want.to_vec());
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "consistency {old}->{new}");
        }
    }

    #[test]
    fn out_of_range_requests_are_refused() {
        let tree = tree_of(&reference_leaves());
        for (index, size) in [(0, 0), (1, 0), (1, 1), (2, 1), (8, 7), (8, 8)] {
            let err = MerkleError::IndexOutOfRange { index, size };
            assert_eq!(inclusion_proof(&tree, index, size), Err(err.clone()));
            assert_eq!(
                verify_inclusion(&SOME_HASH, index, size, &[], &SOME_HASH),
                Err(err)
            );
        }
        for (old, new) in [(1, 0), (9, 8), (6, 3)] {
            let err = MerkleError::SizesReversed {
                old_size: old,
                new_size: new,
            };
            assert_eq!(consistency_proof(&tree, old, new), Err(err.clone()));
            assert_eq!(
                verify_consistency(old, new, &SOME_HASH, &SOME_HASH, &[]),
                Err(err)
            );
        }
        // Beyond the stored tree: a missing node, never a made-up hash.
        assert_eq!(
            inclusion_proof(&tree, 0, 9),
            Err(MerkleError::MissingNode { level: 0, index: 8 })
        );
        assert_eq!(
            consistency_proof(&tree, 3, 9),
            Err(MerkleError::MissingNode { level: 0, index: 8 })
        );
        assert_eq!(consistency_proof(&tree, 0, 9), Ok(Vec::new()));
    }

    #[test]
    fn trivial_consistency() {
        let root8 = h(ROOTS[7]);
        // Equal sizes: empty proof and equal roots.
        assert_eq!(verify_consistency(8, 8, &root8, &root8, &[]), Ok(()));
        assert_eq!(verify_consistency(0, 0, &EMPTY_ROOT, &EMPTY_ROOT, &[]), Ok(()));
        assert_eq!(
            verify_consistency(8, 8, &root8, &SOME_HASH, &[]),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(8, 8, &root8, &root8, &[root8]),
            Err(MerkleError::WrongProofLength {
                expected: 0,
                actual: 1
            })
        );
        // The empty tree is a prefix of any tree, but its root must be right.
        assert_eq!(verify_consistency(0, 8, &EMPTY_ROOT, &root8, &[]), Ok(()));
        assert_eq!(
            verify_consistency(0, 8, &SOME_HASH, &root8, &[]),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(0, 8, &EMPTY_ROOT, &root8, &[EMPTY_ROOT]),
            Err(MerkleError::WrongProofLength {
                expected: 0,
                actual: 1
            })
        );
        // A growing tree needs a proof.
        assert_eq!(
            verify_consistency(1, 2, &h(ROOTS[0]), &h(ROOTS[1]), &[]),
            Err(MerkleError::WrongProofLength {
                expected: 1,
                actual: 0
            })
        );
    }

    #[test]
    fn precise_verifier_errors() {
        let leaves = reference_leaves();
        let proof = hashes(INCLUSION[2].2);
        let root8 = h(ROOTS[7]);
        assert_eq!(verify_inclusion(&leaves[5], 5, 8, &proof, &root8), Ok(()));
        assert_eq!(
            verify_inclusion(&leaves[5], 5, 8, &proof[..2], &root8),
            Err(MerkleError::WrongProofLength {
                expected: 3,
                actual: 2
            })
        );
        assert_eq!(
            verify_inclusion(&leaves[4], 5, 8, &proof, &root8),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_inclusion(&leaves[5], 5, 8, &proof, &h(ROOTS[6])),
            Err(MerkleError::RootMismatch)
        );
    }

    /// A tree with some stored nodes hidden, as a damaged store would be.
    struct Without<'a>(&'a MemoryNodes, Vec<(u8, u64)>);

    impl NodeStore for Without<'_> {
        type Error = Infallible;

        fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, Infallible> {
            if self.1.contains(&(level, index)) {
                return Ok(None);
            }
            self.0.node(level, index)
        }
    }

    #[test]
    fn missing_nodes_and_store_failures_are_reported() {
        let full = tree_of(&reference_leaves());
        let tree = Without(&full, vec![(1, 2)]);
        assert_eq!(root(&tree, 8), Ok(h(ROOTS[7])));
        assert_eq!(
            root(&tree, 6),
            Err(MerkleError::MissingNode { level: 1, index: 2 })
        );
        assert_eq!(
            inclusion_proof(&tree, 0, 6),
            Err(MerkleError::MissingNode { level: 1, index: 2 })
        );
        assert_eq!(
            consistency_proof(&tree, 5, 7),
            Ok(hashes(&[NODES[0][4], NODES[0][5], NODES[0][6], NODES[2][0]]))
        );
        assert_eq!(
            consistency_proof(&tree, 6, 7),
            Err(MerkleError::MissingNode { level: 1, index: 2 })
        );

        assert_eq!(root(&Offline, 3), Err(MerkleError::Store("offline")));
        assert_eq!(
            inclusion_proof(&Offline, 0, 2),
            Err(MerkleError::Store("offline"))
        );
        assert_eq!(
            consistency_proof(&Offline, 1, 2),
            Err(MerkleError::Store("offline"))
        );
        assert_eq!(append_nodes(&Offline, 1, SOME_HASH), Err("offline"));
        assert_eq!(append_nodes(&Offline, 2, SOME_HASH), Ok(vec![(0, 2, SOME_HASH)]));
    }

    #[test]
    fn append_stops_below_a_missing_left_sibling() {
        let seven = tree_of(&reference_leaves()[..7]);
        let tree = Without(&seven, vec![(1, 2)]);
        let leaf = reference_leaves()[7];
        // Leaf 7 completes (1, 3) from (0, 6); (2, 1) needs the missing (1, 2).
        let nodes = append_nodes(&tree, 7, leaf).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0], (0, 7, leaf));
        assert_eq!(nodes[1].0, 1);
        assert_eq!(nodes[1].1, 3);
        // Without (0, 6), nothing above the leaf.
        let tree = Without(&seven, vec![(1, 2), (0, 6)]);
        assert_eq!(append_nodes(&tree, 7, leaf), Ok(vec![(0, 7, leaf)]));
    }

    #[test]
    fn append_reads_one_node_per_completed_parent() {
        let leaves = generated_leaves(3, 1 << 12);
        let mut tree = MemoryNodes::new();
        for (i, leaf) in leaves.iter().enumerate() {
            let i = i as u64;
            let counting = Counting::new(&tree);
            let nodes = append_nodes(&counting, i, *leaf).unwrap();
            let parents = i.trailing_ones() as usize;
            assert_eq!(counting.take().len(), parents, "leaf {i}");
            assert_eq!(nodes.len(), parents + 1, "leaf {i}");
            tree.append(*leaf);
        }
        assert_eq!(root(&tree, tree.size()), Ok(ref_mth(&leaves)));
    }

    #[test]
    fn every_proof_up_to_64_leaves_matches_the_rfc() {
        let leaves = generated_leaves(1, 64);
        let tree = tree_of(&leaves);
        for new in 1..=64usize {
            let d = &leaves[..new];
            let new_root = ref_mth(d);
            let n = new as u64;
            assert_eq!(root(&tree, n), Ok(new_root));
            for index in 0..new {
                let proof = inclusion_proof(&tree, index as u64, n).unwrap();
                assert_eq!(proof, ref_path(index, d), "{index}/{new}");
                assert_eq!(proof.len(), inclusion_proof_len(index as u64, n));
                assert_eq!(
                    verify_inclusion(&d[index], index as u64, n, &proof, &new_root),
                    Ok(())
                );
            }
            for old in 0..=new {
                let proof = consistency_proof(&tree, old as u64, n).unwrap();
                assert_eq!(proof, ref_proof(old, d), "{old}->{new}");
                let old_root = ref_mth(&leaves[..old]);
                assert_eq!(
                    verify_consistency(old as u64, n, &old_root, &new_root, &proof),
                    Ok(())
                );
            }
        }
    }

    #[test]
    fn proofs_at_a_million_leaves_read_o_log_n_nodes() {
        const N: u64 = 1_000_000;
        let mut tree = MemoryNodes::new();
        for i in 0..N {
            tree.append(leaf_hash(&i.to_be_bytes()));
        }
        let depth = 64 - (N - 1).leading_zeros() as usize; // ceil(log2 N) = 20
        let bound = 2 * depth + 2;
        let counting = Counting::new(&tree);

        let head = root(&counting, N).unwrap();
        assert_eq!(counting.take().len(), N.count_ones() as usize);

        for index in [0, 1, 2, 511_999, 524_287, 524_288, 777_777, 999_998, N - 1] {
            let proof = inclusion_proof(&counting, index, N).unwrap();
            let reads = counting.take().len();
            assert!(reads <= bound, "inclusion {index}: {reads} reads > {bound}");
            let leaf = leaf_hash(&index.to_be_bytes());
            assert_eq!(verify_inclusion(&leaf, index, N, &proof, &head), Ok(()));
        }
        for old in [1, 2, 3, 1000, 123_457, 524_287, 524_288, 524_289, 999_999] {
            let proof = consistency_proof(&counting, old, N).unwrap();
            let reads = counting.take().len();
            assert!(reads <= bound, "consistency {old}: {reads} reads > {bound}");
            let old_root = root(&tree, old).unwrap();
            assert_eq!(verify_consistency(old, N, &old_root, &head, &proof), Ok(()));
        }
        // A proof within an older tree size is just as cheap.
        let proof = consistency_proof(&counting, 300_001, 700_001).unwrap();
        assert!(counting.take().len() <= bound);
        let (r1, r2) = (root(&tree, 300_001).unwrap(), root(&tree, 700_001).unwrap());
        assert_eq!(verify_consistency(300_001, 700_001, &r1, &r2, &proof), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_the_rfc_reference(
            (new, old, extra, seed) in (1u64..=300)
                .prop_flat_map(|new| (Just(new), 0..=new, 0u64..40, any::<u64>())),
            probe in any::<u64>(),
        ) {
            // Store more leaves than the tree size asked about, as a live log does.
            let leaves = generated_leaves(seed, new + extra);
            let tree = tree_of(&leaves);
            let d = &leaves[..new as usize];
            let new_root = ref_mth(d);
            prop_assert_eq!(root(&tree, new), Ok(new_root));

            for index in 0..new {
                let proof = inclusion_proof(&tree, index, new).unwrap();
                prop_assert_eq!(&proof, &ref_path(index as usize, d));
                prop_assert_eq!(verify_inclusion(&d[index as usize], index, new, &proof, &new_root), Ok(()));
            }

            let old_root = ref_mth(&leaves[..old as usize]);
            prop_assert_eq!(root(&tree, old), Ok(old_root));
            let proof = consistency_proof(&tree, old, new).unwrap();
            prop_assert_eq!(&proof, &ref_proof(old as usize, d));
            prop_assert_eq!(verify_consistency(old, new, &old_root, &new_root, &proof), Ok(()));

            // Any one flipped bit in a non-empty proof is caught.
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let i = (probe % bad.len() as u64) as usize;
                bad[i][((probe >> 16) % 32) as usize] ^= 1 << ((probe >> 24) % 8);
                prop_assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err());
            }
            let index = probe % new;
            let mut bad = inclusion_proof(&tree, index, new).unwrap();
            if !bad.is_empty() {
                let i = ((probe >> 32) % bad.len() as u64) as usize;
                bad[i][((probe >> 40) % 32) as usize] ^= 1 << ((probe >> 48) % 8);
                prop_assert!(verify_inclusion(&d[index as usize], index, new, &bad, &new_root).is_err());
            }
        }
    }
}
