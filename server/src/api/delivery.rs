//! `hookd.v1.DeliveryService`: inspection, replay and recovery. Declared in the contract but
//! not built yet: every method answers UNIMPLEMENTED, never a fake success.

use hookd::v1::delivery_service_server::DeliveryService;
use hookd::v1::{
    Delivery, Event, GetEventRequest, ListAttemptsRequest, ListAttemptsResponse, ListDeliveriesRequest,
    ListDeliveriesResponse, ListEventsRequest, ListEventsResponse, RecoverListenerRequest, RecoverListenerResponse,
    ReplayEventRequest, ReplayEventResponse, RetryDeliveryRequest,
};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
pub struct DeliveryApi;

fn not_built(method: &str) -> Status {
    Status::unimplemented(format!("DeliveryService.{method} is not built yet"))
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_events(&self, _: Request<ListEventsRequest>) -> Result<Response<ListEventsResponse>, Status> {
        Err(not_built("ListEvents"))
    }
    async fn get_event(&self, _: Request<GetEventRequest>) -> Result<Response<Event>, Status> {
        Err(not_built("GetEvent"))
    }
    async fn list_deliveries(
        &self,
        _: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        Err(not_built("ListDeliveries"))
    }
    async fn list_attempts(&self, _: Request<ListAttemptsRequest>) -> Result<Response<ListAttemptsResponse>, Status> {
        Err(not_built("ListAttempts"))
    }
    async fn replay_event(&self, _: Request<ReplayEventRequest>) -> Result<Response<ReplayEventResponse>, Status> {
        Err(not_built("ReplayEvent"))
    }
    async fn retry_delivery(&self, _: Request<RetryDeliveryRequest>) -> Result<Response<Delivery>, Status> {
        Err(not_built("RetryDelivery"))
    }
    async fn recover_listener(
        &self,
        _: Request<RecoverListenerRequest>,
    ) -> Result<Response<RecoverListenerResponse>, Status> {
        Err(not_built("RecoverListener"))
    }
}
