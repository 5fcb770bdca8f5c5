//! Keys and secrets: the master key and the keys derived from it, sealed listener secrets,
//! event hashes, API keys and their hashes.
//!
//! This module owns every cryptographic decision. It never logs, stores or returns a
//! plaintext secret or key except through the one `Opened`/`Minted` value its caller asked
//! for, and the master key never leaves it: only a key check value and key ids do.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Length of the master key in bytes.
pub const MASTER_KEY_LEN: usize = 32;
/// Envelope layout version of a sealed secret.
const ENVELOPE_V1: u8 = 1;
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
/// Version byte mixed into event hashes, so a future derivation can coexist with this one.
const EVENT_HASH_V1: u8 = 1;
/// Bytes of the HMAC kept in an event hash (160 bits: unguessable, still short).
const EVENT_HASH_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key must be base64 of exactly 32 bytes")]
    BadMasterKey,
    #[error("sealed secret is malformed")]
    MalformedEnvelope,
    #[error("sealed secret was made with master key {found}, but the configured key is {expected}")]
    WrongKeyId { found: String, expected: String },
    #[error("sealed secret does not open: wrong key, wrong listener, or tampered bytes")]
    Unseal,
}

/// Fills a fresh array with random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system random source is available");
    bytes
}

/// What one master key seals and opens with: its public id, its sealing key, its check value.
#[derive(Clone)]
struct Sealer {
    key_id: [u8; KEY_ID_LEN],
    seal_key: [u8; 32],
    check: [u8; 32],
}

impl Sealer {
    fn new(master_key: &[u8; MASTER_KEY_LEN]) -> Self {
        let id = hmac(master_key, &[b"hookd/v1/key-id"]);
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&id[..KEY_ID_LEN]);
        Self {
            key_id,
            seal_key: hmac(master_key, &[b"hookd/v1/seal-listener-secret"]),
            check: hmac(master_key, &[b"hookd/v1/key-check"]),
        }
    }
}

/// The master key, the keys derived from it, and any previous master keys still accepted
/// while secrets are re-sealed under the current one (a key ring). Cloning shares nothing
/// mutable.
#[derive(Clone)]
pub struct Keyring {
    /// Seals everything new.
    current: Sealer,
    /// Open what they sealed, until it is re-sealed under `current`.
    previous: Vec<Sealer>,
    /// The event-hash key: derived from the data directory's first master key and kept, sealed,
    /// in the database, so that event hashes outlive master key rotations.
    hash_key: [u8; 32],
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let previous: Vec<String> = self.previous.iter().map(|sealer| hex(&sealer.key_id)).collect();
        f.debug_struct("Keyring").field("key_id", &self.key_id()).field("previous", &previous).finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// What the event-hash key is bound to when sealed, as a listener secret is to its listener.
const HASH_KEY_AAD: &str = "hookd/v1/event-hash-key";

impl Keyring {
    /// Derives the working keys from a 32-byte master key. Each derived key is an HMAC of the
    /// master key over its own label, so one never reveals another or the master key.
    pub fn new(master_key: &[u8; MASTER_KEY_LEN]) -> Self {
        Self {
            current: Sealer::new(master_key),
            previous: Vec::new(),
            hash_key: hmac(master_key, &[b"hookd/v1/event-hash"]),
        }
    }

    /// Also accepts `previous`'s master key (and those it accepts) for opening, during a
    /// rotation; sealing stays with this one's.
    /// Event hashes stay the previous key's (the database's sealed copy, when there is one,
    /// decides in the end: see `rekey::open`).
    pub fn with_previous(mut self, previous: &Keyring) -> Self {
        self.hash_key = previous.hash_key;
        for sealer in std::iter::once(&previous.current).chain(&previous.previous) {
            if sealer.key_id != self.current.key_id && self.previous.iter().all(|p| p.key_id != sealer.key_id) {
                self.previous.push(sealer.clone());
            }
        }
        self
    }

    /// Whether previous master keys are configured: a rotation is under way.
    pub fn rotating(&self) -> bool {
        !self.previous.is_empty()
    }

