//! Which offsets may be committed. Owns the per-partition record of in-flight and finished offsets; never talks
//! to Kafka. The rule: a partition's committed offset is the first offset not yet finished (Kafka wants
//! "last finished + 1"), so it never passes an unfinished record.

use std::collections::VecDeque;

use foldhash::HashMap;

/// A topic-partition.
pub type Tp = (String, i32);

#[derive(Default, Debug)]
struct PartitionState {
    /// Which assignment of the partition this is: a partition revoked and assigned back is a new generation,
    /// so records taken in under the old one are told apart from the same offsets fetched again.
    generation: u64,
    /// Offsets taken into processing, ascending, whether each is finished, and its Kafka timestamp (ms). Records
    /// arrive in offset order, so tracking appends and finishing is a binary search.
    pending: VecDeque<(i64, bool, Option<i64>)>,
    /// The next offset to consume, as last computed for commit.
    next: Option<i64>,
    /// The next offset last committed.
    committed: Option<i64>,
    /// The partition's first unfinished offset when last looked at, and since when it has been the first.
    first_unfinished_since: Option<(i64, std::time::Instant)>,
}

impl PartitionState {
    /// Where `offset` is in `pending` (`Err`: where it would go). Offsets are nearly always consecutive, so the
    /// distance from the first one is tried before a binary search.
    fn position(&self, offset: i64) -> Result<usize, usize> {
        if let Some(&(first, _, _)) = self.pending.front()
            && let Ok(i) = usize::try_from(offset - first)
            && self.pending.get(i).is_some_and(|(o, _, _)| *o == offset)
        {
            return Ok(i);
        }
        self.pending.binary_search_by_key(&offset, |(o, _, _)| *o)
    }

    fn slot(&mut self, offset: i64) -> Option<&mut bool> {
        let i = self.position(offset).ok()?;
        self.pending.get_mut(i).map(|(_, done, _)| done)
    }

    fn unfinished(&self) -> usize {
        self.pending.iter().filter(|(_, done, _)| !*done).count()
    }
}

