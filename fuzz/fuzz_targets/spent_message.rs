//! What a node of a cluster hears on NATS of the budgets others charged.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = umbra_proto::spent::decode(data); });