    /// The (key id, check value) of every master key accepted, the current one first.
    pub fn checks(&self) -> Vec<(String, [u8; 32])> {
        std::iter::once(&self.current).chain(&self.previous).map(|sealer| (hex(&sealer.key_id), sealer.check)).collect()
    }

    /// The event-hash key sealed for the database.
    pub fn sealed_hash_key(&self) -> Vec<u8> {
        self.seal(HASH_KEY_AAD, &self.hash_key)
    }

    /// Takes the event-hash key the database keeps (sealed by [`Keyring::sealed_hash_key`]).
    pub fn use_sealed_hash_key(&mut self, envelope: &[u8]) -> Result<(), CryptoError> {
        let key = self.open(HASH_KEY_AAD, envelope)?;
        self.hash_key = key.try_into().map_err(|_| CryptoError::MalformedEnvelope)?;
        Ok(())
    }

    /// An envelope sealed again under the current master key; `None` when it already is.
    pub fn reseal(&self, listener_id: &str, envelope: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        if envelope.get(1..1 + KEY_ID_LEN) == Some(&self.current.key_id[..]) {
            return Ok(None);
        }
        let secret = self.open(listener_id, envelope)?;
        Ok(Some(self.seal(listener_id, &secret)))
    }

    /// [`Keyring::reseal`] for the sealed event-hash key.
    pub fn reseal_hash_key(&self, envelope: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        self.reseal(HASH_KEY_AAD, envelope)
    }

    /// Parses a master key given as base64 (standard alphabet, padding optional).
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes = STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|_| CryptoError::BadMasterKey)?;
        let key: [u8; MASTER_KEY_LEN] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::new(&key))
    }

    /// A short public name for the current master key (hex), stored in every envelope.
    pub fn key_id(&self) -> String {
        hex(&self.current.key_id)
    }

    /// A value that proves which master key is configured without revealing it: stored in the
    /// database at first start and compared at every later start.
    pub fn key_check(&self) -> [u8; 32] {
        self.current.check
    }

    /// Encrypts a listener secret for storage. The listener id is bound as associated data,
    /// so the envelope opens only for that listener.
    pub fn seal(&self, listener_id: &str, secret: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(&self.current.seal_key.into());
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes();
        let nonce = XNonce::from(nonce_bytes);
        let aad = seal_aad(listener_id);
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: secret, aad: &aad })
            .expect("XChaCha20-Poly1305 encrypts messages of any practical length");
        let mut envelope = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + ciphertext.len());
        envelope.push(ENVELOPE_V1);
        envelope.extend_from_slice(&self.current.key_id);
        envelope.extend_from_slice(&nonce_bytes);
        envelope.extend_from_slice(&ciphertext);
        envelope
    }

    /// Decrypts an envelope made by [`Keyring::seal`] for the same listener, under the current
    /// master key or a previous one still accepted.
    pub fn open(&self, listener_id: &str, envelope: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let header = 1 + KEY_ID_LEN + NONCE_LEN;
        if envelope.len() < header || envelope[0] != ENVELOPE_V1 {
            return Err(CryptoError::MalformedEnvelope);
        }
        let key_id = &envelope[1..1 + KEY_ID_LEN];
        let sealer = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|sealer| sealer.key_id == key_id)
            .ok_or_else(|| CryptoError::WrongKeyId { found: hex(key_id), expected: self.key_id() })?;
        let nonce = XNonce::try_from(&envelope[1 + KEY_ID_LEN..header]).map_err(|_| CryptoError::MalformedEnvelope)?;
        let cipher = XChaCha20Poly1305::new(&sealer.seal_key.into());
        let aad = seal_aad(listener_id);
        cipher.decrypt(&nonce, Payload { msg: &envelope[header..], aad: &aad }).map_err(|_| CryptoError::Unseal)
    }

    /// The event hash of (producer id, event type): `evh_` + hex of a truncated
    /// HMAC-SHA256(hash key, version ‖ producer id ‖ 0 ‖ event type). It depends on the
    /// producer's id, never its API key, so key rotation changes no hash.
    pub fn event_hash(&self, producer_id: &str, event_type: &str) -> String {
        let mac = hmac(&self.hash_key, &[&[EVENT_HASH_V1], producer_id.as_bytes(), &[0], event_type.as_bytes()]);
        format!("evh_{}", hex(&mac[..EVENT_HASH_BYTES]))
    }
}

