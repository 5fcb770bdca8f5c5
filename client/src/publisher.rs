//! [`Publisher`]: many triggers over one `TriggerStream`, each resolved by its own durable ack.
//!
//! One background task owns the stream. Every item carries an idempotency key (one is made up
//! when the caller gave none), and stays pending until its ack arrives. When the connection
//! breaks, the task reconnects with a growing pause and sends every pending item again, with
//! the same key: the server answers a repeat with the first event's id, so nothing is lost
//! and nothing is recorded twice.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hookd::v1::trigger_stream_ack::Result as AckResult;
use hookd::v1::{TriggerRequest, TriggerStreamRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Ack, Client, Error, Trigger};

/// Items waiting to be handed to the stream task (callers wait beyond that).
const QUEUE: usize = 4096;
/// Items sent on the stream and not yet acknowledged, at most.
const IN_FLIGHT: usize = 4096;
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// How a [`Publisher`] behaves.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// How long to keep reconnecting through one outage before pending items fail with the
    /// last error.
    pub give_up_after: Duration,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self { give_up_after: Duration::from_secs(300) }
    }
}

struct Item {
    request: TriggerRequest,
    reply: oneshot::Sender<Result<Ack, Error>>,
}

/// Publishes triggers over one stream; cheap to clone, all clones share the stream.
#[derive(Clone)]
pub struct Publisher {
    items: mpsc::Sender<Item>,
    keys: Arc<KeyMaker>,
}

/// Makes up the idempotency keys of items that came without one: `pub-`, a random part per
/// publisher, then a counter. Keys that follow each other land next to each other in the
/// server's idempotency index, where random ones cost it an insert into a random place
/// (stream bench, three runs each: 62-63k events/s with random keys, 81-94k numbered).
struct KeyMaker {
    random: String,
    next: AtomicU64,
}

impl KeyMaker {
    fn new() -> Self {
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).expect("the operating system random source is available");
        let random = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self { random, next: AtomicU64::new(0) }
    }

    fn key(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("pub-{}-{n:016x}", self.random)
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    pub(crate) fn start(client: Client, options: PublisherOptions) -> Self {
        let (items, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(client, queue, options));
        Self { items, keys: Arc::new(KeyMaker::new()) }
    }

    /// Queues a trigger at once (when the queue has room; otherwise the returned future waits
    /// for room) and returns a future resolved with its ack once the event is durable, or with
    /// the error that refused it. Many may be in flight; dropping the future does not withdraw
    /// a queued trigger.
    pub fn publish(&self, trigger: Trigger) -> impl Future<Output = Result<Ack, Error>> + Send + 'static {
        let mut request = trigger.into_request();
        if request.idempotency_key.is_empty() {
            // Resending after a reconnect must not record the event twice.
            request.idempotency_key = self.keys.key();
        }
        let (reply, answer) = oneshot::channel();
        let waiting = match self.items.try_send(Item { request, reply }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(item)) => Some((self.items.clone(), item)),
            // The task is gone: the answer channel reports it below.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        };
        async move {
            if let Some((items, item)) = waiting {
                items.send(item).await.map_err(|_| Error::PublisherClosed)?;
            }
            answer.await.map_err(|_| Error::PublisherClosed)?
        }
    }
}

/// Why one connection ended.
enum Ended {
    /// Every publisher handle is gone and nothing is pending: done.
    Finished,
    /// The connection broke or the server went away. `progressed`: acks came back on it.
    Broken { error: Error, progressed: bool },
}

