//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, "Maglev: A Fast and
//! Reliable Software Network Load Balancer", §3.4).
//!
//! The lookup table is computed here, in userspace, and handed to the XDP
//! program, which only indexes it with a flow hash. Because the data path is
//! direct server return and several gateways announce the same VIP, a flow may
//! land on any gateway (ECMP reshuffles, failover). Every gateway therefore
//! has to compute a *byte-identical* table from the same configuration, or a
//! connection would be sent to different backends depending on which gateway
//! saw its packet. That is why this module:
//!
//! * sorts backends by their key before doing anything, so the caller's order
//!   does not matter;
//! * hashes with SipHash-1-3 keyed from the configured seed, never with std's
//!   `DefaultHasher`/`RandomState` (randomised per process, and its algorithm
//!   is allowed to change between Rust releases);
//! * uses only integer arithmetic (no floating point) when weighting.
//!
//! # Wire contract
//!
//! Changing any of the following changes the tables, so gateways running
//! different versions would disagree for as long as both are deployed:
//!
//! 1. Hash: SipHash-1-3 with 128-bit output (`siphasher::sip128`) over the
//!    raw key bytes (no length prefix), keys `k0 = seed` and
//!    `k1 = seed ^ u64::from_le_bytes(*b"gwd-mglv")`. Its two 64-bit words
//!    give `offset = h1 % M` and `skip = h2 % (M - 1) + 1`.
//! 2. Backend set: entries with weight 0 are dropped; the rest are sorted by
//!    key bytes (lexicographically); entries with equal keys are merged into
//!    one member whose weight is the sum of theirs.
//! 3. Population order: the k-th slot claim (k = 1, 2, ...) of a member with
//!    weight `w` happens at virtual time `(2k - 1) / w`; claims are served in
//!    increasing time, ties by position in the sorted order. A claim walks the
//!    member's permutation `offset, offset + skip, ...` (mod M) from where its
//!    previous claim stopped and takes the first empty slot.
//!
//! The `golden_table_is_stable` test pins the resulting table so an accidental
//! change fails loudly.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use siphasher::sip128::SipHasher13;

/// Default lookup-table size: prime, and at least 100 slots per backend (the
/// paper's M >= 100 N for an even spread) for services of up to ~160
/// backends, while a rebuild for 1000 backends stays around a millisecond.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Largest accepted table size (the Mersenne prime 2^17 - 1): keeps the table
/// (4 bytes per slot, 512 KiB) a reasonable BPF map value and a rebuild for
/// 1000 backends within tens of milliseconds.
pub const MAX_TABLE_SIZE: u32 = 131071;

/// Smallest accepted table size. Anything smaller cannot spread load over
/// more than a handful of backends and is almost certainly a typo.
pub const MIN_TABLE_SIZE: u32 = 7;

/// Mixed into the seed to form SipHash's second key, so that the two key
/// halves differ even for seed 0. Part of the wire contract.
const SEED_DOMAIN: u64 = u64::from_le_bytes(*b"gwd-mglv");

/// One backend as seen by the Maglev table builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity of the backend, e.g. the bytes of `"10.1.0.5:80"`. It
    /// alone decides the backend's slot preferences, so it must be spelled the
    /// same on every gateway and must not change when only the weight does.
    pub key: &'a [u8],
    /// Relative share of the table. 0 means "present but drained": the
    /// backend gets no slots.
    pub weight: u32,
}

/// Checks that `n` can be used as a Maglev table size.
///
/// The size must be prime: each backend's preference list is
/// `offset + j * skip (mod n)` with `1 <= skip < n`, which only visits every
/// slot when `skip` is coprime with `n` — guaranteed for every `skip` only if
/// `n` is prime. The error message says which rule `n` breaks.
pub fn validate_table_size(n: u32) -> Result<(), String> {
    if n < MIN_TABLE_SIZE {
        return Err(format!(
            "maglev table size {n} is too small: the minimum is {MIN_TABLE_SIZE}"
        ));
    }
    if n > MAX_TABLE_SIZE {
        return Err(format!(
            "maglev table size {n} is too large: the maximum is {MAX_TABLE_SIZE}"
        ));
    }
    if !is_prime(n) {
        return Err(format!(
            "maglev table size {n} is not prime: a prime size is required so every \
             backend's permutation covers the whole table (e.g. 16381, 65521, 131071)"
        ));
    }
    Ok(())
}

