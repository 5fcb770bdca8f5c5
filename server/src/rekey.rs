//! Master key rotation: opening a data directory under a key ring, and re-sealing every
//! listener secret (and the event-hash key) under the current master key while previous keys
//! are still accepted.
//!
//! Re-sealing is one listener at a time, each an ordinary listener write (so a concurrent
//! rotation of that listener's own secret is never undone), and idempotent: an envelope
//! already under the current key is left alone. Only when every envelope is under the current
//! key does the data directory record the current key as its own; until then it still needs
//! a previous key to start. So a rotation stopped anywhere (a crash, a kill) is finished by
//! running it again. It never writes or logs a plaintext secret: secrets exist in the clear
//! only inside [`Keyring::reseal`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::crypto::{CryptoError, Keyring};
use crate::store::{Store, StoreError};

/// Listeners read per page while re-sealing.
const PAGE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the event-hash key in the database does not open with the configured master keys: {0}")]
    HashKey(#[source] CryptoError),
    #[error(
        "{0} listener secrets are sealed under a master key not configured: give it as \
         HOOKD_PREVIOUS_MASTER_KEY or --previous-master-key-file (the log names the listeners)"
    )]
    Unopened(usize),
}

/// Checks the configured keys against the data directory and takes the event-hash key it
/// keeps (storing it sealed the first time), so that event hashes stay what they were
/// whatever the master key is now.
pub fn open(store: &dyn Store, keyring: &mut Keyring) -> Result<(), RekeyError> {
    store.check_master_key(&keyring.checks())?;
    match store.sealed_hash_key()? {
        Some(sealed) => keyring.use_sealed_hash_key(&sealed).map_err(RekeyError::HashKey)?,
        None => store.set_sealed_hash_key(&keyring.sealed_hash_key())?,
    }
    Ok(())
}

/// What a rotation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rekeyed {
    /// Listeners looked at.
    pub listeners: usize,
    /// Envelopes sealed again under the current key (a listener may have two: its secret and
    /// the one its last rotation replaced).
    pub resealed: usize,
}

/// Re-seals every listener secret and the event-hash key under `keyring`'s current master key,
/// then records that key as the data directory's.
pub async fn rekey(store: &dyn Store, keyring: &Keyring) -> Result<Rekeyed, RekeyError> {
    let mut done = Rekeyed::default();
    let unopened = Arc::new(AtomicUsize::new(0));
    let mut after_producer: Option<String> = None;
    loop {
        let producers = store.list_producers(after_producer.as_deref(), PAGE)?;
        let Some(last) = producers.last() else { break };
        after_producer = Some(last.id.clone());
        for producer in producers {
            let mut after: Option<String> = None;
            loop {
                let listeners = store.list_listeners(&producer.id, None, after.as_deref(), PAGE)?;
                let Some(last) = listeners.last() else { break };
                after = Some(last.id.clone());
                for listener in listeners {
                    done.listeners += 1;
                    let stale =
                        |sealed: &[u8]| !sealed.is_empty() && !matches!(keyring.reseal(&listener.id, sealed), Ok(None));
                    if !stale(&listener.sealed_secret) && !stale(&listener.previous_sealed_secret) {
                        continue;
                    }
                    let resealed = Arc::new(AtomicUsize::new(0));
                    let (keyring, counted, unopened) = (keyring.clone(), resealed.clone(), unopened.clone());
                    store
                        .update_listener(
                            &listener.id,
                            Box::new(move |listener| {
                                let id = listener.id.clone();
                                for sealed in [&mut listener.sealed_secret, &mut listener.previous_sealed_secret] {
                                    if sealed.is_empty() {
                                        continue;
                                    }
                                    match keyring.reseal(&id, sealed) {
                                        Ok(Some(again)) => {
                                            *sealed = again;
                                            counted.fetch_add(1, Ordering::Relaxed);
                                        }
                                        Ok(None) => {}
                                        Err(error) => {
                                            tracing::error!(listener_id = %id, %error, "cannot re-seal a listener secret");
                                            unopened.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                            }),
                        )
                        .await?;
                    done.resealed += resealed.load(Ordering::Relaxed);
                }
            }
        }
    }
    let unopened = unopened.load(Ordering::Relaxed);
    if unopened > 0 {
        return Err(RekeyError::Unopened(unopened));
    }
    if let Some(sealed) = store.sealed_hash_key()?
        && let Some(again) = keyring.reseal_hash_key(&sealed).map_err(RekeyError::HashKey)?
    {
        store.set_sealed_hash_key(&again)?;
    }
    store.set_master_key(&keyring.key_id(), &keyring.key_check())?;
    Ok(done)
}
