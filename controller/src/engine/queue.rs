//! The ready steps of one tool in the order they are offered to agents: higher run
//! priority first; within a priority, runs take turns one step at a time, so a run
//! with thousands of ready steps does not hold up a small one submitted after it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// A ready step: its run, its run's priority, its index.
pub(super) type Entry = (String, i32, usize);

#[derive(Default, Debug)]
pub(crate) struct ReadyQueue {
    levels: BTreeMap<Reverse<i32>, Level>,
}

#[derive(Default, Debug)]
struct Level {
    /// The runs with ready steps, in turn order.
    turn: VecDeque<String>,
    /// Each run's ready steps, in the order they became ready.
    steps: HashMap<String, VecDeque<usize>>,
}

impl ReadyQueue {
    /// Queues a step after the other ready steps of its run.
    pub fn push_back(&mut self, (run_id, priority, idx): Entry) {
        let level = self.levels.entry(Reverse(priority)).or_default();
        let q = level.steps.entry(run_id).or_insert_with_key(|run_id| {
            level.turn.push_back(run_id.clone());
            VecDeque::new()
        });
        q.push_back(idx);
    }

    /// Puts back a step taken by [`Self::pop_front`] and not dispatched: it is its
    /// run's next, and its run takes the next turn.
    pub fn push_front(&mut self, (run_id, priority, idx): Entry) {
        let level = self.levels.entry(Reverse(priority)).or_default();
        if let Some(at) = level.turn.iter().position(|r| *r == run_id) {
            level.turn.remove(at);
        }
        level.turn.push_front(run_id.clone());
        level.steps.entry(run_id).or_default().push_front(idx);
    }

    /// The next step: the run whose turn it is at the highest priority gives its
    /// oldest ready step and goes to the back of the turn.
    pub fn pop_front(&mut self) -> Option<Entry> {
        let mut first = self.levels.first_entry()?;
        let priority = first.key().0;
        let level = first.get_mut();
        let taken = level.turn.pop_front().and_then(|run_id| {
            let q = level.steps.get_mut(&run_id)?;
            let idx = q.pop_front()?;
            if q.is_empty() {
                level.steps.remove(&run_id);
            } else {
                level.turn.push_back(run_id.clone());
            }
            Some((run_id, priority, idx))
        });
        if level.turn.is_empty() {
            first.remove();
        }
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// The highest priority with a ready step.
    pub fn top_priority(&self) -> Option<i32> {
        self.levels.keys().next().map(|p| p.0)
    }

    /// Whether step `idx` of the run is queued (for checks; it scans the run's steps).
    #[cfg(test)]
    pub fn contains(&self, run_id: &str, idx: usize) -> bool {
        self.levels.values().any(|l| l.steps.get(run_id).is_some_and(|q| q.contains(&idx)))
    }

    /// Every queued step, by priority and run (not in dispatch order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.levels.values().flat_map(|l| {
            l.turn.iter().flat_map(|run_id| {
                l.steps
                    .get(run_id)
                    .into_iter()
                    .flat_map(move |q| q.iter().map(move |&i| (run_id.as_str(), i)))
            })
        })
    }

    /// Moves every step of `other` behind this queue's own, in `other`'s order.
    pub fn append(&mut self, mut other: ReadyQueue) {
        while let Some(e) = other.pop_front() {
            self.push_back(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut ReadyQueue) -> Vec<(String, usize)> {
        std::iter::from_fn(|| q.pop_front()).map(|(r, _, i)| (r, i)).collect()
    }

    fn e(run: &str, p: i32, idx: usize) -> Entry {
        (run.to_string(), p, idx)
    }

    #[test]
    fn runs_take_turns_within_a_priority_and_higher_priorities_go_first() {
        let mut q = ReadyQueue::default();
        for i in 0..4 {
            q.push_back(e("big", 0, i));
        }
        q.push_back(e("small", 0, 0));
        q.push_back(e("small", 0, 1));
        q.push_back(e("urgent", 5, 0));
        assert_eq!(q.top_priority(), Some(5));
        assert!(q.contains("big", 3) && !q.contains("big", 4));
        let order: Vec<(String, usize)> = drain(&mut q);
        let names: Vec<String> = order.iter().map(|(r, i)| format!("{r}{i}")).collect();
        assert_eq!(names, ["urgent0", "big0", "small0", "big1", "small1", "big2", "big3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_step_put_back_is_its_runs_next() {
        let mut q = ReadyQueue::default();
        q.push_back(e("a", 0, 0));
        q.push_back(e("a", 0, 1));
        q.push_back(e("b", 0, 0));
        let first = q.pop_front().unwrap();
        let second = q.pop_front().unwrap();
        assert_eq!((first.2, second.0.as_str()), (0, "b"));
        // Both passed over: back in front, in their order.
        q.push_front(second);
        q.push_front(first);
        let names: Vec<String> = drain(&mut q).iter().map(|(r, i)| format!("{r}{i}")).collect();
        assert_eq!(names, ["a0", "b0", "a1"]);
    }
}
