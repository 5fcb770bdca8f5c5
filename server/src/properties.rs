//! Property tests: arbitrary bytes and text into every parser that reads what hookd did not
//! write itself in this process (stored records, sealed secrets, page tokens, signature
//! headers, configuration values and command lines). Each must answer or refuse, never panic;
//! and what hookd writes, it reads back. A short fuzzing pass on every `cargo test` (proptest's
//! 256 cases per property; `PROPTEST_CASES` for a longer one).

use proptest::prelude::*;

use crate::crypto::Keyring;
use crate::store::model::{self, ApiKeyEntry, Attempt, Delivery, Event, FanoutCursor, Listener, Producer};

fn keyring() -> Keyring {
    Keyring::from_base64("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").expect("a valid master key")
}

proptest! {
    #[test]
    fn stored_records_of_any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Whatever the bytes, each decodes to something or to None.
        let _ = model::decode::<Producer>(&bytes);
        let _ = model::decode::<ApiKeyEntry>(&bytes);
        let _ = model::decode::<Listener>(&bytes);
        let _ = model::decode::<Event>(&bytes);
        let _ = model::decode::<FanoutCursor>(&bytes);
        let _ = model::decode::<Delivery>(&bytes);
        let _ = model::decode::<Attempt>(&bytes);
    }

    #[test]
    fn a_listener_written_is_read_back(
        id in "lst_[0-9a-f]{32}",
        url in "https://[a-z]{1,20}\\.example/[a-z/]{0,40}",
        sealed in proptest::collection::vec(any::<u8>(), 0..80),
        ordered in any::<bool>(),
        max_per_second in any::<u32>(),
    ) {
        let listener = Listener { id, url, sealed_secret: sealed, ordered, max_per_second, ..Listener::default() };
        prop_assert_eq!(model::decode::<Listener>(&model::encode(&listener)), Some(listener));
    }

    #[test]
    fn sealed_secrets_of_any_bytes_are_refused_not_opened(envelope in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert!(keyring().open("lst_1", &envelope).is_err());
    }

    #[test]
    fn a_sealed_secret_opens_for_its_listener_only_and_not_once_altered(
        secret in proptest::collection::vec(any::<u8>(), 1..300),
        flip in any::<prop::sample::Index>(),
    ) {
        let keyring = keyring();
        let mut envelope = keyring.seal("lst_a", &secret);
        prop_assert_eq!(keyring.open("lst_a", &envelope).unwrap(), secret);
        prop_assert!(keyring.open("lst_b", &envelope).is_err());
        let at = flip.index(envelope.len());
        envelope[at] ^= 0x01;
        prop_assert!(keyring.open("lst_a", &envelope).is_err());
    }

    #[test]
    fn page_tokens_of_any_text_are_read_or_refused(token in ".{0,300}") {
        let _ = crate::validate::page_token(&token);
    }

    #[test]
    fn a_page_token_issued_is_read_back(last_id in "[a-z]{3}_[0-9a-f]{32}") {
        let token = crate::validate::encode_page_token(&last_id);
        prop_assert_eq!(crate::validate::page_token(&token).unwrap(), Some(last_id));
    }

    #[test]
    fn signature_headers_of_any_text_verify_or_are_refused(
        secret in proptest::collection::vec(any::<u8>(), 0..64),
        id in ".{0,80}",
        timestamp in ".{0,30}",
        signatures in ".{0,400}",
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let _ = hookd::webhook::verify(&secret, &id, &timestamp, &signatures, &body, 1_700_000_000);
    }

    #[test]
    fn a_signature_made_verifies_and_an_altered_body_does_not(
        secret in "[ -~]{8,64}",
        body in proptest::collection::vec(any::<u8>(), 1..500),
        at in any::<prop::sample::Index>(),
    ) {
        let key = hookd::webhook::signing_key(secret.as_bytes());
        let signature = hookd::webhook::sign(&key, "evt_1", 1_700_000_000, &body);
        let now = 1_700_000_000;
        prop_assert!(hookd::webhook::verify(secret.as_bytes(), "evt_1", "1700000000", &signature, &body, now).is_ok());
        let mut altered = body.clone();
        let at = at.index(altered.len());
        altered[at] ^= 0x80;
        prop_assert!(hookd::webhook::verify(secret.as_bytes(), "evt_1", "1700000000", &signature, &altered, now).is_err());
    }

    #[test]
    fn configuration_values_of_any_text_parse_or_are_refused(text in ".{0,60}") {
        let _ = crate::pipeline::retry::parse_duration(&text);
        let _ = text.parse::<crate::pipeline::RetrySchedule>();
        let _ = text.parse::<crate::pipeline::target::Cidr>();
    }

    #[test]
    fn command_lines_of_any_words_parse_or_are_refused(words in proptest::collection::vec("[-a-z0-9=:./,]{0,20}", 0..8)) {
        use clap::Parser as _;
        let argv = std::iter::once("hookd".to_owned()).chain(std::iter::once("serve".to_owned())).chain(words);
        if let Ok(crate::config::Cli { command: crate::config::Command::Serve(args) }) = crate::config::Cli::try_parse_from(argv) {
            let dir = tempfile::tempdir().unwrap();
            let args = crate::config::ServeArgs { data_dir: dir.path().join("data"), ..args };
            let _ = crate::config::resolve(&args, None);
        }
    }
}
