//! Activation strings as typed or scanned.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| { let _ = text.parse::<umbra_proto::ActivationString>(); });
