//! Who is calling: the `authorization: Bearer <token>` metadata turned into a [`Caller`].
//!
//! API keys are compared by their SHA-256 only; the admin token by its SHA-256 in constant
//! time. A disabled producer, or a revoked key, is refused here on every call, as the store
//! knows it: on the embedded store from the moment it is disabled; on PostgreSQL from the
//! moment the node hears of the change (other nodes' changes arrive within
//! `postgres::CONTROL_POLL` at most), while a trigger is also checked again in the database as
//! it commits, so no trigger is taken after the change commits. This module never logs a
//! token.

use tonic::metadata::MetadataMap;

use crate::api::ApiError;
use crate::clock::now_ms;
use crate::config::Config;
use crate::crypto;
use crate::store::{Producer, Store};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The operator, holding the admin token.
    Admin,
    /// An enabled producer, holding one of its valid API keys.
    Producer(Producer),
}

/// The bearer token of a request.
fn bearer(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let value = metadata
        .get("authorization")
        .ok_or(ApiError::Unauthenticated("missing authorization metadata: send `authorization: Bearer <key>`"))?;
    let value = value.to_str().map_err(|_| ApiError::Unauthenticated("authorization metadata is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(ApiError::Unauthenticated("authorization metadata must be `Bearer <key>`"))?;
    Ok(token.trim())
}

/// Admits only the admin token.
pub fn admin(metadata: &MetadataMap, config: &Config) -> Result<(), ApiError> {
    let token = bearer(metadata)?;
    if crypto::digests_equal(&crypto::hash_api_key(token), &config.admin_token_hash) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated("this call needs the admin token"))
    }
}

/// Admits an enabled producer's valid API key.
pub fn producer(metadata: &MetadataMap, config: &Config, store: &dyn Store) -> Result<Producer, ApiError> {
    producer_with_key(metadata, config, store).map(|(producer, _)| producer)
}

/// Like [`producer`], also returning the key's hash, for writes that check it again.
pub fn producer_with_key(
    metadata: &MetadataMap,
    config: &Config,
    store: &dyn Store,
) -> Result<(Producer, [u8; 32]), ApiError> {
    let key_hash = crypto::hash_api_key(bearer(metadata)?);
    let Some(producer) = store.producer_by_key(&key_hash, now_ms())? else {
        // Only on the way out: a trigger with a good key never pays for this comparison.
        if crypto::digests_equal(&key_hash, &config.admin_token_hash) {
            return Err(ApiError::Unauthenticated(
                "this call needs a producer API key; the admin token opens AdminService and DeliveryService only",
            ));
        }
        return Err(ApiError::Unauthenticated("unknown or expired API key"));
    };
    if !producer.enabled {
        let reason = if producer.disabled_reason.is_empty() { "no reason given" } else { &producer.disabled_reason };
        return Err(ApiError::PermissionDenied(format!("producer {} is disabled: {reason}", producer.id)));
    }
    Ok((producer, key_hash))
}

/// Admits the admin token or an enabled producer's key.
pub fn admin_or_producer(metadata: &MetadataMap, config: &Config, store: &dyn Store) -> Result<Caller, ApiError> {
    match admin(metadata, config) {
        Ok(()) => Ok(Caller::Admin),
        Err(ApiError::Unauthenticated(_)) => producer(metadata, config, store).map(Caller::Producer),
        Err(other) => Err(other),
    }
}