/// Trial division; `n <= MAX_TABLE_SIZE` needs at most ~180 odd divisors.
fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds the Maglev lookup table.
///
/// Returns `table_size` entries; `table[i]` is an index into `backends` (the
/// caller's order). Returns an empty `Vec` when no backend has a non-zero
/// weight, which the caller treats as "no backend".
///
/// * Order independence: for any permutation of `backends`, mapping each entry
///   through `backends[table[i]].key` yields the same sequence of keys.
/// * Weights: a member with weight `w` gets `table_size * w / total` slots,
///   rounded (Sainte-Laguë divisors), independent of the other weights'
///   magnitudes.
/// * Duplicate keys name the same real server, so they are merged: the key
///   gets the summed weight of its entries (as if they were distinct backends
///   sharing one server) and its slots point at the lowest caller index among
///   its non-zero-weight entries. The key-mapped table stays order independent.
///
/// Cost for N backends, C distinct weights and table size M: O(N log N)
/// sorting and N hashes, then M slot claims costing O(log C) scheduling each
/// (O(1) when all weights are equal) plus expected O(log M) probes. All
/// buffers are allocated up front; the population loop allocates nothing.
///
/// # Panics
///
/// If `validate_table_size(table_size)` fails (callers validate configuration
/// first; a non-prime size would make population loop forever), or if
/// `backends` has more than 2^32 entries (indices must fit the `u32` table).
pub fn build_table(backends: &[MaglevBackend<'_>], table_size: u32, seed: u64) -> Vec<u32> {
    if let Err(why) = validate_table_size(table_size) {
        panic!("maglev::build_table: {why}");
    }
    let members = members(backends);
    if members.is_empty() {
        return Vec::new();
    }

    let m = u64::from(table_size);
    let hasher = SipHasher13::new_with_keys(seed, seed ^ SEED_DOMAIN);
    let mut walks: Vec<Walk> = members
        .iter()
        .map(|member| {
            // Hash128's fields are plain integers computed from little-endian
            // loads, so they are identical on every platform (unlike
            // `as_u64()`, which byte-swaps on big-endian hosts).
            let h = hasher.hash(member.key);
            Walk {
                // Both remainders are < table_size, so they fit in u32.
                pos: (h.h1 % m) as u32,
                skip: (h.h2 % (m - 1)) as u32 + 1,
                target: member.index,
            }
        })
        .collect();

    // Every slot is written exactly once below, so the initial value is moot.
    let mut table = vec![0; table_size as usize];
    // Occupancy lives in a separate bitmap (16 KiB at the largest size) rather
    // than in a sentinel value in `table` (512 KiB): probes are random reads,
    // and a bitmap that stays in L1 measured ~15% faster at the largest size.
    let mut taken = vec![0u64; (table_size as usize).div_ceil(64)];

    // Each claim takes exactly one slot, so `table_size` claims fill the table.
    for rank in Schedule::new(&members).take(table_size as usize) {
        let walk = &mut walks[rank];
        table[walk.claim(&mut taken, table_size)] = walk.target;
    }
    table
}

/// Slots per caller index in the table [`build_table`] returns for the same arguments, without
/// building it: each claim of the population order takes exactly one slot, so counting the
/// first `table_size` claims is enough. No hashing or probing: O(M) for equal weights, a
/// small fraction of a build.
///
/// # Panics
///
/// As [`build_table`].
pub fn slot_counts(backends: &[MaglevBackend<'_>], table_size: u32) -> Vec<u32> {
    if let Err(why) = validate_table_size(table_size) {
        panic!("maglev::slot_counts: {why}");
    }
    let mut counts = vec![0; backends.len()];
    let members = members(backends);
    if !members.is_empty() {
        for rank in Schedule::new(&members).take(table_size as usize) {
            counts[members[rank].index as usize] += 1;
        }
    }
    counts
}

/// A distinct backend key with its merged weight, in sorted-key order.
struct Member<'a> {
    key: &'a [u8],
    /// Sum of the weights of all entries with this key; u64 cannot overflow
    /// because there are at most 2^32 entries of less than 2^32 each.
    weight: u64,
    /// Caller index the member's slots point at.
    index: u32,
}

/// Drops weight-0 entries, sorts by key and merges duplicate keys, which makes
/// everything downstream independent of the caller's order.
fn members<'a>(backends: &[MaglevBackend<'a>]) -> Vec<Member<'a>> {
    let mut members: Vec<Member<'a>> = backends
        .iter()
        .enumerate()
        .filter(|(_, backend)| backend.weight > 0)
        .map(|(index, backend)| Member {
            key: backend.key,
            weight: u64::from(backend.weight),
            index: u32::try_from(index).expect("maglev::build_table: over 2^32 backends"),
        })
        .collect();
    // The index tie-break puts the lowest caller index first among duplicates,
    // so that entry is the one `dedup_by` keeps.
    members.sort_unstable_by(|a, b| a.key.cmp(b.key).then(a.index.cmp(&b.index)));
    members.dedup_by(|later, kept| {
        let duplicate = later.key == kept.key;
        if duplicate {
            kept.weight += later.weight;
        }
        duplicate
    });
    members
}

