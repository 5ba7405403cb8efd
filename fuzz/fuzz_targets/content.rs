//! The plaintext inside MLS application messages, as a device decodes it.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { let _ = umbra_proto::content::Content::decode(bytes); });