async fn run(client: Client, mut queue: mpsc::Receiver<Item>, options: PublisherOptions) {
    let mut pending: BTreeMap<u64, Item> = BTreeMap::new();
    let mut next_ref = 0u64;
    let mut pause = FIRST_PAUSE;
    let mut outage_started: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            // Connect only with work to do.
            match queue.recv().await {
                Some(item) => {
                    pending.insert(next_ref, item);
                    next_ref += 1;
                }
                None => return,
            }
        }
        match connection(&client, &mut queue, &mut pending, &mut next_ref).await {
            Ended::Finished => return,
            Ended::Broken { error, progressed } => {
                if progressed {
                    // The outage, if any, ended on that connection.
                    outage_started = None;
                    pause = FIRST_PAUSE;
                }
                let started = *outage_started.get_or_insert_with(Instant::now);
                if !error.is_retryable() || started.elapsed() >= options.give_up_after {
                    // Everything waiting fails now, queued items included; the next item
                    // tries afresh.
                    for (_, item) in std::mem::take(&mut pending) {
                        let _ = item.reply.send(Err(error.clone()));
                    }
                    while let Ok(item) = queue.try_recv() {
                        let _ = item.reply.send(Err(error.clone()));
                    }
                    outage_started = None;
                    pause = FIRST_PAUSE;
                    continue;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// An error that ends an open stream. Only answers about the caller's request itself are
/// final; anything else (a reset connection, a server that went away) is worth a reconnect,
/// and resending is safe because every item carries its idempotency key.
fn stream_error(status: tonic::Status) -> Error {
    match Error::from(status) {
        error @ (Error::Unauthenticated(_)
        | Error::PermissionDenied(_)
        | Error::InvalidArgument(_)
        | Error::Unimplemented(_)
        | Error::NotFound(_)
        | Error::ResourceExhausted(_)) => error,
        other => Error::Unavailable(other.to_string()),
    }
}

/// The first pending item not yet sent on this connection.
fn next_unsent(pending: &BTreeMap<u64, Item>, sent_up_to: Option<u64>) -> Option<(u64, &Item)> {
    let from = sent_up_to.map_or(0, |reference| reference + 1);
    pending.range(from..).next().map(|(reference, item)| (*reference, item))
}

/// Runs one stream: sends what is pending (oldest first, with the same keys), then new items,
/// and settles acks.
async fn connection(
    client: &Client,
    queue: &mut mpsc::Receiver<Item>,
    pending: &mut BTreeMap<u64, Item>,
    next_ref: &mut u64,
) -> Ended {
    let (requests_tx, outgoing) = mpsc::channel(IN_FLIGHT);
    // Dropped to half-close the stream once draining: the server then ends it after its acks.
    let mut requests = Some(requests_tx);
    let mut acks = match client.trigger_service().trigger_stream(ReceiverStream::new(outgoing)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Broken { error: stream_error(status), progressed: false },
    };
    // Every pending item with a reference up to this one was sent on this connection.
    let mut sent_up_to: Option<u64> = None;
    let mut closed = false;
    let mut progressed = false;
    // Set when the server refused an item for now (e.g. it is shutting down): send nothing
    // more, read the acks still coming, then reconnect.
    let mut draining: Option<Error> = None;
    // Items over the producer's trigger rate, oldest first: sent again on this stream one at a
    // time, `spacing` apart (the wait the server named: about one trigger's share of the
    // rate), so the publisher goes at the rate rather than resend its whole window each time.
    // Nothing new is taken meanwhile.
    let mut held: VecDeque<u64> = VecDeque::new();
    let mut spacing = Duration::ZERO;
    let mut release_at: Option<tokio::time::Instant> = None;
    loop {
        while let Some(sender) = &requests
            && let Some((reference, item)) = next_unsent(pending, sent_up_to)
        {
            let request = TriggerStreamRequest { r#ref: reference, trigger: Some(item.request.clone()) };
            if sender.try_send(request).is_err() {
                break;
            }
            sent_up_to = Some(reference);
        }
        if closed && pending.is_empty() {
            return Ended::Finished;
        }
        let room = draining.is_none()
            && held.is_empty()
            && pending.len() < IN_FLIGHT
            && next_unsent(pending, sent_up_to).is_none();
        tokio::select! {
            () = tokio::time::sleep_until(release_at.unwrap_or_else(tokio::time::Instant::now)), if release_at.is_some() => {
                // Sent again under a new reference, so it goes out after what was sent before.
                if let Some(item) = held.pop_front().and_then(|reference| pending.remove(&reference)) {
                    pending.insert(*next_ref, item);
                    *next_ref += 1;
                }
                release_at = (!held.is_empty()).then(|| tokio::time::Instant::now() + spacing);
            }
            item = queue.recv(), if room && !closed => match item {
                Some(item) => {
                    pending.insert(*next_ref, item);
                    *next_ref += 1;
                }
                None => closed = true,
            },
            ack = acks.message() => match ack {
                Ok(Some(ack)) => {
                    let Some(item) = pending.remove(&ack.r#ref) else { continue };
                    match ack.result {
                        Some(AckResult::Ack(ack)) => {
                            progressed = true;
                            let _ = item.reply.send(Ok(Ack { event_id: ack.event_id, duplicate: ack.duplicate }));
                        }
                        Some(AckResult::Error(error)) => {
                            // Over the producer's rate: sent again after a pause, as after an
                            // outage (its key makes a resend of one recorded meanwhile a
                            // duplicate, never a second event).
                            let code = tonic::Code::from(error.code);
                            if code == tonic::Code::ResourceExhausted && error.retry_after_ms > 0 {
                                // Over the rate: held, and sent again in its turn.
                                spacing = Duration::from_millis(error.retry_after_ms).min(LONGEST_PAUSE);
                                pending.insert(ack.r#ref, item);
                                held.push_back(ack.r#ref);
                                release_at.get_or_insert_with(|| tokio::time::Instant::now() + spacing);
                                continue;
                            }
                            let error = Error::from_code(code, error.message);
                            if error.is_retryable() {
                                // No progress: an outage answered item by item (a store that
                                // cannot write, say) is given up on like one that drops the
                                // connection.
                                pending.insert(ack.r#ref, item);
                                draining.get_or_insert(error);
                                requests = None;
                                continue;
                            }
                            progressed = true;
                            let _ = item.reply.send(Err(error));
                        }
                        None => {
                            let error = Error::Other { code: tonic::Code::Internal, message: "an empty ack".into() };
                            let _ = item.reply.send(Err(error));
                        }
                    }
                }
                Ok(None) => {
                    let error = draining.unwrap_or_else(|| Error::Unavailable("the server ended the stream".into()));
                    return Ended::Broken { error, progressed };
                }
                Err(status) => return Ended::Broken { error: stream_error(status), progressed },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_follow_each_other() {
        let (one, other) = (KeyMaker::new(), KeyMaker::new());
        let keys: Vec<String> = (0..1000).map(|_| one.key()).collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "each key sorts after the one before");
        let theirs = other.key();
        assert!(!keys.contains(&theirs), "publishers make different keys");
        assert_ne!(keys[0][..28], theirs[..28], "each publisher has its own random part");
        assert!(keys.iter().all(|key| key.len() == 45 && key.starts_with("pub-")));
    }
}
