//! End-to-end tests: real servers on loopback, real gRPC clients, the real binary where a
//! process boundary matters (crash, startup refusal, logs).

mod client;
mod crash;
mod delivery;
mod disk_full;
mod hostile;
mod inspection;
mod intake;
mod isolation;
mod limits;
mod listeners;
mod metrics;
mod postgres;
mod producers;
mod receiver;
mod restart;
mod secrets;
mod server_tls;
mod service;
mod support;
mod tls;
mod ui;
mod walkthrough;
