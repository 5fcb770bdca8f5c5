//! `hookd.v1.DeliveryService`: what happened to every event, and how to mend it.
//!
//! A producer key sees only its own events, deliveries and listeners; anything else answers
//! NOT_FOUND, so ids reveal nothing. The admin token sees everything. Listings are served
//! from the blocking pool; retry, replay and recovery queue work for the pipeline and wake
//! it, never making an attempt on the calling task.

use std::collections::HashMap;

use hookd::v1::delivery_service_server::DeliveryService;
use hookd::v1::{
    Attempt as AttemptMessage, Delivery as DeliveryMessage, DeliveryState as StateMessage, Event as EventMessage,
    GetEventRequest, ListAttemptsRequest, ListAttemptsResponse, ListDeliveriesRequest, ListDeliveriesResponse,
    ListEventsRequest, ListEventsResponse, RecoverListenerRequest, RecoverListenerResponse, ReplayEventRequest,
    ReplayEventResponse, RetryDeliveryRequest, RetryDeliveryResponse,
};
use tonic::{Request, Response, Status};

use super::{ApiError, ApiResult, Shared, respond};
use crate::auth::{self, Caller};
use crate::blocking;
use crate::clock::{now_ms, timestamp};
use crate::store::{Attempt, Delivery, DeliveryState, Event, EventFilter, Listener};
use crate::{ids, validate};

/// Deliveries re-queued per write by RecoverListener.
const RECOVER_BATCH: usize = 500;
/// Listeners read per page by ReplayEvent.
const REPLAY_PAGE: usize = 500;
/// Most new deliveries a ReplayEvent answer carries (the rest are counted, and listed by
/// ListDeliveries): about 200 KB, far below a client's default 4 MiB message limit.
const REPLAY_ANSWERED: usize = 1_000;

pub struct DeliveryApi {
    shared: Shared,
}

impl DeliveryApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn caller<T>(&self, request: &Request<T>) -> ApiResult<Caller> {
        auth::admin_or_producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())
    }

    async fn own_event(&self, caller: &Caller, event_id: &str) -> ApiResult<Event> {
        // A caller just answered for a trigger finds its event (it is readable a moment after
        // the answer); waiting for that blocks no thread.
        self.shared.store.settled().await?;
        // Off the async threads: on PostgreSQL the read is a round trip.
        let (store, id) = (self.shared.store.clone(), event_id.to_owned());
        crate::blocking(move || store.event(&id))
            .await?
            .filter(|event| owns(caller, &event.producer_id))
            .ok_or(ApiError::NotFound("event"))
    }

    /// The caller's delivery, recorded or still waiting in the event log for its first attempt
    /// (then `false`).
    async fn own_delivery(&self, caller: &Caller, delivery_id: &str) -> ApiResult<(Delivery, bool)> {
        // Not one of ours, whatever it holds (a database refuses some bytes in text).
        if !ids::is_well_formed(delivery_id, ids::DELIVERY_PREFIX) {
            return Err(ApiError::NotFound("delivery"));
        }
        let history = self.shared.history.clone();
        let id = delivery_id.to_owned();
        blocking(move || history.delivery_view(&id))
            .await?
            .filter(|(delivery, _)| owns(caller, &delivery.producer_id))
            .ok_or(ApiError::NotFound("delivery"))
    }

    /// A disabled listener gets no attempts, manual ones included: say so rather than queue
    /// work that would wait. A deleted one gets none either (its deliveries keep their
    /// recorded outcome).
    fn ensure_listener_enabled(&self, listener_id: &str) -> ApiResult<()> {
        match self.shared.store.listener(listener_id)? {
            Some(listener) if !listener.enabled => Err(ApiError::FailedPrecondition(format!(
                "listener {listener_id} is disabled ({}); enable it with UpdateListener first",
                listener.disabled_reason
            ))),
            Some(_) => Ok(()),
            None => Err(ApiError::FailedPrecondition(format!("listener {listener_id} was deleted"))),
        }
    }

    fn own_listener(&self, caller: &Caller, listener_id: &str) -> ApiResult<Listener> {
        self.shared
            .store
            .listener(listener_id)?
            .filter(|listener| owns(caller, &listener.producer_id))
            .ok_or(ApiError::NotFound("listener"))
    }
}