/// A member's progress along its Maglev permutation
/// `offset, offset + skip, offset + 2 * skip, ... (mod M)`.
///
/// Keeping the current position and adding `skip` (with one conditional
/// subtraction) replaces the paper's per-step `(offset + j * skip) % M`.
struct Walk {
    pos: u32,
    skip: u32,
    target: u32,
}

impl Walk {
    /// Marks the member's next preferred slot that is still free as taken in
    /// the `taken` bitmap of an `m`-slot table and returns it.
    ///
    /// Terminates while the table has a free slot: a permutation visits every
    /// slot once per `m` steps, and every slot this walk has already passed is
    /// taken (slots are never freed), so a free slot is ahead.
    fn claim(&mut self, taken: &mut [u64], m: u32) -> usize {
        loop {
            let slot = self.pos as usize;
            // pos, skip < m <= MAX_TABLE_SIZE, so the sum cannot overflow.
            self.pos += self.skip;
            if self.pos >= m {
                self.pos -= m;
            }
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            if taken[word] & bit == 0 {
                taken[word] |= bit;
                return slot;
            }
        }
    }
}

/// The order in which members claim slots (wire contract item 3): an endless
/// sequence of member ranks.
///
/// A member's k-th claim is due at virtual time `(2k - 1) / weight`. This is
/// the weighted generalisation of the paper's round-robin: with equal weights
/// all members' k-th claims tie and are served in rank order, which is exactly
/// the original algorithm. With unequal weights a member claims at a rate
/// proportional to its weight, so when the table fills up after M claims at
/// time T it holds `round(T * w)` slots: Sainte-Laguë apportionment of M,
/// within about one slot of `M * w / total`. The `- 1` (half-integer
/// divisors) is what makes it round rather than floor; floor would
/// systematically favour heavy backends. A member's schedule depends only on
/// its own weight, not on the largest or total weight, so adding or removing
/// another backend does not reorder it, which keeps disruption close to the
/// unweighted case.
///
/// Members of equal weight have identical schedules, so they are scheduled as
/// one weight class: the heap holds one entry per distinct weight, and each
/// entry releases the whole class's claims at once. With equal weights (the
/// common configuration) scheduling thus costs O(1) per slot instead of the
/// O(log N) of a heap over members, which was most of the build time.
struct Schedule {
    /// The next claim time of every class not in `current`.
    pending: BinaryHeap<ClassTurn>,
    /// The classes whose claims fill `due`; rescheduled once it is consumed.
    current: Vec<ClassTurn>,
    /// Member ranks sorted by (weight, rank): every class is a contiguous run
    /// in rank order.
    by_weight: Vec<usize>,
    /// Ranks with a claim due at the current time, in rank order.
    due: Vec<usize>,
    /// Position of the next claim in `due`.
    next: usize,
}

