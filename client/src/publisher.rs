//! [`Publisher`]: many triggers over one `TriggerStream`, each resolved by its own durable ack.
//!
//! One background task owns the stream. Every item carries an idempotency key (one is made up
//! when the caller gave none), and stays pending until its ack arrives. When the connection
//! breaks, the task reconnects with a growing pause and sends every pending item again, with
//! the same key: the server answers a repeat with the first event's id, so nothing is lost
//! and nothing is recorded twice.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use hookd::v1::trigger_stream_ack::Result as AckResult;
use hookd::v1::{TriggerRequest, TriggerStreamRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Ack, Client, Error, Trigger};

/// Items waiting to be handed to the stream task (callers wait beyond that).
const QUEUE: usize = 4096;
/// Items sent on the stream and not yet acknowledged, at most.
const IN_FLIGHT: usize = 1024;
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
        Self { items }
    }

    /// Queues a trigger; the future resolves with its ack once the event is durable (or with
    /// the error that refused it). Many may be in flight at once; dropping the future does not
    /// withdraw the trigger.
    pub fn publish(&self, trigger: Trigger) -> impl Future<Output = Result<Ack, Error>> + Send + 'static {
        let items = self.items.clone();
        let mut request = trigger.into_request();
        if request.idempotency_key.is_empty() {
            // Resending after a reconnect must not record the event twice.
            request.idempotency_key = generated_key();
        }
        async move {
            let (reply, answer) = oneshot::channel();
            items.send(Item { request, reply }).await.map_err(|_| Error::PublisherClosed)?;
            answer.await.map_err(|_| Error::PublisherClosed)?
        }
    }
}

fn generated_key() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system random source is available");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("pub-{hex}")
}

/// Why one connection ended.
enum Ended {
    /// Every publisher handle is gone and nothing is pending: done.
    Finished,
    /// The connection broke or the server went away: reconnect.
    Broken(Error),
}

async fn run(client: Client, mut queue: mpsc::Receiver<Item>, options: PublisherOptions) {
    let mut pending: BTreeMap<u64, Item> = BTreeMap::new();
    let mut next_ref = 0u64;
    let mut pause = FIRST_PAUSE;
    let mut outage_started: Option<Instant> = None;
    loop {
        match connection(&client, &mut queue, &mut pending, &mut next_ref).await {
            Ended::Finished => return,
            Ended::Broken(error) => {
                let started = *outage_started.get_or_insert_with(Instant::now);
                if !error.is_retryable() || started.elapsed() >= options.give_up_after {
                    for (_, item) in std::mem::take(&mut pending) {
                        let _ = item.reply.send(Err(error.clone()));
                    }
                    outage_started = None;
                    pause = FIRST_PAUSE;
                    // Wait for more work before trying again.
                    match queue.recv().await {
                        Some(item) => {
                            pending.insert(next_ref, item);
                            next_ref += 1;
                        }
                        None => return,
                    }
                    continue;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
        // A connection that delivered acks ends the outage.
        if pending.is_empty() {
            outage_started = None;
            pause = FIRST_PAUSE;
        }
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
    let (requests, outgoing) = mpsc::channel(IN_FLIGHT);
    let mut acks = match client.trigger_service().trigger_stream(ReceiverStream::new(outgoing)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Broken(status.into()),
    };
    // Every pending item with a reference up to this one was sent on this connection.
    let mut sent_up_to: Option<u64> = None;
    let mut closed = false;
    loop {
        while let Some((reference, item)) = next_unsent(pending, sent_up_to) {
            let request = TriggerStreamRequest { r#ref: reference, trigger: Some(item.request.clone()) };
            if requests.try_send(request).is_err() {
                break;
            }
            sent_up_to = Some(reference);
        }
        if closed && pending.is_empty() {
            return Ended::Finished;
        }
        let room = pending.len() < IN_FLIGHT && next_unsent(pending, sent_up_to).is_none();
        tokio::select! {
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
                            let _ = item.reply.send(Ok(Ack { event_id: ack.event_id, duplicate: ack.duplicate }));
                        }
                        Some(AckResult::Error(error)) => {
                            let error = Error::from_code(tonic::Code::from(error.code), error.message);
                            if error.is_retryable() {
                                // Refused for now (e.g. the server is shutting down): again later.
                                pending.insert(ack.r#ref, item);
                                return Ended::Broken(error);
                            }
                            let _ = item.reply.send(Err(error));
                        }
                        None => {
                            let error = Error::Other { code: tonic::Code::Internal, message: "an empty ack".into() };
                            let _ = item.reply.send(Err(error));
                        }
                    }
                }
                Ok(None) => return Ended::Broken(Error::Unavailable("the server ended the stream".into())),
                Err(status) => return Ended::Broken(status.into()),
            },
        }
    }
}
