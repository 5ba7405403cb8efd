//! The strings a person hands a device: a wipe code, a distributor
//! credential (activation strings have their own target).
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = text.parse::<umbra_proto::WipeCode>();
    let _ = text.parse::<umbra_proto::DistributorCredential>();
});
