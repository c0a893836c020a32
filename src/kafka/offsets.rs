//! Which offsets may be committed. Owns the per-partition record of in-flight and finished offsets; never talks
//! to Kafka. The rule: a partition's committed offset is the first offset not yet finished (Kafka wants
//! "last finished + 1"), so it never passes an unfinished record.

use std::collections::{BTreeMap, HashMap};

/// A topic-partition.
pub type Tp = (String, i32);

#[derive(Default, Debug)]
struct PartitionState {
    /// Offsets taken into processing and whether each is finished.
    pending: BTreeMap<i64, bool>,
    /// The next offset to consume, as last computed for commit.
    next: Option<i64>,
    /// The next offset last committed.
    committed: Option<i64>,
}

#[derive(Default, Debug)]
pub struct OffsetTracker {
    parts: HashMap<Tp, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A record enters processing.
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) {
        self.parts
            .entry((topic.to_string(), partition))
            .or_default()
            .pending
            .insert(offset, false);
    }

    /// A record is finished: every handler succeeded, or its failure was dead-lettered and acknowledged.
    /// Unknown partitions (revoked meanwhile) are ignored.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(topic.to_string(), partition))
            && let Some(done) = p.pending.get_mut(&offset)
        {
            *done = true;
        }
    }

    /// The record is taken into processing and not finished: its partition is still ours.
    pub fn is_pending(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.parts
            .get(&(topic.to_string(), partition))
            .and_then(|p| p.pending.get(&offset))
            .is_some_and(|done| !*done)
    }

    /// Records of these partitions taken into processing and not finished.
    pub fn unfinished_in(&self, partitions: &[Tp]) -> usize {
        partitions
            .iter()
            .filter_map(|tp| self.parts.get(tp))
            .map(|p| p.pending.values().filter(|d| !**d).count())
            .sum()
    }

    /// Offsets to commit now: per partition, the first unfinished offset (or last finished + 1), when it moved
    /// past what was committed.
    pub fn committable(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            while let Some((&offset, &done)) = p.pending.first_key_value() {
                if !done {
                    break;
                }
                p.pending.pop_first();
                p.next = Some(offset + 1);
            }
            if let Some(next) = p.next
                && p.committed.is_none_or(|c| next > c)
            {
                out.push((tp.clone(), next));
            }
        }
        out.sort();
        out
    }

    /// The broker accepted these commits.
    pub fn committed(&mut self, offsets: &[(Tp, i64)]) {
        for (tp, next) in offsets {
            if let Some(p) = self.parts.get_mut(tp) {
                p.committed = Some(p.committed.map_or(*next, |c| c.max(*next)));
            }
        }
    }

    /// Every partition's position past its finished records, whether or not it was committed already (for the
    /// last, synchronous commit: earlier asynchronous ones may not have landed).
    pub fn positions(&mut self) -> Vec<(Tp, i64)> {
        self.committable();
        let mut out: Vec<(Tp, i64)> = self
            .parts
            .iter()
            .filter_map(|(tp, p)| Some((tp.clone(), p.next?)))
            .collect();
        out.sort();
        out
    }

    /// The broker refused these commits: forget that they were sent, so the next commit sends them again.
    pub fn commit_failed(&mut self, offsets: &[(Tp, i64)]) {
        for (tp, next) in offsets {
            if let Some(p) = self.parts.get_mut(tp)
                && p.committed == Some(*next)
            {
                p.committed = None;
            }
        }
    }

    /// Forgets partitions that were revoked, returning what of theirs is committable first.
    pub fn revoke(&mut self, revoked: &[Tp]) -> Vec<(Tp, i64)> {
        let out: Vec<_> = self
            .committable()
            .into_iter()
            .filter(|(tp, _)| revoked.contains(tp))
            .collect();
        for tp in revoked {
            self.parts.remove(tp);
        }
        out
    }

    /// Records taken into processing and not finished.
    pub fn in_flight(&self) -> usize {
        self.parts
            .values()
            .map(|p| p.pending.values().filter(|d| !**d).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    #[test]
    fn commit_is_last_finished_plus_one() {
        let mut t = OffsetTracker::new();
        for o in 10..13 {
            t.track("t", 0, o);
            t.finish("t", 0, o);
        }
        assert_eq!(t.committable(), vec![(tp(0), 13)]);
    }

    #[test]
    fn a_refused_commit_is_sent_again_and_the_final_commit_sends_every_position() {
        let mut t = OffsetTracker::new();
        t.track("t", 0, 0);
        t.finish("t", 0, 0);
        let sent = t.committable();
        assert_eq!(sent, vec![(tp(0), 1)]);
        t.committed(&sent);
        assert!(t.committable().is_empty());
        t.commit_failed(&sent);
        assert_eq!(t.committable(), vec![(tp(0), 1)], "sent again");
        t.committed(&sent);
        assert_eq!(t.positions(), vec![(tp(0), 1)], "committed or not");
    }

    #[test]
    fn never_passes_an_unfinished_record() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.track("t", 0, o);
        }
        t.finish("t", 0, 0);
        t.finish("t", 0, 1);
        t.finish("t", 0, 3);
        t.finish("t", 0, 4);
        assert_eq!(t.committable(), vec![(tp(0), 2)]);
        assert_eq!(t.in_flight(), 1);
        t.finish("t", 0, 2);
        assert_eq!(t.committable(), vec![(tp(0), 5)]);
    }

    #[test]
    fn nothing_new_means_nothing_to_commit() {
        let mut t = OffsetTracker::new();
        t.track("t", 1, 7);
        assert!(t.committable().is_empty());
        t.finish("t", 1, 7);
        let c = t.committable();
        t.committed(&c);
        assert!(t.committable().is_empty());
    }

    #[test]
    fn revoke_returns_finished_offsets_and_forgets_the_partition() {
        let mut t = OffsetTracker::new();
        t.track("t", 0, 0);
        t.track("t", 1, 0);
        t.finish("t", 0, 0);
        t.finish("t", 1, 0);
        assert_eq!(t.revoke(&[tp(1)]), vec![(tp(1), 1)]);
        t.finish("t", 1, 0); // late completion of revoked work is ignored
        assert_eq!(t.committable(), vec![(tp(0), 1)]);
    }
}
