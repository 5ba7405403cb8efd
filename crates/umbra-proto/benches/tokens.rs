//! What anonymous sending costs, per operation: the server signing a batch
//! of 32 blinded token inputs with its proof (`issue/32`), the device
//! blinding 32 inputs (`blind/32`) and checking the answer's proof and
//! unblinding (`finish/32`), the server checking a spent token
//! (`redeem`), and signing and checking an anonymous message with the
//! epoch's delivery key (`delivery_sign`, `delivery_verify`, over a
//! 1 KiB message). Run with `cargo bench -p umbra-proto --bench tokens`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use umbra_proto::GroupId;
use umbra_proto::tokens::{DeliveryKey, TokenIssuer, TokenRequest, verify_anonymous};

const BATCH: usize = 32;

fn tokens(c: &mut Criterion) {
    let issuer = TokenIssuer::generate().unwrap();
    let mut group = c.benchmark_group("tokens");
    group.bench_function("blind/32", |b| {
        b.iter(|| black_box(TokenRequest::new(BATCH).unwrap()))
    });
    group.bench_function("issue/32", |b| {
        b.iter_batched(
            || TokenRequest::new(BATCH).unwrap().1,
            |blinded| black_box(issuer.issue(&blinded).unwrap()),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("finish/32", |b| {
        b.iter_batched(
            || {
                let (request, blinded) = TokenRequest::new(BATCH).unwrap();
                let (evaluated, proof) = issuer.issue(&blinded).unwrap();
                (request, evaluated, proof)
            },
            |(request, evaluated, proof)| {
                black_box(
                    request
                        .finish(&issuer.id(), issuer.public_key(), &evaluated, &proof)
                        .unwrap(),
                )
            },
            BatchSize::SmallInput,
        )
    });
    let (request, blinded) = TokenRequest::new(1).unwrap();
    let (evaluated, proof) = issuer.issue(&blinded).unwrap();
    let token = request
        .finish(&issuer.id(), issuer.public_key(), &evaluated, &proof)
        .unwrap()
        .remove(0);
    group.bench_function("redeem", |b| {
        b.iter(|| assert!(issuer.verify(black_box(&token))))
    });
    let key = DeliveryKey::from_seed(&[7; 32]);
    let public = key.public();
    let group_id = GroupId::new(vec![1; 16]).unwrap();
    let message = vec![0x5a; 1024];
    group.bench_function("delivery_sign", |b| {
        b.iter(|| black_box(key.sign(&group_id, 9, 3600, &message)))
    });
    let signature = key.sign(&group_id, 9, 3600, &message);
    group.bench_function("delivery_verify", |b| {
        b.iter(|| {
            assert!(verify_anonymous(
                &public, &signature, &group_id, 9, 3600, &message
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, tokens);
criterion_main!(benches);
