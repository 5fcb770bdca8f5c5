//! Hostile input: a thousand malformed or random messages to every RPC the contract declares,
//! sent as raw bytes (so nothing on the client side tidies them), with no credentials, a
//! producer's key, the admin token, or metadata that is not even UTF-8. Every answer must carry
//! a code that names the caller's mistake (or OK): never UNKNOWN or INTERNAL, which would say
//! hookd is broken, nor UNAVAILABLE, which would say it fell over. Afterwards hookd still
//! serves, and every event acknowledged before is still there.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut};
use hookd_client::v1::{GetEventRequest, TriggerRequest};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{ADMIN_TOKEN, TestServer, bounded};

/// Messages sent to each RPC.
const PER_RPC: usize = 1_000;
/// Calls under way at once.
const CONCURRENCY: usize = 32;

/// Sends and receives bytes as they are: the test's messages are not protobuf's to check.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One RPC of the contract.
#[derive(Debug, Clone)]
struct Rpc {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every RPC of package `hookd.v1`, read from the descriptors the server serves for reflection,
/// so an RPC added later is covered without touching this test.
fn rpcs() -> Vec<Rpc> {
    let set = prost_types::FileDescriptorSet::decode(hookd::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for file in set.file.iter().filter(|file| file.package() == "hookd.v1") {
        for service in &file.service {
            for method in &service.method {
                rpcs.push(Rpc {
                    path: format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    assert!(rpcs.len() >= 22, "the contract's RPCs are found: {rpcs:?}");
    rpcs
}

/// A small deterministic generator (xorshift64*): the same messages on every run, so a
/// failure can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    varint(out, (number << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `n`th hostile message: random bytes, random but well-formed fields, huge strings,
/// strings that are not UTF-8, huge page tokens, truncated fields.
fn message(random: &mut Random, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    match n % 7 {
        0 => {
            let len = random.below(64) as usize;
            out = random.bytes(len);
        }
        1 => {
            let len = random.below(4096) as usize;
            out = random.bytes(len);
        }
        2 => {
            // Well-formed fields of every wire type, with random numbers and contents.
            for _ in 0..random.below(8) + 1 {
                let number = random.below(12) + 1;
                match random.below(4) {
                    0 => {
                        varint(&mut out, number << 3);
                        varint(&mut out, random.next());
                    }
                    1 => {
                        let len = random.below(200) as usize;
                        let bytes = random.bytes(len);
                        field(&mut out, number, &bytes);
                    }
                    2 => {
                        varint(&mut out, (number << 3) | 1);
                        out.extend_from_slice(&random.next().to_le_bytes());
                    }
                    _ => {
                        varint(&mut out, (number << 3) | 5);
                        out.extend_from_slice(&(random.next() as u32).to_le_bytes());
                    }
                }
            }
        }
        3 => {
            // A huge string in one of the first fields (under the transport's limit).
            let len = 100_000 + random.below(900_000) as usize;
            field(&mut out, random.below(5) + 1, &vec![b'a' + random.below(26) as u8; len]);
        }
        4 => {
            // Not UTF-8 where strings go.
            let mut bytes = random.bytes(16);
            bytes[0] = 0xff;
            field(&mut out, random.below(4) + 1, &bytes);
        }
        5 => {
            // A huge page token (or whatever the field is in this message).
            let token: Vec<u8> =
                (0..10_000).map(|_| b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/="[random.below(39) as usize]).collect();
            field(&mut out, random.below(4) + 1, &token);
        }
        _ => {
            // A length-delimited field that claims more than follows.
            varint(&mut out, (random.below(6) + 1) << 3 | 2);
            varint(&mut out, 1_000 + random.below(1_000));
            out.extend_from_slice(&random.bytes(10));
        }
    }
    out
}

/// The credentials of the `n`th call.
fn credentials(n: usize, api_key: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    match n % 4 {
        0 => None,
        1 => Some(format!("Bearer {api_key}").parse().unwrap()),
        2 => Some(format!("Bearer {ADMIN_TOKEN}").parse().unwrap()),
        // Bytes that are no text at all: HTTP/2 carries them, and so does an ASCII
        // MetadataValue (it takes any bytes an HTTP header value may hold).
        _ => Some(MetadataValue::try_from(&b"Bearer \xff\xfe\x80 hkp_\xc3"[..]).unwrap()),
    }
}

/// Sends one message (for a client stream: a few) and returns the code it was answered with.
async fn call(
    channel: Channel,
    rpc: &Rpc,
    payload: Vec<u8>,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    random_extra: Vec<Vec<u8>>,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the channel is ready");
    let path: http::uri::PathAndQuery = rpc.path.parse().unwrap();
    fn attach<T>(
        mut request: tonic::Request<T>,
        auth: &Option<MetadataValue<tonic::metadata::Ascii>>,
    ) -> tonic::Request<T> {
        if let Some(value) = auth {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }
    let answered = match (rpc.client_streaming, rpc.server_streaming) {
        (false, false) => grpc.unary(attach(tonic::Request::new(payload), &auth), path, Raw).await.map(|_| ()),
        (false, true) => match grpc.server_streaming(attach(tonic::Request::new(payload), &auth), path, Raw).await {
            // An accepted watch stays open: its first message (or its end) is enough.
            Ok(response) => {
                let mut stream = response.into_inner();
                match tokio::time::timeout(Duration::from_millis(50), stream.message()).await {
                    Ok(Err(status)) => Err(status),
                    _ => Ok(()),
                }
            }
            Err(status) => Err(status),
        },
        (true, _) => {
            let items = std::iter::once(payload).chain(random_extra);
            let request = attach(tonic::Request::new(tokio_stream::iter(items)), &auth);
            match grpc.streaming(request, path, Raw).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let mut outcome = Ok(());
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                            Ok(Ok(Some(_))) => {}
                            Ok(Ok(None)) => break,
                            Ok(Err(status)) => {
                                outcome = Err(status);
                                break;
                            }
                            Err(_) => panic!("{}: a stream of hostile items neither answered nor ended", rpc.path),
                        }
                    }
                    outcome
                }
                Err(status) => Err(status),
            }
        }
    };
    match answered {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_messages_to_every_rpc_get_proper_codes_and_lose_nothing() {
    let server = TestServer::start().await;
    let (producer, _, api_key) = server.producer("target").await;
    // Events acknowledged before the onslaught.
    let mut acknowledged = Vec::new();
    for n in 0..20 {
        let request =
            TriggerRequest { event_type: "before".into(), payload: format!("{n}").into_bytes(), ..Default::default() };
        acknowledged.push(producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id);
    }

    let channel = Channel::from_shared(server.endpoint()).unwrap().connect().await.unwrap();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut codes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for rpc in rpcs() {
        let mut calls = tokio::task::JoinSet::new();
        let mut sent = 0;
        while sent < PER_RPC {
            // A client stream carries several messages per call; the count is of messages.
            let extra = if rpc.client_streaming { random.below(5) as usize } else { 0 };
            let payload = message(&mut random, sent);
            let more: Vec<Vec<u8>> = (1..=extra).map(|k| message(&mut random, sent + k)).collect();
            let auth = credentials(sent, &api_key);
            let (channel, rpc_for_call) = (channel.clone(), rpc.clone());
            calls.spawn(async move { call(channel, &rpc_for_call, payload, auth, more).await });
            sent += 1 + extra;
            if calls.len() >= CONCURRENCY {
                let code = calls.join_next().await.unwrap().unwrap();
                *codes.entry(rpc.path.clone()).or_default().entry(format!("{code:?}")).or_default() += 1;
            }
        }
        while let Some(code) = calls.join_next().await {
            let code = code.unwrap();
            *codes.entry(rpc.path.clone()).or_default().entry(format!("{code:?}")).or_default() += 1;
        }
    }

    let improper = ["Unknown", "Internal", "Unavailable", "DataLoss", "Unimplemented", "Cancelled", "DeadlineExceeded"];
    for (path, by_code) in &codes {
        for code in improper {
            assert!(!by_code.contains_key(code), "{path} answered {code}: {codes:#?}");
        }
        // Most of what was sent is refused as the caller's mistake, not accepted.
        let refused: usize = ["InvalidArgument", "Unauthenticated"].iter().filter_map(|code| by_code.get(*code)).sum();
        assert!(refused > 0, "{path}: {by_code:?}");
    }

    // hookd still serves, and nothing acknowledged before is gone.
    let mut health = HealthClient::new(channel.clone());
    let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    for event_id in &acknowledged {
        let request = GetEventRequest { event_id: event_id.clone() };
        let event = bounded("GetEvent", producer.delivery().get_event(request)).await.unwrap().into_inner();
        assert_eq!(event.event_type, "before");
    }
    let after = TriggerRequest { event_type: "after".into(), payload: b"{}".to_vec(), ..Default::default() };
    producer.trigger_service().trigger(after).await.unwrap();
}
