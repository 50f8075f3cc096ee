//! A journal: records numbered in arrival order, kept for a time window and up to a count,
//! and persisted one state record each (`<prefix><number>`), so saving after each request
//! writes only what arrived or left since the last save.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{unix_ms, Changes, Records};

/// Something with a time (unix ms), by which it leaves the window.
pub trait Stamped {
    fn at_ms(&self) -> u64;
}

/// Records in a window, numbered, with what changed since the last save.
pub struct Journal<T> {
    list: VecDeque<(u64, T)>,
    next: u64,
    dirty: BTreeSet<u64>,
    most: usize,
    window: Duration,
    prefix: &'static str,
}

impl<T: Stamped + Serialize + DeserializeOwned> Journal<T> {
    /// Keeps at most `most` records, none older than `window`; saved under `prefix`.
    pub fn new(prefix: &'static str, most: usize, window: Duration) -> Self {
        Journal { list: VecDeque::new(), next: 0, dirty: BTreeSet::new(), most, window, prefix }
    }

    /// Adds a record (and drops those past the window or the count).
    pub fn push(&mut self, item: T) {
        let n = self.next;
        self.next += 1;
        self.list.push_back((n, item));
        self.dirty.insert(n);
        self.trim();
    }

    fn trim(&mut self) {
        let now = unix_ms();
        let window = self.window.as_millis() as u64;
        while self.list.len() > self.most || self.list.front().is_some_and(|(_, r)| now.saturating_sub(r.at_ms()) > window) {
            if let Some((n, _)) = self.list.pop_front() {
                self.dirty.insert(n);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.list.iter().map(|(_, r)| r)
    }

    /// Restores the records saved in `section` (those past the window are dropped, and
    /// deleted at the next save).
    pub fn restore(&mut self, records: &Records, section: &str) {
        let mut list: Vec<(u64, T)> =
            records.prefixed::<T>(section, self.prefix).into_iter().filter_map(|(k, r)| Some((k.parse().ok()?, r))).collect();
        list.sort_by_key(|(n, _)| *n);
        self.next = list.last().map_or(0, |(n, _)| n + 1);
        self.list = list.into();
        self.trim();
    }

    /// Moves the records added or dropped since the last call into `out`.
    pub fn changes(&mut self, section: &str, out: &mut Changes) {
        for n in std::mem::take(&mut self.dirty) {
            let key = format!("{}{n:020}", self.prefix);
            match self.list.binary_search_by_key(&n, |(m, _)| *m) {
                Ok(i) => out.put(section, &key, &self.list[i].1),
                Err(_) => out.delete(section, &key),
            }
        }
    }
}
