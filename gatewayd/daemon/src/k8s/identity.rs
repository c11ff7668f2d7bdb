//! Security identities: one number per set of security-relevant labels, the same on every
//! gateway that follows the same cluster, with no store of gatewayd's own (docs/kubernetes.md).
//!
//! An identity is `cluster_id << 24 | slot`. The slot is SipHash-1-3 (fixed zero key) of the
//! label set's canonical text, folded into `FIRST_SLOT..2^24` (slots below `FIRST_SLOT` are
//! reserved, e.g. for "world" and "host"). On a collision the label sets are taken in the order
//! of their canonical text, and each later one probes the next free slot: every gateway seeing
//! the same label sets computes the same table, whatever order it saw them in.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::Hasher;

pub const FIRST_SLOT: u32 = 256;
const SLOTS: u32 = (1 << 24) - FIRST_SLOT;

/// A canonical label set: sorted `source:key=value` strings.
pub type LabelSet = Vec<String>;

/// The security-relevant labels of a pod: its own labels (`k8s:`), its namespace's labels
/// (`ns:`) and the namespace name, minus the `ignore` list (keys, or prefixes ending in `/` or
/// `*`).
pub fn label_set(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
    ignore: &[String],
) -> LabelSet {
    let ignored = |key: &str| {
        ignore.iter().any(|i| match i.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None if i.ends_with('/') => key.starts_with(i.as_str()),
            None => key == i,
        })
    };
    let mut set: Vec<String> = pod_labels
        .iter()
        .filter(|(k, _)| !ignored(k))
        .map(|(k, v)| format!("k8s:{k}={v}"))
        .chain(
            namespace_labels
                .iter()
                .filter(|(k, _)| !ignored(k))
                .map(|(k, v)| format!("ns:{k}={v}")),
        )
        .chain([format!("k8s:io.kubernetes.pod.namespace={namespace}")])
        .collect();
    set.sort();
    set.dedup();
    set
}

fn slot_of(set: &LabelSet) -> u32 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    for label in set {
        h.write(label.as_bytes());
        h.write_u8(b'\n');
    }
    (h.finish() % u64::from(SLOTS)) as u32
}

/// Identities of `sets` in cluster `cluster_id` (1-255).
pub fn allocate(cluster_id: u32, sets: &BTreeSet<LabelSet>) -> BTreeMap<LabelSet, u32> {
    let mut taken = HashSet::with_capacity(sets.len());
    sets.iter()
        .map(|set| {
            let mut slot = slot_of(set);
            while !taken.insert(slot) {
                slot = (slot + 1) % SLOTS;
            }
            (set.clone(), cluster_id << 24 | (FIRST_SLOT + slot))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::labels;

    #[test]
    fn ignored_labels_do_not_split_identities() {
        let ignore = vec!["pod-template-hash".to_string(), "example.com/*".to_string()];
        let a = label_set(
            "shop",
            &labels(&[("team", "a")]),
            &labels(&[
                ("app", "web"),
                ("pod-template-hash", "abc"),
                ("example.com/x", "1"),
            ]),
            &ignore,
        );
        let b = label_set(
            "shop",
            &labels(&[("team", "a")]),
            &labels(&[("app", "web"), ("pod-template-hash", "def")]),
            &ignore,
        );
        assert_eq!(a, b);
        assert_eq!(
            a,
            ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop", "ns:team=a"]
        );
        let other_ns = label_set(
            "bank",
            &labels(&[("team", "a")]),
            &labels(&[("app", "web")]),
            &ignore,
        );
        assert_ne!(a, other_ns);
    }

    #[test]
    fn identities_are_deterministic_and_carry_the_cluster() {
        let sets: BTreeSet<LabelSet> = (0..500).map(|i| vec![format!("k8s:app=a{i}")]).collect();
        let one = allocate(7, &sets);
        let two = allocate(7, &sets);
        assert_eq!(one, two);
        let ids: HashSet<u32> = one.values().copied().collect();
        assert_eq!(ids.len(), sets.len(), "identities are unique");
        assert!(one
            .values()
            .all(|id| id >> 24 == 7 && id & 0xff_ffff >= FIRST_SLOT));
    }

    #[test]
    fn collisions_probe_in_label_order() {
        // 2^24 slots: among 20,000 label sets two share a hash (birthday bound).
        let mut seen: std::collections::HashMap<u32, LabelSet> = Default::default();
        let (a, b) = (0..20_000)
            .map(|i| vec![format!("k8s:app=a{i}")])
            .find_map(|set| {
                let slot = slot_of(&set);
                seen.insert(slot, set.clone()).map(|first| (first, set))
            })
            .expect("a collision among 20,000 sets");
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        let slot = slot_of(&low);
        let ids = allocate(1, &BTreeSet::from([high.clone(), low.clone()]));
        assert_eq!(ids[&low], 1 << 24 | (FIRST_SLOT + slot));
        assert_eq!(ids[&high], 1 << 24 | (FIRST_SLOT + (slot + 1) % SLOTS));
    }
}
