//! What the server decodes from every device.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { let _ = umbra_proto::decode_client(bytes); });