impl Schedule {
    fn new(members: &[Member<'_>]) -> Self {
        let mut by_weight: Vec<usize> = (0..members.len()).collect();
        by_weight.sort_unstable_by_key(|&rank| (members[rank].weight, rank));
        let mut pending = BinaryHeap::new();
        let mut start = 0;
        for class in by_weight.chunk_by(|&a, &b| members[a].weight == members[b].weight) {
            pending.push(ClassTurn {
                numerator: 1,
                weight: members[class[0]].weight,
                members: start..start + class.len(),
            });
            start += class.len();
        }
        Schedule {
            current: Vec::with_capacity(pending.len()),
            pending,
            by_weight,
            due: Vec::with_capacity(members.len()),
            next: 0,
        }
    }

    /// Reschedules the classes just served and gathers the claims due at the
    /// next claim time. Classes of different weights can be due at the same
    /// time (e.g. weights 1 and 3 at times 1, 3, 5, ...); their members are
    /// then merged into rank order, as if each member had its own turn.
    fn advance(&mut self) {
        for mut class in self.current.drain(..) {
            class.numerator += 2;
            self.pending.push(class);
        }
        let first = self.pending.pop().expect("there is at least one class");
        while let Some(tied) = self.pending.peek() {
            if tied.due_cmp(&first).is_ne() {
                break;
            }
            self.current.extend(self.pending.pop());
        }
        self.current.push(first);

        self.due.clear();
        for class in &self.current {
            self.due.extend_from_slice(&self.by_weight[class.members.clone()]);
        }
        if self.current.len() > 1 {
            self.due.sort_unstable();
        }
        self.next = 0;
    }
}

impl Iterator for Schedule {
    type Item = usize;

    /// Never returns `None`: the caller takes as many claims as it has slots.
    fn next(&mut self) -> Option<usize> {
        if self.next == self.due.len() {
            self.advance();
        }
        let rank = self.due[self.next];
        self.next += 1;
        Some(rank)
    }
}

/// The next claim of one weight class, due at virtual time
/// `numerator / weight` where `numerator = 2k - 1` for the k-th claim.
struct ClassTurn {
    numerator: u64,
    weight: u64,
    /// The class's run in `Schedule::by_weight`.
    members: Range<usize>,
}

impl ClassTurn {
    /// Compares due times `numerator / weight` exactly by cross-multiplying:
    /// integer-only, so identical on every platform. numerator < 2^19 and
    /// weight < 2^64, so the products fit in u128.
    fn due_cmp(&self, other: &Self) -> Ordering {
        let mine = u128::from(self.numerator) * u128::from(other.weight);
        let theirs = u128::from(other.numerator) * u128::from(self.weight);
        mine.cmp(&theirs)
    }
}

impl Ord for ClassTurn {
    /// `BinaryHeap` pops the greatest element, so the class due first must
    /// compare greatest. Weights are distinct across classes, which makes the
    /// order total; which of two tied classes pops first does not matter
    /// because `advance` serves tied classes together.
    fn cmp(&self, other: &Self) -> Ordering {
        self.due_cmp(other).reverse().then(self.weight.cmp(&other.weight))
    }
}

impl PartialOrd for ClassTurn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ClassTurn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ClassTurn {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Distinct, realistic backend keys: "10.1.X.Y:80".
    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:80", i / 250, i % 250 + 1))
            .collect()
    }