fn owns(caller: &Caller, producer_id: &str) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Producer(producer) => producer.id == producer_id,
    }
}

/// Milliseconds since the epoch of an optional timestamp; `None` when unset.
fn millis(field: &str, value: Option<prost_types::Timestamp>) -> ApiResult<Option<u64>> {
    let Some(value) = value else { return Ok(None) };
    let seconds = u64::try_from(value.seconds)
        .map_err(|_| ApiError::InvalidArgument(format!("{field} must not be before 1970")))?;
    let nanos = u64::try_from(value.nanos.max(0)).unwrap_or(0);
    Ok(Some(seconds.saturating_mul(1000).saturating_add(nanos / 1_000_000)))
}

fn state_filter(value: i32) -> ApiResult<Option<DeliveryState>> {
    match StateMessage::try_from(value) {
        Ok(StateMessage::Unspecified) => Ok(None),
        Ok(StateMessage::Pending) => Ok(Some(DeliveryState::Pending)),
        Ok(StateMessage::Succeeded) => Ok(Some(DeliveryState::Succeeded)),
        Ok(StateMessage::Failed) => Ok(Some(DeliveryState::Failed)),
        Ok(StateMessage::Cancelled) => Ok(Some(DeliveryState::Cancelled)),
        Err(_) => Err(ApiError::InvalidArgument(format!("state {value} is not a DeliveryState"))),
    }
}

pub(crate) fn event_message(event: Event) -> EventMessage {
    EventMessage {
        id: event.id,
        event_type: event.event_type,
        payload: event.payload,
        content_type: event.content_type,
        created_at: Some(timestamp(event.created_at_ms)),
        idempotency_key: event.idempotency_key,
    }
}

pub(crate) fn delivery_message(delivery: Delivery) -> DeliveryMessage {
    let pending = delivery.state == DeliveryState::Pending as i32;
    DeliveryMessage {
        id: delivery.id,
        event_id: delivery.event_id,
        listener_id: delivery.listener_id,
        state: delivery.state,
        attempts: delivery.attempts,
        next_attempt_at: (pending && delivery.next_attempt_at_ms > 0).then(|| timestamp(delivery.next_attempt_at_ms)),
        last_status_code: delivery.last_status_code,
        created_at: Some(timestamp(delivery.created_at_ms)),
    }
}

fn attempt_message(attempt: Attempt) -> AttemptMessage {
    AttemptMessage {
        number: attempt.number,
        started_at: Some(timestamp(attempt.started_at_ms)),
        duration_ms: attempt.duration_ms,
        status_code: attempt.status_code,
        error: attempt.error,
        response_headers: attempt.response_headers.into_iter().collect::<HashMap<_, _>>(),
        response_body: attempt.response_body,
        trigger: attempt.trigger,
    }
}

fn token(resume_after: Option<String>) -> String {
    resume_after.map(|position| validate::encode_page_token(&position)).unwrap_or_default()
}

/// The calls, for a caller already known: the gRPC service below and the operator's web page
/// (which acts as the admin) both make them.
impl DeliveryApi {
    pub(crate) async fn list_events_as(
        &self,
        caller: &Caller,
        request: ListEventsRequest,
    ) -> ApiResult<ListEventsResponse> {
        let limit = validate::page_size(request.page_size)?;
        let after_seq = match validate::page_token(&request.page_token)? {
            Some(position) => Some(
                position
                    .parse::<u64>()
                    .map_err(|_| ApiError::InvalidArgument("page_token is not one this server issued".into()))?,
            ),
            None => None,
        };
        let event_type = if request.event_type.is_empty() {
            None
        } else {
            Some(validate::event_type(&request.event_type)?.to_owned())
        };
        let filter = EventFilter {
            producer_id: match caller {
                Caller::Admin => None,
                Caller::Producer(producer) => Some(producer.id.clone()),
            },
            event_type,
            since_ms: millis("since", request.since)?.unwrap_or(0),
            until_ms: millis("until", request.until)?,
        };
        let history = self.shared.history.clone();
        let page = blocking(move || history.list_events(&filter, after_seq, limit)).await?;
        Ok(ListEventsResponse {
            events: page.items.into_iter().map(event_message).collect(),
            next_page_token: token(page.resume_after),
        })
    }