fn seal_aad(listener_id: &str) -> Vec<u8> {
    let mut aad = b"hookd/v1/listener-secret/".to_vec();
    aad.extend_from_slice(listener_id.as_bytes());
    aad
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// A freshly minted API key (`hkp_` + base64url of 32 random bytes) and its stored hash.
pub struct MintedKey {
    /// Shown once to the caller.
    pub plaintext: String,
    /// SHA-256 of the plaintext: the only form stored.
    pub hash: [u8; 32],
}

impl fmt::Debug for MintedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MintedKey(..)")
    }
}

/// Mints a random producer API key.
pub fn mint_api_key() -> MintedKey {
    let plaintext = format!("hkp_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()));
    let hash = hash_api_key(&plaintext);
    MintedKey { plaintext, hash }
}

/// SHA-256 of an API key or token as presented by a caller.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    hmac(key, &[message])
}

/// Compares two strings in time that does not depend on where they differ (by their digests).
pub fn strings_equal(a: &str, b: &str) -> bool {
    digests_equal(&hash_api_key(a), &hash_api_key(b))
}

/// Compares two digests without an early exit, so timing tells nothing about the prefix.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Mints a Standard Webhooks signing secret: `whsec_` + base64 of 24 random bytes.
pub fn mint_listener_secret() -> String {
    format!("whsec_{}", STANDARD.encode(random_bytes::<24>()))
}