    fn weighted<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .map(|(key, &weight)| MaglevBackend {
                key: key.as_bytes(),
                weight,
            })
            .collect()
    }

    fn equal(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        weighted(keys, &vec![1; keys.len()])
    }

    /// The table expressed as keys: the order-independent view of it.
    fn by_key<'a>(backends: &[MaglevBackend<'a>], table: &[u32]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| backends[i as usize].key).collect()
    }

    /// Slots per caller index.
    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
    }

    fn moved(before: &[&[u8]], after: &[&[u8]]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    /// Outcome of removing (or, read backwards, adding) one backend.
    struct Disruption {
        /// Slots whose backend changed, as a fraction of the table.
        moved: f64,
        /// Slots that changed although they did not belong to the removed
        /// backend, as a fraction of the table: the cost above the ideal.
        extra: f64,
    }

    /// Removes backend `victim` from `backends` and measures what moves.
    fn remove_one(backends: &[MaglevBackend<'_>], victim: usize, size: u32, seed: u64) -> Disruption {
        let full = build_table(backends, size, seed);
        let mut rest = backends.to_vec();
        rest.remove(victim);
        let reduced = build_table(&rest, size, seed);

        let owned = full.iter().filter(|&&i| i as usize == victim).count();
        let moved = moved(&by_key(backends, &full), &by_key(&rest, &reduced));
        // Every slot of the removed backend must move; the rest is extra.
        assert!(moved >= owned);
        let m = f64::from(size);
        Disruption {
            moved: moved as f64 / m,
            extra: (moved - owned) as f64 / m,
        }
    }

    #[test]
    fn validate_accepts_primes_in_range() {
        for n in [MIN_TABLE_SIZE, 251, DEFAULT_TABLE_SIZE, 65521, MAX_TABLE_SIZE] {
            assert_eq!(validate_table_size(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn validate_rejects_and_says_why() {
        for n in [0, 1, 2, 5] {
            let err = validate_table_size(n).unwrap_err();
            assert!(err.contains("too small"), "{n}: {err}");
        }
        for n in [MAX_TABLE_SIZE + 1, 131101, u32::MAX] {
            let err = validate_table_size(n).unwrap_err();
            assert!(err.contains("too large"), "{n}: {err}");
        }
        for n in [9, 16380, 16383, 65536, 131069] {
            let err = validate_table_size(n).unwrap_err();
            assert!(err.contains("not prime"), "{n}: {err}");
        }
    }

    #[test]
    fn is_prime_matches_sieve() {
        let limit = MAX_TABLE_SIZE as usize + 1;
        let mut composite = vec![false; limit];
        for p in 2..limit {
            if !composite[p] {
                for multiple in (p * p..limit).step_by(p) {
                    composite[multiple] = true;
                }
            }
        }
        for (n, &is_composite) in composite.iter().enumerate() {
            assert_eq!(is_prime(n as u32), n >= 2 && !is_composite, "{n}");
        }
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn build_panics_on_invalid_size() {
        let keys = keys(3);
        build_table(&equal(&keys), 16380, 0);
    }

    #[test]
    fn empty_input_gives_empty_table() {
        assert!(build_table(&[], DEFAULT_TABLE_SIZE, 0).is_empty());
        let keys = keys(4);
        let drained = weighted(&keys, &[0, 0, 0, 0]);
        assert!(build_table(&drained, DEFAULT_TABLE_SIZE, 0).is_empty());
    }

    #[test]
    fn zero_weight_backends_get_no_slots() {
        let keys = keys(5);
        let backends = weighted(&keys, &[0, 3, 0, 1, 2]);
        let table = build_table(&backends, DEFAULT_TABLE_SIZE, 9);
        let counts = counts(&table, backends.len());
        assert_eq!(counts[0], 0);
        assert_eq!(counts[2], 0);
        // Draining (weight 0) is the same as removing the backend.
        let live = [backends[1], backends[3], backends[4]];
        let live_table = build_table(&live, DEFAULT_TABLE_SIZE, 9);
        assert_eq!(by_key(&backends, &table), by_key(&live, &live_table));
    }

    #[test]
    fn single_backend_owns_every_slot() {
        let keys = keys(1);
        let table = build_table(&equal(&keys), MIN_TABLE_SIZE, 1);
        assert_eq!(table, vec![0; MIN_TABLE_SIZE as usize]);
    }

    #[test]
    fn seed_changes_the_table_and_nothing_else_does() {
        let keys = keys(20);
        let backends = equal(&keys);
        let a = build_table(&backends, DEFAULT_TABLE_SIZE, 1);
        assert_eq!(a, build_table(&backends, DEFAULT_TABLE_SIZE, 1));
        let b = build_table(&backends, DEFAULT_TABLE_SIZE, 2);
        // Independent permutations agree on about 1/20 of the slots.
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < DEFAULT_TABLE_SIZE as usize / 10, "{same}");
    }

    /// Pins the wire contract: if this fails, tables differ from those of
    /// gateways running the previous code. Only update the constants together
    /// with a deliberate, documented contract change.
    #[test]
    fn golden_table_is_stable() {
        let keys = ["10.1.0.5:80", "10.1.0.6:80", "10.1.0.7:8080", "[fd00::1]:443"];
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .zip([1, 2, 3, 4])
            .map(|(key, weight)| MaglevBackend {
                key: key.as_bytes(),
                weight,
            })
            .collect();
        let table = build_table(&backends, 31, 0x5eed);
        assert_eq!(table, GOLDEN_31);

        let big = build_table(&backends, DEFAULT_TABLE_SIZE, 0x5eed);
        let bytes: Vec<u8> = big.iter().flat_map(|i| i.to_le_bytes()).collect();
        let fingerprint = SipHasher13::new_with_keys(0, 0).hash(&bytes);
        assert_eq!((fingerprint.h1, fingerprint.h2), GOLDEN_16381_FINGERPRINT);
    }

    const GOLDEN_31: [u32; 31] = [
        0, 3, 3, 2, 1, 3, 2, 0, 3, 2, 3, 3, 1, 2, 3, 1, 2, 2, 3, 3, 2, 1, 3, 2, 0, 3, 1, 3, 3, 1, 2,
    ];
    const GOLDEN_16381_FINGERPRINT: (u64, u64) = (1277662950895774883, 15093077928265908807);

    /// Every member's first `claims` claims, sorted by (due time, rank): the
    /// contract's population order computed the obvious way.
    fn brute_force_order(weights: &[u64], claims: usize) -> Vec<usize> {
        let mut events: Vec<(u64, u64, usize)> = weights
            .iter()
            .enumerate()
            .flat_map(|(rank, &weight)| (1..=claims as u64).map(move |k| (2 * k - 1, weight, rank)))
            .collect();
        events.sort_by(|a, b| {
            let lhs = u128::from(a.0) * u128::from(b.1);
            let rhs = u128::from(b.0) * u128::from(a.1);
            lhs.cmp(&rhs).then(a.2.cmp(&b.2))
        });
        events.iter().take(claims).map(|event| event.2).collect()
    }

    fn schedule_order(weights: &[u64], claims: usize) -> Vec<usize> {
        let members: Vec<Member<'_>> = weights
            .iter()
            .map(|&weight| Member {
                key: b"",
                weight,
                index: 0,
            })
            .collect();
        Schedule::new(&members).take(claims).collect()
    }

    #[test]
    fn equal_weights_schedule_is_the_papers_round_robin() {
        let order = schedule_order(&[5; 4], 10);
        assert_eq!(order, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]);
    }

    #[test]
    fn equal_weights_split_evenly() {
        let keys = keys(7);
        let table = build_table(&equal(&keys), DEFAULT_TABLE_SIZE, 3);
        for count in counts(&table, 7) {
            // 16381 / 7 = 2340.14: round-robin gives floor or ceil.
            assert!((2340..=2341).contains(&count), "{count}");
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        let keys = keys(4);
        let weights = [1, 10, 100, 1000];
        let table = build_table(&weighted(&keys, &weights), DEFAULT_TABLE_SIZE, 4);
        let counts = counts(&table, 4);
        let total: u32 = weights.iter().sum();
        for (&count, &weight) in counts.iter().zip(&weights) {
            let ideal = f64::from(DEFAULT_TABLE_SIZE) * f64::from(weight) / f64::from(total);
            assert!((count as f64 - ideal).abs() <= 1.0, "{count} vs {ideal}");
        }
    }

    #[test]
    fn extreme_weights_do_not_overflow() {
        let keys = keys(3);
        let backends = weighted(&keys, &[u32::MAX, 1, u32::MAX]);
        let counts = counts(&build_table(&backends, MAX_TABLE_SIZE, 5), 3);
        // The weight-1 backend's ideal share is 131071 / 2^33: rounds to 0.
        assert_eq!(counts[1], 0);
        assert!(counts[0].abs_diff(counts[2]) <= 1, "{counts:?}");
    }

    #[test]
    fn duplicate_keys_merge_into_one_member() {
        let keys = ["b:80", "a:80", "b:80", "c:80"].map(String::from);
        let backends = weighted(&keys, &[1, 2, 3, 2]);
        let table = build_table(&backends, DEFAULT_TABLE_SIZE, 6);
        let counts = counts(&table, 4);
        // The lowest index of the key gets all its slots...
        assert_eq!(counts[2], 0);
        // ...with the summed weight: "b" (1 + 3) gets twice "a" (2).
        assert!(counts[0].abs_diff(2 * counts[1]) <= 2, "{counts:?}");

        let merged = weighted(&keys[..2], &[4, 2]);
        let merged = [merged[0], merged[1], backends[3]];
        let merged_table = build_table(&merged, DEFAULT_TABLE_SIZE, 6);
        assert_eq!(by_key(&backends, &table), by_key(&merged, &merged_table));
    }

    /// Correctness at the performance target (timings are measured
    /// outside the test suite; timed asserts are flaky).
    #[test]
    fn thousand_backends_at_default_and_max_size() {
        let keys = keys(1000);
        let backends = equal(&keys);
        for size in [DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE] {
            let table = build_table(&backends, size, 7);
            assert_eq!(table.len(), size as usize);
            let floor = (size / 1000) as usize;
            for count in counts(&table, 1000) {
                assert!((floor..=floor + 1).contains(&count), "{size}: {count}");
            }
        }
    }

    /// Deterministic disruption figures, printed for the record (run with
    /// `--nocapture`). Removing the backend at index `n / 2` of `n`.
    #[test]
    fn removal_remaps_about_one_nth() {
        for (n, size, max_extra) in [
            (10, DEFAULT_TABLE_SIZE, 0.02),
            (100, DEFAULT_TABLE_SIZE, 0.02),
            (1000, DEFAULT_TABLE_SIZE, 0.02),
            (1000, MAX_TABLE_SIZE, 0.02),
        ] {
            let keys = keys(n);
            let d = remove_one(&equal(&keys), n / 2, size, 11);
            let ideal = 1.0 / n as f64;
            eprintln!(
                "remove 1 of {n} (M={size}): moved {:.4}% (ideal {:.4}%), extra {:.4}%",
                d.moved * 100.0,
                ideal * 100.0,
                d.extra * 100.0
            );
            assert!(d.extra <= max_extra, "n={n}: extra {}", d.extra);
        }
    }

    /// Adding backend number `n + 1` to `n`: the same measurement read
    /// backwards, so ideal is 1 / (n + 1).
    #[test]
    fn addition_remaps_about_one_over_n_plus_one() {
        for (n, size, max_extra) in [
            (10, DEFAULT_TABLE_SIZE, 0.02),
            (100, DEFAULT_TABLE_SIZE, 0.02),
            (1000, DEFAULT_TABLE_SIZE, 0.02),
        ] {
            let keys = keys(n + 1);
            let grown = equal(&keys);
            // Removing the new backend from the grown set == adding it.
            let d = remove_one(&grown, n, size, 12);
            let ideal = 1.0 / (n + 1) as f64;
            eprintln!(
                "add 1 to {n} (M={size}): moved {:.4}% (ideal {:.4}%), extra {:.4}%",
                d.moved * 100.0,
                ideal * 100.0,
                d.extra * 100.0
            );
            assert!(d.extra <= max_extra, "n={n}: extra {}", d.extra);
        }
    }

    /// Small prime so the property tests stay fast in debug builds while
    /// keeping ~25+ slots per backend.
    const PROP_SIZE: u32 = 4099;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn prop_order_does_not_matter(
            weights in prop::collection::vec(0u32..=1000, 1..40),
            seed in any::<u64>(),
            shuffle_seed in any::<u64>(),
        ) {
            let keys = keys(weights.len());
            let backends = weighted(&keys, &weights);
            let mut shuffled = backends.clone();
            // Fisher-Yates driven by a deterministic LCG.
            let mut state = shuffle_seed;
            for i in (1..shuffled.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (state >> 33) as usize % (i + 1));
            }
            let a = build_table(&backends, PROP_SIZE, seed);
            let b = build_table(&shuffled, PROP_SIZE, seed);
            prop_assert_eq!(by_key(&backends, &a), by_key(&shuffled, &b));
        }

        /// The batched weight-class scheduler must produce exactly the order
        /// the contract defines per member, including ties across classes
        /// (small weights make such ties frequent).
        #[test]
        fn prop_schedule_matches_per_member_order(
            weights in prop::collection::vec(1u64..=8, 1..12),
        ) {
            prop_assert_eq!(schedule_order(&weights, 300), brute_force_order(&weights, 300));
        }

        /// Duplicate keys and zero weights included: the counts follow the merged members.
        #[test]
        fn prop_slot_counts_match_the_built_table(
            weights in prop::collection::vec(0u32..=1000, 1..40),
            duplicates in 0usize..4,
            seed in any::<u64>(),
        ) {
            let mut keys = keys(weights.len());
            for i in 0..duplicates.min(keys.len() - 1) {
                keys[i + 1] = keys[0].clone();
            }
            let backends = weighted(&keys, &weights);
            let table = build_table(&backends, PROP_SIZE, seed);
            let expected: Vec<u32> = counts(&table, weights.len()).iter().map(|&n| n as u32).collect();
            prop_assert_eq!(slot_counts(&backends, PROP_SIZE), expected);
        }

        #[test]
        fn prop_shares_within_two_slots_of_weight_ratio(
            weights in prop::collection::vec(1u32..=1000, 1..40),
            seed in any::<u64>(),
        ) {
            let keys = keys(weights.len());
            let table = build_table(&weighted(&keys, &weights), DEFAULT_TABLE_SIZE, seed);
            let total: u32 = weights.iter().sum();
            for (&count, &weight) in counts(&table, weights.len()).iter().zip(&weights) {
                let ideal = f64::from(DEFAULT_TABLE_SIZE) * f64::from(weight) / f64::from(total);
                prop_assert!((count as f64 - ideal).abs() <= 2.0, "{} vs {}", count, ideal);
            }
        }

        /// With equal weights the extra disruption stays under 2% (the tests above). Skewed
        /// weights reorder the survivors' turns when one member leaves, so more slots move:
        /// over 3,000 random cases of this strategy (2-40 backends, weights 1-1000) the
        /// largest extra was 7.9% of the table, with the victim owning 2% of it. The bound
        /// was 5% until that tail made the test fail about one run in ten.
        #[test]
        fn prop_removal_is_minimally_disruptive(
            weights in prop::collection::vec(1u32..=1000, 2..40),
            victim in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let keys = keys(weights.len());
            let backends = weighted(&keys, &weights);
            let d = remove_one(&backends, victim.index(weights.len()), PROP_SIZE, seed);
            prop_assert!(d.extra <= 0.10, "extra {}", d.extra);
        }
    }
}