/// Keyed by topic, then partition, so that the per-record calls look up without allocating.
#[derive(Default, Debug)]
pub struct OffsetTracker {
    parts: HashMap<String, HashMap<i32, PartitionState>>,
    generations: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, topic: &str, partition: i32) -> Option<&PartitionState> {
        self.parts.get(topic)?.get(&partition)
    }

    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionState> {
        self.parts.get_mut(topic)?.get_mut(&partition)
    }

    fn all_mut(&mut self) -> impl Iterator<Item = (Tp, &mut PartitionState)> {
        self.parts.iter_mut().flat_map(|(topic, ps)| {
            ps.iter_mut()
                .map(move |(partition, p)| ((topic.clone(), *partition), p))
        })
    }

    /// A record without a timestamp enters processing (the tests' shorthand for [`Self::track_at`]).
    #[cfg(test)]
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        self.track_at(topic, partition, offset, None)
    }

    /// A record enters processing, with its Kafka timestamp (ms) for [`Self::oldest_unfinished_timestamp`].
    /// Returns the partition's generation, which [`Self::finish`] and [`Self::is_pending`] want back.
    pub fn track_at(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
    ) -> u64 {
        if self.get(topic, partition).is_none() {
            self.generations += 1;
            let generation = self.generations;
            self.parts.entry(topic.to_string()).or_default().insert(
                partition,
                PartitionState {
                    generation,
                    ..Default::default()
                },
            );
        }
        let Some(p) = self.get_mut(topic, partition) else {
            return 0;
        };
        match p.pending.back() {
            None => p.pending.push_back((offset, false, timestamp)),
            Some((last, _, _)) if *last < offset => p.pending.push_back((offset, false, timestamp)),
            // Out of order (never expected from one consumer): keep the deque sorted.
            Some(_) => match p.position(offset) {
                Ok(i) => p.pending[i].1 = false,
                Err(i) => p.pending.insert(i, (offset, false, timestamp)),
            },
        }
        p.generation
    }

    /// A record is finished: every handler succeeded, or its failure was dead-lettered and acknowledged.
    /// Records of partitions revoked meanwhile (unknown, or assigned back since: another generation) are ignored.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64, generation: u64) {
        if let Some(done) = self
            .get_mut(topic, partition)
            .filter(|p| p.generation == generation)
            .and_then(|p| p.slot(offset))
        {
            *done = true;
        }
    }

    /// The record is taken into processing under this generation and not finished: its partition is still ours.
    pub fn is_pending(&self, topic: &str, partition: i32, offset: i64, generation: u64) -> bool {
        self.get(topic, partition)
            .filter(|p| p.generation == generation)
            .is_some_and(|p| p.position(offset).is_ok_and(|i| !p.pending[i].1))
    }

    /// Records of these partitions taken into processing and not finished.
    pub fn unfinished_in(&self, partitions: &[Tp]) -> usize {
        partitions
            .iter()
            .filter_map(|(topic, partition)| self.get(topic, *partition))
            .map(PartitionState::unfinished)
            .sum()
    }

    /// Offsets to commit now: per partition, the first unfinished offset (or last finished + 1), when it moved
    /// past what was committed.
    pub fn committable(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in self.all_mut() {
            while let Some(&(offset, true, _)) = p.pending.front() {
                p.pending.pop_front();
                p.next = Some(offset + 1);
            }
            if let Some(next) = p.next
                && p.committed.is_none_or(|c| next > c)
            {
                out.push((tp, next));
            }
        }
        out.sort();
        out
    }

    /// The broker accepted these commits; until then [`Self::committable`] keeps offering them.
    pub fn committed(&mut self, offsets: &[(Tp, i64)]) {
        for ((topic, partition), next) in offsets {
            if let Some(p) = self.get_mut(topic, *partition) {
                p.committed = Some(p.committed.map_or(*next, |c| c.max(*next)));
            }
        }
    }

    /// Every partition's position past its finished records, whether or not it was committed already (for the
    /// last, synchronous commit: earlier asynchronous ones may not have landed).
    pub fn positions(&mut self) -> Vec<(Tp, i64)> {
        self.committable();
        let mut out: Vec<(Tp, i64)> = self
            .all_mut()
            .filter_map(|(tp, p)| Some((tp, p.next?)))
            .collect();
        out.sort();
        out
    }

    /// Forgets partitions that were revoked, returning what of theirs is committable first.
    pub fn revoke(&mut self, revoked: &[Tp]) -> Vec<(Tp, i64)> {
        let out: Vec<_> = self
            .committable()
            .into_iter()
            .filter(|(tp, _)| revoked.contains(tp))
            .collect();
        for (topic, partition) in revoked {
            if let Some(ps) = self.parts.get_mut(topic) {
                ps.remove(partition);
                if ps.is_empty() {
                    self.parts.remove(topic);
                }
            }
        }
        out
    }

    /// Partitions whose first unfinished record has been their first for `bound` or longer (their commit cannot
    /// move, whatever holds the record up): each with that record's offset and how long it has held the partition.
    pub fn stalled(
        &mut self,
        bound: std::time::Duration,
        now: std::time::Instant,
    ) -> Vec<(Tp, i64, std::time::Duration)> {
        let mut out = Vec::new();
        for (tp, p) in self.all_mut() {
            let first = p
                .pending
                .iter()
                .find(|(_, done, _)| !*done)
                .map(|(o, _, _)| *o);
            let Some(first) = first else {
                p.first_unfinished_since = None;
                continue;
            };
            let since = match p.first_unfinished_since {
                Some((o, since)) if o == first => since,
                _ => {
                    p.first_unfinished_since = Some((first, now));
                    now
                }
            };
            let waited = now.saturating_duration_since(since);
            if waited >= bound {
                out.push((tp, first, waited));
            }
        }
        out.sort();
        out
    }

    /// For the consumer's lag in seconds: the Kafka timestamp (ms) of the partition's oldest record taken in and
    /// not finished (`None` when none is in flight).
    pub fn oldest_unfinished_timestamp(&self, topic: &str, partition: i32) -> Option<i64> {
        let p = self.get(topic, partition)?;
        p.pending
            .iter()
            .find(|(_, done, _)| !*done)
            .and_then(|(_, _, timestamp)| *timestamp)
    }

    /// Records taken into processing and not finished (the lanes count them for the loop).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.parts
            .values()
            .flat_map(HashMap::values)
            .map(PartitionState::unfinished)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    /// The current generation of partition `p` of topic `t`.
    fn generation_of(t: &OffsetTracker, p: i32) -> u64 {
        t.get("t", p).map_or(0, |s| s.generation)
    }

    #[test]
    fn a_partition_is_stalled_once_its_first_unfinished_record_has_held_it_for_the_bound() {
        use std::time::{Duration, Instant};
        let mut t = OffsetTracker::new();
        let t0 = Instant::now();
        let bound = Duration::from_secs(60);
        for o in 0..3 {
            t.track("t", 0, o);
        }
        t.track("t", 1, 0);
        let g = generation_of(&t, 0);
        assert!(t.stalled(bound, t0).is_empty());
        // Offset 0 holds partition 0 for the bound; partition 1's record finishes.
        t.finish("t", 1, 0, generation_of(&t, 1));
        t.finish("t", 0, 1, g);
        assert_eq!(t.stalled(bound, t0 + bound), vec![(tp(0), 0, bound)]);
        // It finishes: offset 1 is done too, offset 2 is the first unfinished now, from now on.
        t.finish("t", 0, 0, g);
        assert!(t.stalled(bound, t0 + bound).is_empty());
        assert_eq!(t.stalled(bound, t0 + bound * 2), vec![(tp(0), 2, bound)]);
        t.finish("t", 0, 2, g);
        assert!(t.stalled(bound, t0 + bound * 9).is_empty());
    }

    #[test]
    fn commit_is_last_finished_plus_one() {
        let mut t = OffsetTracker::new();
        for o in 10..13 {
            t.track("t", 0, o);
            t.finish("t", 0, o, generation_of(&t, 0));
        }
        assert_eq!(t.committable(), vec![(tp(0), 13)]);
    }

    #[test]
    fn offsets_go_again_until_their_commit_is_accepted_and_the_final_commit_sends_every_position() {
        let mut t = OffsetTracker::new();
        t.track("t", 0, 0);
        t.finish("t", 0, 0, generation_of(&t, 0));
        let sent = t.committable();
        assert_eq!(sent, vec![(tp(0), 1)]);
        assert_eq!(
            t.committable(),
            sent,
            "refused (or not answered): sent again"
        );
        t.committed(&sent);
        assert!(t.committable().is_empty());
        assert_eq!(t.positions(), vec![(tp(0), 1)], "committed or not");
    }

    #[test]
    fn the_oldest_unfinished_record_gives_the_lag_timestamp() {
        let mut t = OffsetTracker::new();
        assert_eq!(
            t.oldest_unfinished_timestamp("t", 0),
            None,
            "unknown partition"
        );
        let g = t.track_at("t", 0, 0, Some(100));
        t.track_at("t", 0, 1, Some(200));
        t.track_at("t", 0, 2, Some(300));
        assert_eq!(t.oldest_unfinished_timestamp("t", 0), Some(100));
        t.finish("t", 0, 0, g);
        t.finish("t", 0, 2, g);
        assert_eq!(
            t.oldest_unfinished_timestamp("t", 0),
            Some(200),
            "offset 1 is awaited"
        );
        t.finish("t", 0, 1, g);
        assert_eq!(t.oldest_unfinished_timestamp("t", 0), None, "all finished");
    }

    #[test]
    fn never_passes_an_unfinished_record() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.track("t", 0, o);
        }
        t.finish("t", 0, 0, generation_of(&t, 0));
        t.finish("t", 0, 1, generation_of(&t, 0));
        t.finish("t", 0, 3, generation_of(&t, 0));
        t.finish("t", 0, 4, generation_of(&t, 0));
        assert_eq!(t.committable(), vec![(tp(0), 2)]);
        assert_eq!(t.in_flight(), 1);
        t.finish("t", 0, 2, generation_of(&t, 0));
        assert_eq!(t.committable(), vec![(tp(0), 5)]);
    }

    #[test]
    fn an_offset_tracked_out_of_order_or_twice_keeps_the_order() {
        let mut t = OffsetTracker::new();
        t.track("t", 0, 5);
        t.track("t", 0, 3);
        t.track("t", 0, 5);
        t.finish("t", 0, 3, generation_of(&t, 0));
        assert!(t.is_pending("t", 0, 5, generation_of(&t, 0)));
        assert!(!t.is_pending("t", 0, 3, generation_of(&t, 0)));
        assert!(
            !t.is_pending("t", 0, 4, generation_of(&t, 0)),
            "never tracked"
        );
        assert_eq!(t.committable(), vec![(tp(0), 4)]);
        t.finish("t", 0, 5, generation_of(&t, 0));
        assert_eq!(t.committable(), vec![(tp(0), 6)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn offsets_with_gaps_are_found_past_the_gap() {
        // Transaction markers and compaction leave holes: the guess from the first offset misses, the search finds.
        let mut t = OffsetTracker::new();
        for o in [5, 6, 9, 10, 14] {
            t.track("t", 0, o);
        }
        let g = generation_of(&t, 0);
        for o in [5, 6, 9, 10, 14] {
            assert!(t.is_pending("t", 0, o, g), "{o} pending");
        }
        assert!(!t.is_pending("t", 0, 7, g), "never tracked");
        t.finish("t", 0, 9, g);
        t.finish("t", 0, 5, g);
        assert!(!t.is_pending("t", 0, 9, g), "finished");
        assert_eq!(t.committable(), vec![(tp(0), 6)]);
        for o in [6, 10, 14] {
            t.finish("t", 0, o, g);
        }
        assert_eq!(t.committable(), vec![(tp(0), 15)]);
    }

    #[test]
    fn nothing_new_means_nothing_to_commit() {
        let mut t = OffsetTracker::new();
        t.track("t", 1, 7);
        assert!(t.committable().is_empty());
        t.finish("t", 1, 7, generation_of(&t, 1));
        let c = t.committable();
        t.committed(&c);
        assert!(t.committable().is_empty());
    }

    #[test]
    fn revoke_returns_finished_offsets_and_forgets_the_partition() {
        let mut t = OffsetTracker::new();
        t.track("t", 0, 0);
        let g1 = t.track("t", 1, 0);
        t.track("t", 1, 1);
        t.finish("t", 0, 0, generation_of(&t, 0));
        t.finish("t", 1, 0, g1);
        assert_eq!(t.revoke(&[tp(1)]), vec![(tp(1), 1)]);
        t.finish("t", 1, 1, g1); // late completion of revoked work is ignored
        assert_eq!(t.committable(), vec![(tp(0), 1)]);
    }

    #[test]
    fn a_partition_assigned_back_is_a_new_generation() {
        let mut t = OffsetTracker::new();
        let old = t.track("t", 0, 4);
        t.revoke(&[tp(0)]);
        let new = t.track("t", 0, 4);
        assert_ne!(old, new);
        assert!(
            !t.is_pending("t", 0, 4, old),
            "taken in under the old assignment"
        );
        assert!(t.is_pending("t", 0, 4, new));
        t.finish("t", 0, 4, old);
        assert!(
            t.committable().is_empty(),
            "the old assignment's work does not count"
        );
        t.finish("t", 0, 4, new);
        assert_eq!(t.committable(), vec![(tp(0), 5)]);
    }
}