    pub(crate) async fn get_event_as(&self, caller: &Caller, request: GetEventRequest) -> ApiResult<EventMessage> {
        let event = self.own_event(caller, &request.event_id).await?;
        Ok(event_message(event))
    }

    pub(crate) async fn list_deliveries_as(
        &self,
        caller: &Caller,
        request: ListDeliveriesRequest,
    ) -> ApiResult<ListDeliveriesResponse> {
        let limit = validate::page_size(request.page_size)?;
        let after = validate::page_token(&request.page_token)?;
        let state = state_filter(request.state)?;
        let history = self.shared.history.clone();
        let page = match (request.event_id.is_empty(), request.listener_id.is_empty()) {
            (false, true) => {
                let event = self.own_event(caller, &request.event_id).await?;
                blocking(move || history.deliveries_of_event(event.seq, state, after.as_deref(), limit)).await?
            }
            (true, false) => {
                if !matches!(caller, Caller::Admin) {
                    self.own_listener(caller, &request.listener_id)?;
                }
                // A caller just answered for a trigger finds its pending first attempts (its
                // event is in the log a moment after the answer).
                self.shared.store.settled().await?;
                let listener_id = request.listener_id;
                blocking(move || history.deliveries_of_listener(&listener_id, state, after.as_deref(), limit)).await?
            }
            _ => return Err(ApiError::InvalidArgument("give exactly one of event_id and listener_id".into())),
        };
        Ok(ListDeliveriesResponse {
            deliveries: page.items.into_iter().map(delivery_message).collect(),
            next_page_token: token(page.resume_after),
        })
    }

    pub(crate) async fn list_attempts_as(
        &self,
        caller: &Caller,
        request: ListAttemptsRequest,
    ) -> ApiResult<ListAttemptsResponse> {
        let limit = validate::page_size(request.page_size)?;
        let after = match validate::page_token(&request.page_token)? {
            Some(position) => position
                .parse::<u32>()
                .map_err(|_| ApiError::InvalidArgument("page_token is not one this server issued".into()))?,
            None => 0,
        };
        let (delivery, recorded) = self.own_delivery(caller, &request.delivery_id).await?;
        if !recorded {
            // Its first attempt is still to come.
            return Ok(ListAttemptsResponse { attempts: Vec::new(), next_page_token: String::new() });
        }
        let queue = self.shared.queue.clone();
        // One more than the page says whether more follow.
        let mut attempts = blocking(move || queue.attempts(&delivery.id, after, limit + 1)).await?;
        let more = attempts.len() > limit;
        attempts.truncate(limit);
        let next = more.then(|| attempts.last().map(|attempt| attempt.number.to_string())).flatten();
        Ok(ListAttemptsResponse {
            attempts: attempts.into_iter().map(attempt_message).collect(),
            next_page_token: token(next),
        })
    }

