//! Detached listeners reading their first attempts back from the event log.
//!
//! A detached listener (see `aside`) that can take work again reads its own events from where
//! it stands, a chunk at a time, into its line: the same pairs fan-out would have handed it,
//! each checked for a record first (one may have been written before it was detached, or
//! before a restart). Where it stands is written now and then, never past a pair not yet
//! recorded. Once it has read up to where fan-out is and recorded all it read, it follows
//! fan-out again.

use super::Dispatcher;
use super::aside::CATCH_UP_CHUNK;
use crate::clock::now_ms;
use crate::ids;
use crate::pipeline::line::{Pair, Work};

/// Events of its producer a detached listener's reading looks at per step, at most.
const SCAN: usize = 4096;

impl Dispatcher {
    /// Reads the next chunk of a detached listener's first attempts into its line, as far as
    /// it has room; follows fan-out again once it has caught up.
    pub(super) fn catch_up(&mut self, listener_id: &str) {
        let now = now_ms();
        let until = self.progress.handed_until_seq();
        let free = self.memory.available_permits();
        let cap = self.cap();
        let lane = self.lane(listener_id);
        if lane.gate.deleted && lane.detached.is_some() && lane.listener.is_none() {
            // Its waiting deliveries are cancelled by its deletion (see `aside`), or listed
            // nowhere once it is gone.
            return;
        }
        let (Some(detached), Some(target)) = (&lane.detached, &lane.listener) else { return };
        let room = lane.gate.read_back_room(cap, now, lane.line.len()).min(CATCH_UP_CHUNK).min(free);
        if detached.read >= until {
            // Not while fan-out is in the middle of an event: its pair of that event may have
            // been let go in the part handed out already.
            if detached.outstanding.is_empty() && room > 0 && !self.progress.partial() {
                self.attach(listener_id);
            }
            return;
        }
        if room == 0 {
            return;
        }
        let listener = target.listener.clone();
        let from = detached.read;
        let read = self.context.queue.events_of(&listener.producer_id, &listener.event_type, from, until, SCAN, room);
        let (events, reached) = match read {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot read a detached listener's events");
                return;
            }
        };
        let mut pairs = Vec::new();
        let mut read_to = reached;
        for event in events.into_iter().filter(|event| listener.wants(event.seq)) {
            if pairs.len() == room {
                read_to = event.seq;
                break;
            }
            pairs.push(Pair {
                seq: event.seq,
                delivery_id: ids::delivery_id(event.seq, &listener.id),
                event_id: event.id,
                producer_id: event.producer_id,
                listener_id: listener.id.clone(),
                due_ms: event.created_at_ms,
                recheck: true,
                lagging: true,
            });
        }
        let place = self.memory.clone().try_acquire_many_owned(u32::try_from(pairs.len()).unwrap_or(u32::MAX));
        let Ok(place) = place else { return };
        place.forget();
        let lane = self.lanes.get_mut(listener_id).expect("read above");
        let detached = lane.detached.as_mut().expect("read above");
        detached.read = read_to;
        for pair in pairs {
            // Unrecorded until its turn ends: where it stands does not pass it before that.
            detached.outstanding.insert(pair.seq);
            // In hand already (under way, waiting to be done again, or a queue entry of it):
            // not taken twice. The one in hand ends it.
            if self.claimed.contains_key(&pair.delivery_id) {
                self.memory.add_permits(1);
                continue;
            }
            self.claimed.insert(pair.delivery_id.clone(), (0, String::new()));
            lane.line.push(Work::First(pair), now);
        }
        self.mark(listener_id);
    }

    /// The detached listener has read and recorded all fan-out has handed out: it follows
    /// fan-out again.
    fn attach(&mut self, listener_id: &str) {
        if let Err(error) = self.context.queue.set_detached(listener_id, None) {
            tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot record a listener following fan-out again");
            return;
        }
        if let Some(lane) = self.lanes.get_mut(listener_id) {
            lane.detached = None;
        }
        tracing::debug!(%listener_id, "listener follows fan-out again");
    }

    /// Writes where each detached listener stands, where that moved: the first event of a
    /// pair it read back and has not recorded, or where its reading has got to.
    pub(super) fn write_detached(&mut self) {
        let mut moved = Vec::new();
        for (listener_id, lane) in &self.lanes {
            if let Some(detached) = &lane.detached {
                let stands = detached.outstanding.first().copied().unwrap_or(detached.read).min(detached.read);
                if stands > detached.since {
                    moved.push((listener_id.clone(), stands));
                }
            }
        }
        for (listener_id, stands) in moved {
            match self.context.queue.set_detached(&listener_id, Some(stands)) {
                Ok(()) => {
                    if let Some(detached) = self.lanes.get_mut(&listener_id).and_then(|lane| lane.detached.as_mut()) {
                        detached.since = stands;
                    }
                }
                Err(error) => {
                    tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot record where a detached listener stands");
                }
            }
        }
    }
}
