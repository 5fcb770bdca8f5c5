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
            match self.claimed.get(&pair.delivery_id) {
                // A queue entry of it is in hand (a retry, a manual attempt, a parked one): it
                // has a record, so there is nothing to read back, and nothing outstanding.
                Some((_, key_id)) if !key_id.is_empty() => {
                    self.memory.add_permits(1);
                    continue;
                }
                // Its first attempt is in hand already (under way, or waiting to be done
                // again): not taken twice. Outstanding until that turn ends, which clears it.
                Some(_) => {
                    detached.outstanding.insert(pair.seq);
                    self.memory.add_permits(1);
                    continue;
                }
                None => {}
            }
            // Unrecorded until its turn ends: where it stands does not pass it before that.
            detached.outstanding.insert(pair.seq);
            self.claimed.insert(pair.delivery_id.clone(), (0, String::new()));
            lane.line.push(Work::First(pair), now);
        }
        self.mark(listener_id);
    }

    /// The detached listener has read and recorded all fan-out has handed out: it follows
    /// fan-out again.
    fn attach(&mut self, listener_id: &str) {
        if let Err(error) = self.context.queue.set_detached(listener_id, None) {
            self.ended_if_refused(&error);
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
                    self.ended_if_refused(&error);
                    tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot record where a detached listener stands");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::Context;
    use crate::pipeline::dispatch::Handed;
    use crate::store::conformance::{listener, new_event, with_producers};
    use crate::store::{
        Attempt, Completion, Delivery, DeliveryState, FanoutCursor, NextStep, PipelineStore, SledStore, Store,
    };

    /// A dispatcher over `store`, from where fan-out durably stands, with the log durable up
    /// to `durable_end`, as it starts (its detached listeners read), and its places in memory.
    fn started(store: &Arc<SledStore>, durable_end: u64) -> (Dispatcher, Arc<tokio::sync::Semaphore>) {
        let context = Context::for_tests(store.clone());
        let (outbox, inbox) = tokio::sync::mpsc::unbounded_channel();
        // No fan-out here: the tests hand pairs over themselves.
        let handed = tokio::sync::mpsc::channel(1).1;
        let memory = Arc::new(tokio::sync::Semaphore::new(crate::pipeline::MEMORY_ITEMS));
        let start = store.fanout_cursor().unwrap();
        let durable = tokio::sync::watch::channel(durable_end).1;
        let mut dispatcher = Dispatcher::new(context, inbox, outbox, handed, memory.clone(), start, durable);
        dispatcher.restore();
        (dispatcher, memory)
    }

    /// Records that the first attempt of event `seq` (`event_id`) to `lst_l` failed and that its
    /// retry is due now; its delivery id.
    fn retry_due_now(store: &SledStore, seq: u64, event_id: &str) -> String {
        let id = ids::delivery_id(seq, "lst_l");
        let delivery = Delivery {
            id: id.clone(),
            event_id: event_id.to_owned(),
            event_seq: seq,
            listener_id: "lst_l".into(),
            producer_id: "prd_a".into(),
            state: DeliveryState::Pending as i32,
            attempts: 1,
            ..Delivery::default()
        };
        let attempt = Attempt { number: 1, status_code: 500, ..Attempt::default() };
        let next = NextStep::RetryAt(now_ms().saturating_sub(1));
        store.complete_attempts(vec![Completion { delivery, attempt, entry: None, next, ordered: false }]).unwrap();
        id
    }

    /// Regression (review): a read-back pair whose delivery a queue entry in hand held (a retry
    /// of it due at once) was marked outstanding, and only a first attempt's end clears that:
    /// the listener never followed fan-out again, and where it stood was never written past it.
    #[tokio::test]
    async fn a_read_back_pair_held_by_its_retry_does_not_keep_the_listener_detached() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_producers(SledStore::open(dir.path()).unwrap()).await;
        store.insert_listener(listener("lst_l", "prd_a", "thing.happened")).await.unwrap();
        let mut events = Vec::new();
        for n in 0..3 {
            events.push(store.append_event(new_event("prd_a", None, 1_000 + n)).await.unwrap().event_id);
        }
        store.settled().await.unwrap();
        // Event 1's first attempt failed before the listener was detached at event 0: its
        // retry is due now.
        let retried = retry_due_now(&store, 1, &events[1]);
        store.set_fanout_cursor(&FanoutCursor { next_seq: 3, ..FanoutCursor::default() }).unwrap();
        store.set_detached("lst_l", Some(0)).unwrap();

        let (mut dispatcher, _) = started(&store, 3);
        dispatcher.scan_queue(now_ms()).unwrap();
        assert!(dispatcher.claimed.contains_key(&retried), "the retry is in hand");

        dispatcher.catch_up("lst_l");
        let detached = dispatcher.lanes["lst_l"].detached.as_ref().unwrap();
        assert_eq!(detached.read, 3, "it read up to where fan-out is");
        assert_eq!(detached.outstanding.iter().copied().collect::<Vec<_>>(), [0, 2], "event 1 is its retry's");

        // The retry ends and the two pairs read back are recorded: it follows fan-out again.
        dispatcher.release(&retried);
        for seq in [0, 2] {
            dispatcher.pair_recorded(Pair {
                seq,
                event_id: events[seq as usize].clone(),
                producer_id: "prd_a".into(),
                delivery_id: ids::delivery_id(seq, "lst_l"),
                listener_id: "lst_l".into(),
                due_ms: 0,
                recheck: true,
                lagging: true,
            });
        }
        dispatcher.catch_up("lst_l");
        assert!(dispatcher.lanes["lst_l"].detached.is_none(), "it follows fan-out again");
        assert!(store.detached().unwrap().is_empty(), "and that is written");
        store.close().unwrap();
    }

    /// Regression (review): a detached listener followed fan-out again after a hand-over in
    /// the middle of an event that held none of that event's pairs, though its own pair of it
    /// had been let go in an earlier one (to be read back): that delivery was never made.
    #[tokio::test]
    async fn a_detached_listener_waits_for_the_event_under_way_to_be_handed_out_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_producers(SledStore::open(dir.path()).unwrap()).await;
        for id in ["lst_l", "lst_m"] {
            store.insert_listener(listener(id, "prd_a", "thing.happened")).await.unwrap();
        }
        let event_id = store.append_event(new_event("prd_a", None, 1_000)).await.unwrap().event_id;
        store.settled().await.unwrap();
        store.set_detached("lst_l", Some(0)).unwrap();

        let (mut dispatcher, memory) = started(&store, 1);
        let pair = |listener_id: &str| Pair {
            seq: 0,
            event_id: event_id.clone(),
            producer_id: "prd_a".into(),
            delivery_id: ids::delivery_id(0, listener_id),
            listener_id: listener_id.into(),
            due_ms: 0,
            recheck: false,
            lagging: false,
        };
        // Event 0 in three hand-overs: its pairs (the detached listener's is let go), then a
        // stretch of listeners that do not want it, then the rest of it.
        let mut hand_over = |pairs: Vec<Pair>, next_seq: u64, partial: bool| {
            memory.try_acquire_many(pairs.len() as u32).unwrap().forget();
            dispatcher.take_handed(Handed { pairs, next_seq, partial });
        };
        hand_over(vec![pair("lst_l"), pair("lst_m")], 0, true);
        hand_over(Vec::new(), 0, true);
        dispatcher.catch_up("lst_l");
        assert!(dispatcher.lanes["lst_l"].detached.is_some(), "event 0 is still under way");
        dispatcher.take_handed(Handed { pairs: Vec::new(), next_seq: 1, partial: false });
        dispatcher.catch_up("lst_l");
        let detached = dispatcher.lanes["lst_l"].detached.as_ref().unwrap();
        assert_eq!(detached.outstanding.iter().copied().collect::<Vec<_>>(), [0], "it reads its pair of event 0 back");
        store.close().unwrap();
    }

    // Regression (review): lots are refilled as a listener's turns end, so a listener with
    // nothing under way whose retry was parked (memory full as it came due) stayed parked, and
    // every later retry of it behind it, until a restart.
    #[tokio::test]
    async fn a_listener_with_nothing_under_way_takes_its_parked_work_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_producers(SledStore::open(dir.path()).unwrap()).await;
        store.insert_listener(listener("lst_l", "prd_a", "thing.happened")).await.unwrap();
        let event_id = store.append_event(new_event("prd_a", None, 1_000)).await.unwrap().event_id;
        store.settled().await.unwrap();
        let retried = retry_due_now(&store, 0, &event_id);
        store.set_fanout_cursor(&FanoutCursor { next_seq: 1, ..FanoutCursor::default() }).unwrap();

        let (mut dispatcher, memory) = started(&store, 1);
        // Memory is full as the retry comes due: it is parked.
        let full = memory.clone().try_acquire_many_owned(crate::pipeline::MEMORY_ITEMS as u32).unwrap();
        dispatcher.scan_queue(now_ms()).unwrap();
        assert_eq!(dispatcher.lanes["lst_l"].gate.parked, 1, "parked");
        assert!(!dispatcher.claimed.contains_key(&retried));

        // Memory frees up; nothing of the listener is under way, so no turn ends.
        drop(full);
        dispatcher.tick(now_ms());
        dispatcher.scan_queue(now_ms()).unwrap();
        assert_eq!(dispatcher.lanes["lst_l"].gate.parked, 0, "the lot is taken back");
        assert!(dispatcher.claimed.contains_key(&retried), "and the retry is in hand again");
        store.close().unwrap();
    }

    // Regression (review): an ordered listener's first attempt whose turn could not record
    // it waited apart when memory had no place for it, and its listener went on: the next
    // delivery started before it.
    #[tokio::test]
    async fn an_ordered_listeners_unrecorded_pair_is_not_overtaken_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_producers(SledStore::open(dir.path()).unwrap()).await;
        let mut ordered = listener("lst_l", "prd_a", "thing.happened");
        ordered.ordered = true;
        store.insert_listener(ordered).await.unwrap();
        // Both in one millisecond.
        let mut events = Vec::new();
        for _ in 0..2 {
            events.push(store.append_event(new_event("prd_a", None, 1_000)).await.unwrap().event_id);
        }
        store.settled().await.unwrap();
        let pair = |seq: u64| Pair {
            seq,
            event_id: events[seq as usize].clone(),
            producer_id: "prd_a".into(),
            delivery_id: ids::delivery_id(seq, "lst_l"),
            listener_id: "lst_l".into(),
            due_ms: 1_000,
            recheck: false,
            lagging: false,
        };
        let (mut dispatcher, memory) = started(&store, 2);
        let now = now_ms();
        // Event 0's turn could not record it, with memory full: it waits apart. The listener
        // had no lane (idle), and the hold outlasts what would forget an idle lane or lift a
        // back-off (a manual attempt's success, an edit of the listener).
        let full = memory.clone().try_acquire_many_owned(crate::pipeline::MEMORY_ITEMS as u32).unwrap();
        dispatcher.again_later(pair(0), now + 1_000);
        drop(full);
        dispatcher.forget_if_idle("lst_l");
        dispatcher.lanes.get_mut("lst_l").expect("kept while held").gate.reset();
        // Event 1 arrives meanwhile: it does not start (it waits, or is left to be read back).
        memory.try_acquire().unwrap().forget();
        if let Some((_, work)) = dispatcher.offer(Work::First(pair(1)), false, now) {
            dispatcher.set_aside(vec![work]);
        }
        assert!(!dispatcher.start_next("lst_l"), "nothing starts before event 0 is offered again");
        // Event 1 read back into the line (as the hold's end may do before event 0 is offered
        // again, in the same tick): its millisecond is event 0's.
        memory.try_acquire().unwrap().forget();
        dispatcher.lanes.get_mut("lst_l").unwrap().line.push(Work::First(pair(1)), now);
        // Its time passing is not enough: held until the tick that offers it again.
        assert!(!dispatcher.lanes["lst_l"].gate.may_start(1, now + 2_000, false), "still held");
        // Once its time comes, event 0 is back, ahead of event 1.
        dispatcher.tick(now + 1_000);
        let front = dispatcher.lanes["lst_l"].line.front().map(|work| work.delivery_id().to_owned());
        assert_eq!(front, Some(ids::delivery_id(0, "lst_l")));
        store.close().unwrap();
    }
}