/// A random token for development-mode admin access (base64url of 32 bytes).
pub fn mint_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// A fresh master key, base64 encoded, for development mode.
pub fn mint_master_key_base64() -> String {
    STANDARD.encode(random_bytes::<MASTER_KEY_LEN>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(byte: u8) -> Keyring {
        Keyring::new(&[byte; MASTER_KEY_LEN])
    }

    #[test]
    fn sealed_secret_opens_for_its_listener() {
        let keys = keyring(1);
        let envelope = keys.seal("lst_a", b"s3cret-value");
        assert_eq!(keys.open("lst_a", &envelope).unwrap(), b"s3cret-value");
    }

    #[test]
    fn sealed_secret_hides_the_plaintext() {
        let keys = keyring(1);
        let envelope = keys.seal("lst_a", b"s3cret-value");
        assert!(!envelope.windows(12).any(|w| w == b"s3cret-value"));
        // A fresh nonce each time: sealing twice never repeats the ciphertext.
        assert_ne!(envelope, keys.seal("lst_a", b"s3cret-value"));
    }

    #[test]
    fn sealed_secret_refuses_wrong_key_listener_or_tampering() {
        let keys = keyring(1);
        let envelope = keys.seal("lst_a", b"s3cret-value");

        assert!(matches!(keyring(2).open("lst_a", &envelope), Err(CryptoError::WrongKeyId { .. })));
        assert!(matches!(keys.open("lst_b", &envelope), Err(CryptoError::Unseal)));

        for index in [0, 1, 10, envelope.len() - 1] {
            let mut tampered = envelope.clone();
            tampered[index] ^= 0x01;
            assert!(keys.open("lst_a", &tampered).is_err(), "byte {index} flipped");
        }
        assert!(matches!(keys.open("lst_a", &envelope[..20]), Err(CryptoError::MalformedEnvelope)));
    }

    #[test]
    fn a_key_ring_opens_what_a_previous_key_sealed_and_reseals_it_under_the_current() {
        let (old, new) = (keyring(1), keyring(2));
        let envelope = old.seal("lst_a", b"s3cret-value");
        let ring = keyring(2).with_previous(&old);
        assert!(ring.rotating() && !new.rotating());
        assert_eq!(ring.open("lst_a", &envelope).unwrap(), b"s3cret-value");
        let resealed = ring.reseal("lst_a", &envelope).unwrap().expect("sealed under the old key: sealed again");
        assert_eq!(new.open("lst_a", &resealed).unwrap(), b"s3cret-value", "the new key alone opens it now");
        assert!(old.open("lst_a", &resealed).is_err());
        assert_eq!(ring.reseal("lst_a", &resealed).unwrap(), None, "already under the current key");
        assert!(ring.reseal("lst_b", &envelope).is_err(), "still bound to its listener");
        // The ring's checks: the current key first, then the previous ones.
        let ids: Vec<String> = ring.checks().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![new.key_id(), old.key_id()]);
        // A key ring of three keeps every older key once.
        let third = keyring(3).with_previous(&ring).with_previous(&old);
        assert_eq!(third.checks().len(), 3);
        assert_eq!(third.open("lst_a", &envelope).unwrap(), b"s3cret-value");
    }

    #[test]
    fn the_event_hash_key_outlives_a_master_key_rotation() {
        let old = keyring(1);
        let hash = old.event_hash("prd_1", "order.placed");
        let sealed = old.sealed_hash_key();
        // The new master key alone would derive other hashes...
        assert_ne!(keyring(2).event_hash("prd_1", "order.placed"), hash);
        // ...but takes the stored key, opened while the old key is still accepted.
        let mut ring = keyring(2).with_previous(&old);
        ring.use_sealed_hash_key(&sealed).unwrap();
        assert_eq!(ring.event_hash("prd_1", "order.placed"), hash);
        let resealed = ring.reseal_hash_key(&sealed).unwrap().unwrap();
        let mut new = keyring(2);
        new.use_sealed_hash_key(&resealed).unwrap();
        assert_eq!(new.event_hash("prd_1", "order.placed"), hash, "and after the rotation, with the new key alone");
        assert!(keyring(2).use_sealed_hash_key(&sealed).is_err());
    }

    #[test]
    fn a_different_key_with_a_forged_key_id_still_fails() {
        let keys = keyring(1);
        let mut envelope = keyring(2).seal("lst_a", b"s3cret-value");
        envelope[1..1 + KEY_ID_LEN].copy_from_slice(&keys.current.key_id);
        assert!(matches!(keys.open("lst_a", &envelope), Err(CryptoError::Unseal)));
    }

    #[test]
    fn event_hash_is_stable_and_separates_producers_and_types() {
        let keys = keyring(7);
        let hash = keys.event_hash("prd_1", "project.created");
        assert_eq!(hash, keys.event_hash("prd_1", "project.created"));
        assert!(hash.starts_with("evh_"));
        assert_eq!(hash.len(), 4 + 2 * EVENT_HASH_BYTES);
        assert_ne!(hash, keys.event_hash("prd_2", "project.created"));
        assert_ne!(hash, keys.event_hash("prd_1", "project.deleted"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(keys.event_hash("ab", "c"), keys.event_hash("a", "bc"));
        // Unguessable without the master key.
        assert_ne!(hash, keyring(8).event_hash("prd_1", "project.created"));
    }

    #[test]
    fn master_key_parsing() {
        let text = STANDARD.encode([9u8; 32]);
        assert_eq!(Keyring::from_base64(&text).unwrap().key_id(), keyring(9).key_id());
        assert_eq!(Keyring::from_base64(&format!(" {text}\n")).unwrap().key_id(), keyring(9).key_id());
        assert!(Keyring::from_base64(&STANDARD.encode([9u8; 31])).is_err());
        assert!(Keyring::from_base64("not base64!").is_err());
        assert!(Keyring::from_base64("").is_err());
    }

    #[test]
    fn api_keys_are_random_and_stored_as_sha256() {
        let a = mint_api_key();
        let b = mint_api_key();
        assert_ne!(a.plaintext, b.plaintext);
        assert!(a.plaintext.starts_with("hkp_"));
        assert!(a.plaintext.len() >= 4 + 43);
        assert_eq!(a.hash, hash_api_key(&a.plaintext));
        assert_eq!(hex(&hash_api_key("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(digests_equal(&a.hash, &a.hash));
        assert!(!digests_equal(&a.hash, &b.hash));
    }

    #[test]
    fn minted_listener_secret_has_24_bytes() {
        let secret = mint_listener_secret();
        let bytes = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
        assert_eq!(bytes.len(), 24);
    }
}
