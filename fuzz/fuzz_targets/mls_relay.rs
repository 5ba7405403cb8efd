//! The MLS parsing the server does on relayed bytes (KeyPackages, headers,
//! a new group's GroupInfo and ratchet tree).
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { let _ = (umbra_mls::validate_key_package(bytes), umbra_mls::message_header(bytes), umbra_mls::fuzz_group_info(bytes)); });
