//! The server as a gRPC citizen: health and reflection (v1 and v1alpha), and shutdown.

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::support::{TestServer, bounded};

const HOOKD_SERVICES: [&str; 4] =
    ["hookd.v1.AdminService", "hookd.v1.DeliveryService", "hookd.v1.RegisterService", "hookd.v1.TriggerService"];

#[tokio::test]
async fn health_is_serving_for_the_server_and_each_service() {
    let server = TestServer::start().await;
    let channel = hookd_client::connect(server.endpoint()).await.unwrap();
    let mut health = HealthClient::new(channel);
    for service in std::iter::once("").chain(HOOKD_SERVICES) {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn shutdown_turns_health_to_not_serving() {
    let server = TestServer::start().await;
    let channel = hookd_client::connect(server.endpoint()).await.unwrap();
    let mut updates =
        HealthClient::new(channel).watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first: HealthCheckResponse = bounded("first health update", updates.next()).await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    server.begin_stop();
    let next = bounded("health update after shutdown", updates.next()).await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(updates);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let server = TestServer::start().await;
    let channel = hookd_client::connect(server.endpoint()).await.unwrap();

    use tonic_reflection::pb::v1;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = answer.message_response
    else {
        panic!("expected a service list, got {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in HOOKD_SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }

    use tonic_reflection::pb::v1alpha as alpha;
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "hookd.v1.TriggerService".into(),
        )),
    };
    let mut client = alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    assert!(
        matches!(answer.message_response, Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty()),
        "v1alpha describes TriggerService: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let server = TestServer::start_with(dir, &crate::support::master_key(), |config| config.max_connections = 2).await;
    let health = |channel| HealthClient::new(channel);
    let check = || HealthCheckRequest { service: String::new() };
    let first = hookd_client::connect(server.endpoint()).await.unwrap();
    let second = hookd_client::connect(server.endpoint()).await.unwrap();
    health(first.clone()).check(check()).await.unwrap();
    health(second.clone()).check(check()).await.unwrap();
    let endpoint = server.endpoint();
    let mut third = tokio::spawn(async move {
        let channel = hookd_client::connect(endpoint).await.unwrap();
        health(channel).check(check()).await.unwrap()
    });
    // Two connections are open: the third is not served (this wait can only pass wrongly,
    // never fail wrongly, on a slow machine).
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), &mut third).await.is_err());
    drop(first);
    let answer = bounded("the third connection, once the first closed", third).await.unwrap();
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    drop(second);
}
