//! The MLS parsing the server does on relayed bytes (KeyPackages, headers).
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { let _ = (umbra_mls::validate_key_package(bytes), umbra_mls::message_header(bytes)); });
