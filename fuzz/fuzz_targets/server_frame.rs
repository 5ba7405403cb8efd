//! What a device decodes from the server.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { let _ = umbra_proto::decode_server(bytes); });