    pub(crate) async fn replay_event_as(
        &self,
        caller: &Caller,
        request: ReplayEventRequest,
    ) -> ApiResult<ReplayEventResponse> {
        self.shared.ensure_accepting()?;
        let event = self.own_event(caller, &request.event_id).await?;
        let (store, history) = (self.shared.store.clone(), self.shared.history.clone());
        let (created, answered) = blocking(move || -> ApiResult<(usize, Vec<Delivery>)> {
            let now = now_ms();
            let mut created = 0;
            let mut answered = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let listeners =
                    store.list_listeners(&event.producer_id, Some(&event.event_type), after.as_deref(), REPLAY_PAGE)?;
                let batch: Vec<Delivery> = listeners
                    .iter()
                    .filter(|listener| listener.enabled)
                    .map(|listener| Delivery::pending(ids::replay_delivery_id(event.seq), &event, &listener.id, now))
                    .collect();
                if !history.create_deliveries(&batch)? {
                    // Retention took the event meanwhile: the deliveries made before stay.
                    return match created {
                        0 => Err(ApiError::NotFound("event")),
                        _ => Ok((created, answered)),
                    };
                }
                created += batch.len();
                let room = REPLAY_ANSWERED.saturating_sub(answered.len());
                answered.extend(batch.into_iter().take(room));
                match listeners.last() {
                    Some(last) if listeners.len() == REPLAY_PAGE => after = Some(last.id.clone()),
                    _ => return Ok((created, answered)),
                }
            }
        })
        .await?;
        self.shared.pipeline.queued();
        tracing::info!(deliveries = created, "event replayed");
        Ok(ReplayEventResponse {
            deliveries: answered.into_iter().map(delivery_message).collect(),
            created: created as u64,
        })
    }

    pub(crate) async fn retry_delivery_as(
        &self,
        caller: &Caller,
        request: RetryDeliveryRequest,
    ) -> ApiResult<RetryDeliveryResponse> {
        self.shared.ensure_accepting()?;
        let (delivery, recorded) = self.own_delivery(caller, &request.delivery_id).await?;
        if !recorded {
            return Err(ApiError::FailedPrecondition(format!(
                "delivery {} has not had its first attempt yet: it is on its way, in trigger order; retry it once it \
                 has been attempted",
                delivery.id
            )));
        }
        self.ensure_listener_enabled(&delivery.listener_id)?;
        let history = self.shared.history.clone();
        let id = delivery.id.clone();
        let now = now_ms();
        // One asked for earlier and not yet made is the one this asks for.
        let (_, queued_at) =
            blocking(move || history.queue_manual_attempt(&id, now)).await?.ok_or(ApiError::NotFound("delivery"))?;
        self.shared.pipeline.queued();
        Ok(RetryDeliveryResponse { delivery: Some(delivery_message(delivery)), queued_at: Some(timestamp(queued_at)) })
    }

    pub(crate) async fn recover_listener_as(
        &self,
        caller: &Caller,
        request: RecoverListenerRequest,
    ) -> ApiResult<RecoverListenerResponse> {
        self.shared.ensure_accepting()?;
        let listener = self.own_listener(caller, &request.listener_id)?;
        self.ensure_listener_enabled(&listener.id)?;
        let since =
            millis("since", request.since)?.ok_or_else(|| ApiError::InvalidArgument("since is required".into()))?;
        let until = millis("until", request.until)?;
        let history = self.shared.history.clone();
        let listener_id = listener.id.clone();
        let pipeline = self.shared.pipeline.clone();
        // Answered once every one is queued again (durably, a batch at a time): the count in
        // the answer is what was requeued, and a stop half-way loses none of it. Delivery
        // starts with the first batch.
        // A page at a time, so memory stays flat however many failed.
        let count = blocking(move || {
            let mut requeued = 0;
            let mut after = None;
            loop {
                let page = history.failed_deliveries(&listener_id, since, until, after.as_deref(), RECOVER_BATCH)?;
                if !page.items.is_empty() {
                    requeued += history.requeue_failed(&page.items, now_ms())?;
                    pipeline.queued();
                }
                match page.resume_after {
                    Some(resume) => after = Some(resume),
                    None => return Ok::<_, crate::store::StoreError>(requeued),
                }
            }
        })
        .await?;
        tracing::info!(listener_id = %listener.id, count, "listener recovered");
        Ok(RecoverListenerResponse { requeued: u64::try_from(count).unwrap_or(u64::MAX) })
    }
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_events(&self, request: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.list_events_as(&caller, request.into_inner()).await)
    }

    async fn get_event(&self, request: Request<GetEventRequest>) -> Result<Response<EventMessage>, Status> {
        let caller = self.caller(&request)?;
        respond(self.get_event_as(&caller, request.into_inner()).await)
    }

    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.list_deliveries_as(&caller, request.into_inner()).await)
    }

    async fn list_attempts(
        &self,
        request: Request<ListAttemptsRequest>,
    ) -> Result<Response<ListAttemptsResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.list_attempts_as(&caller, request.into_inner()).await)
    }

    async fn replay_event(
        &self,
        request: Request<ReplayEventRequest>,
    ) -> Result<Response<ReplayEventResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.replay_event_as(&caller, request.into_inner()).await)
    }

    async fn retry_delivery(
        &self,
        request: Request<RetryDeliveryRequest>,
    ) -> Result<Response<RetryDeliveryResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.retry_delivery_as(&caller, request.into_inner()).await)
    }

    async fn recover_listener(
        &self,
        request: Request<RecoverListenerRequest>,
    ) -> Result<Response<RecoverListenerResponse>, Status> {
        let caller = self.caller(&request)?;
        respond(self.recover_listener_as(&caller, request.into_inner()).await)
    }
}
