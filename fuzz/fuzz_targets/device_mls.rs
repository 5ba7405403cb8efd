//! What a device does with MLS bytes the server hands it: a message of a
//! group it is in, a Welcome, the GroupInfo it rejoins from (each input
//! mutates a real message of a live group, or is taken raw).
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| { umbra_mls::fuzzing::device_input(bytes); });
