//! Files over the real server with real clients: sealed on the sender's
//! device, stored by the server as padded ciphertext only, fetched and
//! checked by every recipient device, and deleted at the server once the
//! last of them has it.

mod common;

use std::path::{Path, PathBuf};

use common::{Device, TestServer, befriend};
use umbra_client::{AttachmentState, Event};

/// `len` bytes no window of which repeats (a counter mixed by
/// SplitMix64), so finding any 32 of them elsewhere means a leak.
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Samples of the plaintext to look for: 32-byte windows across it.
fn windows(data: &[u8]) -> Vec<&[u8]> {
    let step = (data.len() / 16).max(1);
    (0..16)
        .map(|n| n * step)
        .filter(|&at| at + 32 <= data.len())
        .map(|at| &data[at..at + 32])
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, read.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                found.push((path, bytes));
            }
        }
    }
    found
}

fn assert_no_plaintext(dir: &Path, data: &[u8]) {
    for (path, bytes) in files_under(dir) {
        for window in windows(data) {
            assert!(!contains(&bytes, window), "plaintext in {}", path.display());
        }
    }
}

fn blob_files(server: &TestServer) -> usize {
    std::fs::read_dir(server.data.join("blobs"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Waits until the server holds `count` blob files (a device says it
/// fetched a file without waiting for the server's answer).
async fn until_blob_files(server: &TestServer, count: usize) {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while blob_files(server) != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} blob files at the server, not {count}",
            blob_files(server)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn next_file(device: &mut Device) -> umbra_client::Message {
    device
        .wait_for(|event| match event {
            Event::MessageReceived { message } if message.attachment.is_some() => {
                Some(message.clone())
            }
            _ => None,
        })
        .await
}

#[tokio::test]
async fn a_file_to_a_contact_who_is_offline_arrives_whole_and_leaves_no_plaintext_behind() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    bob.client.disconnect();

    let outside = tempfile::tempdir().unwrap();
    let data = file_bytes(20 * 1024 * 1024 + 12_345, 1);
    let path = outside.path().join("holiday.mp4");
    std::fs::write(&path, &data).unwrap();
    let sent = alice
        .client
        .send_file(&conversation, &path, Some("the view"))
        .await
        .unwrap();
    let info = sent.attachment.clone().unwrap();
    assert_eq!(
        (info.name.as_str(), info.size),
        ("holiday.mp4", data.len() as u64)
    );
    assert_eq!(info.mime_type, "video/mp4");
    assert_eq!(info.state, AttachmentState::Sent);
    assert_eq!(sent.body, "the view");

    // The server holds one blob: padded, sealed, nothing of the file
    // readable in it, its database or any frame it saw.
    assert_eq!(blob_files(&server), 1);
    let blob = files_under(&server.data.join("blobs")).remove(0).1;
    assert_eq!(
        blob.len() as u64,
        umbra_client::seal::sealed_len(data.len() as u64)
    );
    assert!(blob.len() > data.len());
    assert_no_plaintext(&server.data, &data);
    for (_, frame) in server.frames() {
        for window in windows(&data) {
            assert!(!contains(&frame, window), "plaintext in a frame");
        }
    }

    // Bob comes online: the message names the file; he fetches it, every
    // segment checked, and it opens to the very bytes sent.
    let mut bob = bob.reopen().await;
    let received = next_file(&mut bob).await;
    let file = received.attachment.clone().unwrap();
    assert_eq!(file.state, AttachmentState::Available);
    assert_eq!(
        (file.name.as_str(), file.size),
        ("holiday.mp4", data.len() as u64)
    );
    assert_eq!(received.body, "the view");
    assert_eq!(
        bob.client.fetch_attachment(received.id).await.unwrap(),
        AttachmentState::Fetched
    );
    // He was its only recipient: the server deleted it.
    until_blob_files(&server, 0).await;
    let saved = outside.path().join("saved.png");
    assert_eq!(
        bob.client
            .save_attachment(received.id, &saved)
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&saved).unwrap(), data);
    // Saving never overwrites a file.
    assert!(
        bob.client
            .save_attachment(received.id, &saved)
            .await
            .is_err()
    );
    // Both devices keep it sealed: no plaintext under either directory.
    assert_no_plaintext(bob.home.path(), &data);
    assert_no_plaintext(alice.home.path(), &data);
    // The sender opens her own copy too.
    let mine = outside.path().join("mine.png");
    alice.client.save_attachment(sent.id, &mine).await.unwrap();
    assert_eq!(std::fs::read(&mine).unwrap(), data);
}

#[tokio::test]
async fn a_photo_to_a_group_of_five_stays_until_the_last_member_fetched_it() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut others = Vec::new();
    for _ in 0..4 {
        let mut other = Device::activate(&server).await;
        befriend(&mut alice, &mut other).await;
        others.push(other);
    }
    let members: Vec<_> = others.iter().map(Device::id).collect();
    let group = alice.client.create_group("trip", &members).await.unwrap();
    let outside = tempfile::tempdir().unwrap();
    // A real photo (noise, so it does not compress to nothing).
    let noise = file_bytes(200 * 200 * 3, 2);
    let photo = image::RgbImage::from_raw(200, 200, noise).unwrap();
    let path = outside.path().join("group.jpg");
    photo.save(&path).unwrap();
    let sent = alice.client.send_file(&group, &path, None).await.unwrap();
    assert_eq!(blob_files(&server), 1);
    // What was sent (the photo without metadata), as its sender keeps it.
    let mine = outside.path().join("mine.jpg");
    alice.client.save_attachment(sent.id, &mine).await.unwrap();
    let data = std::fs::read(&mine).unwrap();
    assert!(data.len() > 10_000);

    for (n, other) in others.iter_mut().enumerate() {
        let message = next_file(other).await;
        other.client.fetch_attachment(message.id).await.unwrap();
        let saved = outside.path().join(format!("{n}.jpg"));
        other
            .client
            .save_attachment(message.id, &saved)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&saved).unwrap(), data);
        // Kept for those still to fetch it; gone after the last.
        let expected = usize::from(n + 1 < 4);
        until_blob_files(&server, expected).await;
    }
}

/// The first transfer event on `device`'s stream: (upload, done).
async fn first_transfer(events: &mut tokio::sync::broadcast::Receiver<Event>) -> (bool, u64) {
    loop {
        match events.recv().await {
            Ok(Event::Transfer { upload, done, .. }) => return (upload, done),
            Ok(_) => continue,
            Err(error) => panic!("{error}"),
        }
    }
}

#[tokio::test]
async fn an_upload_and_a_download_cut_off_in_the_middle_resume_where_they_stopped() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let data = file_bytes(3 * 1024 * 1024, 3);
    let path = outside.path().join("report.pdf");
    std::fs::write(&path, &data).unwrap();

    // The send stops (the app was closed) after its first chunk.
    let mut events = alice.client.subscribe();
    tokio::select! {
        biased;
        (upload, done) = first_transfer(&mut events) => assert!(upload && done > 0),
        sent = alice.client.send_file(&conversation, &path, None) => {
            panic!("the upload finished before it could be cut off: {sent:?}")
        }
    }
    assert_eq!(
        alice.client.pending_uploads().unwrap(),
        vec!["report.pdf".to_owned()]
    );
    // Resumed: from where the server's copy ends, not from the start.
    let mut events = alice.client.subscribe();
    let resumed = alice.client.resume_uploads().await.unwrap();
    assert_eq!(resumed.len(), 1);
    let sent = resumed.into_iter().next().unwrap().1.unwrap();
    assert_eq!(sent.attachment.unwrap().size, data.len() as u64);
    let (_, first_done) = first_transfer(&mut events).await;
    assert!(
        first_done > 4 * 65_552,
        "it started again from 0: {first_done}"
    );
    assert!(alice.client.pending_uploads().unwrap().is_empty());

    // The fetch stops after its first chunk, and goes on from there.
    let received = next_file(&mut bob).await;
    let mut events = bob.client.subscribe();
    tokio::select! {
        biased;
        (upload, done) = first_transfer(&mut events) => assert!(!upload && done > 0),
        fetched = bob.client.fetch_attachment(received.id) => {
            panic!("the fetch finished before it could be cut off: {fetched:?}")
        }
    }
    let mut events = bob.client.subscribe();
    bob.client.fetch_attachment(received.id).await.unwrap();
    let (_, first_done) = first_transfer(&mut events).await;
    assert!(
        first_done > 4 * 65_552,
        "it started again from 0: {first_done}"
    );
    let saved = outside.path().join("saved.pdf");
    bob.client
        .save_attachment(received.id, &saved)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), data);
    until_blob_files(&server, 0).await;
}

#[tokio::test]
async fn a_blob_altered_at_the_server_is_refused_and_not_fetched_again() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let data = file_bytes(200_000, 4);
    let path = outside.path().join("a.bin");
    std::fs::write(&path, &data).unwrap();
    alice
        .client
        .send_file(&conversation, &path, None)
        .await
        .unwrap();
    // Whoever holds the server's disk flips one bit of the blob.
    let (blob_path, mut blob) = files_under(&server.data.join("blobs")).remove(0);
    blob[100_000] ^= 1;
    std::fs::write(&blob_path, &blob).unwrap();

    let received = next_file(&mut bob).await;
    let refused = bob.client.fetch_attachment(received.id).await.unwrap_err();
    assert!(refused.to_string().contains("altered"), "{refused}");
    let history = bob.client.history(&received.conversation, 10).unwrap();
    let file = history.iter().find(|m| m.id == received.id).unwrap();
    assert_eq!(
        file.attachment.as_ref().unwrap().state,
        AttachmentState::Invalid
    );
    // Not fetched again behind the person's back; nothing of it kept.
    assert_eq!(bob.client.fetch_attachments().await.unwrap(), 0);
    assert!(files_under(&bob.home.path().join("files")).is_empty());
    let saved = outside.path().join("never.bin");
    assert!(
        bob.client
            .save_attachment(received.id, &saved)
            .await
            .is_err()
    );
    assert!(!saved.exists());
}

#[tokio::test]
async fn a_wipe_leaves_no_file_behind() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let path = outside.path().join("secret.txt");
    std::fs::write(&path, file_bytes(70_000, 5)).unwrap();
    alice
        .client
        .send_file(&conversation, &path, None)
        .await
        .unwrap();
    assert_eq!(files_under(&alice.home.path().join("files")).len(), 1);
    alice.client.wipe_self().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(alice.home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_expire_with_their_messages_on_both_devices_and_at_the_server() {
    use std::sync::Arc;
    use std::time::Duration;
    let clock = umbra_client::ManualClock::new(common::now());
    let server = TestServer::start_with_clock_configured(clock.clone(), |config| {
        config.expiry_sweep_interval = Duration::from_secs(1);
    })
    .await;
    let options = umbra_client::ClientOptions {
        clock: Arc::new(clock.clone()),
        ..common::options()
    };
    let mut alice = Device::activate_untimed(&server.activation().await, options.clone()).await;
    let mut bob = Device::activate_untimed(&server.activation().await, options).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    alice
        .client
        .set_disappearing(&conversation, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    bob.wait_for(|e| match e {
        Event::ConversationChanged { conversation } if conversation.disappear_after == 3600 => {
            Some(())
        }
        _ => None,
    })
    .await;
    let outside = tempfile::tempdir().unwrap();
    let (a, b) = (file_bytes(100_000, 6), file_bytes(100_000, 7));
    for (name, data) in [("a.bin", &a), ("b.bin", &b)] {
        std::fs::write(outside.path().join(name), data).unwrap();
        alice
            .client
            .send_file(&conversation, &outside.path().join(name), None)
            .await
            .unwrap();
    }
    // Bob fetches the first (the server deletes it), not the second.
    let first = next_file(&mut bob).await;
    let second = next_file(&mut bob).await;
    assert_eq!(first.attachment.as_ref().unwrap().name, "a.bin");
    bob.client.fetch_attachment(first.id).await.unwrap();
    until_blob_files(&server, 1).await;
    assert_eq!(files_under(&bob.home.path().join("files")).len(), 1);
    assert_eq!(files_under(&alice.home.path().join("files")).len(), 2);

    // An hour on: the sender's copies go, files and keys with them.
    clock.advance(3601);
    assert_eq!(alice.client.expire_messages().unwrap(), 2);
    assert!(files_under(&alice.home.path().join("files")).is_empty());
    // The recipient's go an hour after he saw them.
    bob.client.mark_shown(&[first.id, second.id]).unwrap();
    clock.advance(3601);
    assert_eq!(bob.client.expire_messages().unwrap(), 2);
    assert!(files_under(&bob.home.path().join("files")).is_empty());
    assert_no_plaintext(bob.home.path(), &a);

    // The server keeps the one nobody fetched a day at least (through
    // sweeps, one a second), then not.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(blob_files(&server), 1);
    clock.advance(86_400);
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while blob_files(&server) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired blob was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A JPEG's structure with a camera's metadata around a (fake) scan.
fn photo_with_metadata() -> Vec<u8> {
    fn segment(marker: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&u16::try_from(contents.len() + 2).unwrap().to_be_bytes());
        out.extend_from_slice(contents);
        out
    }
    let mut jpeg = vec![0xFF, 0xD8];
    jpeg.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
    jpeg.extend(segment(0xE1, b"Exif\0\0GPS 52.5200N 13.4050E"));
    jpeg.extend(segment(0xFE, b"taken at home"));
    jpeg.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0]));
    jpeg.extend_from_slice(&[0x12, 0x34, 0x56, 0xFF, 0xD9]);
    jpeg
}

#[tokio::test]
async fn a_photo_arrives_without_where_it_was_taken_unless_asked() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let path = outside.path().join("IMG_0001.JPG");
    std::fs::write(&path, photo_with_metadata()).unwrap();

    let sent = alice
        .client
        .send_file(&conversation, &path, None)
        .await
        .unwrap();
    assert_eq!(sent.attachment.unwrap().mime_type, "image/jpeg");
    let received = next_file(&mut bob).await;
    let saved = outside.path().join("stripped.jpg");
    bob.client
        .save_attachment(received.id, &saved)
        .await
        .unwrap();
    let stripped = std::fs::read(&saved).unwrap();
    assert!(!contains(&stripped, b"GPS") && !contains(&stripped, b"taken at home"));
    assert!(contains(&stripped, b"JFIF") && stripped.ends_with(&[0x12, 0x34, 0x56, 0xFF, 0xD9]));
    assert_eq!(received.attachment.unwrap().size, stripped.len() as u64);

    // Asked to keep it: sent byte for byte.
    let options = umbra_client::FileOptions {
        caption: None,
        keep_metadata: true,
    };
    alice
        .client
        .send_file_with(&conversation, &path, options)
        .await
        .unwrap();
    let received = next_file(&mut bob).await;
    let kept = outside.path().join("kept.jpg");
    bob.client
        .save_attachment(received.id, &kept)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&kept).unwrap(), photo_with_metadata());

    // A photo's type is its bytes', whatever its name says: stripped all
    // the same.
    let unnamed = outside.path().join("photo");
    std::fs::write(&unnamed, photo_with_metadata()).unwrap();
    let sent = alice
        .client
        .send_file(&conversation, &unnamed, None)
        .await
        .unwrap();
    assert_eq!(sent.attachment.unwrap().mime_type, "image/jpeg");
    let received = next_file(&mut bob).await;
    let saved = outside.path().join("unnamed.jpg");
    bob.client
        .save_attachment(received.id, &saved)
        .await
        .unwrap();
    let stripped = std::fs::read(&saved).unwrap();
    assert!(!contains(&stripped, b"GPS") && contains(&stripped, b"JFIF"));

    // A format whose metadata cannot be removed (an iPhone's HEIC): not
    // sent unless asked, however it is named.
    let mut heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic".to_vec();
    heic.extend_from_slice(b"Exif GPS 52.5200N");
    let heic_path = outside.path().join("IMG_0002.jpg");
    std::fs::write(&heic_path, &heic).unwrap();
    let refused = alice
        .client
        .send_file(&conversation, &heic_path, None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("HEIC"), "{refused}");
    let options = umbra_client::FileOptions {
        caption: None,
        keep_metadata: true,
    };
    let sent = alice
        .client
        .send_file_with(&conversation, &heic_path, options)
        .await
        .unwrap();
    assert_eq!(sent.attachment.unwrap().mime_type, "image/heic");
    next_file(&mut bob).await;

    // Not a JPEG after all: refused, not sent with what it holds.
    std::fs::write(&path, b"GPS 52.5200N, not an image").unwrap();
    assert!(
        alice
            .client
            .send_file(&conversation, &path, None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_photo_shows_its_thumbnail_before_it_is_fetched() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    // A photo: left half red, right half blue.
    let photo = image::RgbImage::from_fn(400, 200, |x, _| {
        if x < 200 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let outside = tempfile::tempdir().unwrap();
    let path = outside.path().join("flag.jpg");
    photo.save(&path).unwrap();
    let sent = alice
        .client
        .send_file(&conversation, &path, None)
        .await
        .unwrap();
    assert!(sent.attachment.unwrap().has_thumbnail);

    let received = next_file(&mut bob).await;
    let file = received.attachment.clone().unwrap();
    assert!(file.has_thumbnail);
    assert_eq!(file.state, AttachmentState::Available, "not fetched yet");
    let thumbnail = bob.client.thumbnail(received.id).unwrap().unwrap();
    assert!(thumbnail.len() <= umbra_proto::content::MAX_THUMBNAIL_BYTES);
    let picture = umbra_client::thumbnail::picture(&thumbnail, 40, 40).unwrap();
    assert_eq!((picture.width, picture.height), (40, 20));
    let [r, _, b] = picture.at(5, 10);
    assert!(r > 200 && b < 60, "left is red: {r} {b}");
    let [r, _, b] = picture.at(35, 10);
    assert!(b > 200 && r < 60, "right is blue: {r} {b}");
    // A file that is not a photo has none.
    let text = outside.path().join("notes.txt");
    std::fs::write(&text, b"hello").unwrap();
    alice
        .client
        .send_file(&conversation, &text, None)
        .await
        .unwrap();
    let received = next_file(&mut bob).await;
    assert!(!received.attachment.unwrap().has_thumbnail);
    assert_eq!(bob.client.thumbnail(received.id).unwrap(), None);
}

/// A member who names one blob again in other messages, or under a false
/// key, costs a recipient one download in all: a copy here serves every
/// message that names it truly, and one that names it falsely is refused
/// without a byte fetched.
#[tokio::test]
async fn a_blob_named_again_is_fetched_once() {
    let server = TestServer::start().await;
    let mut alice = Device::activate(&server).await;
    let mut bob = Device::activate(&server).await;
    let (conversation, _) = befriend(&mut alice, &mut bob).await;
    let outside = tempfile::tempdir().unwrap();
    let data = file_bytes(300_000, 7);
    let path = outside.path().join("notes.bin");
    std::fs::write(&path, &data).unwrap();
    let sent = alice
        .client
        .send_file(&conversation, &path, None)
        .await
        .unwrap();
    let first = next_file(&mut bob).await;
    assert_eq!(
        bob.client.fetch_attachment(first.id).await.unwrap(),
        AttachmentState::Fetched
    );
    // Bob was its only recipient: the server has deleted it.
    until_blob_files(&server, 0).await;

    // The same file named again: served from the copy here.
    let attachment = alice.client.attachment_for_tests(sent.id).unwrap();
    alice
        .client
        .send_attachment_for_tests(&conversation, attachment.clone())
        .await
        .unwrap();
    let again = next_file(&mut bob).await;
    assert_eq!(
        bob.client.fetch_attachment(again.id).await.unwrap(),
        AttachmentState::Fetched
    );
    let saved = outside.path().join("again.bin");
    bob.client.save_attachment(again.id, &saved).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), data);

    // Named under another key: refused, and refused again when asked.
    let mut false_key = attachment;
    false_key.key = [9; 32];
    alice
        .client
        .send_attachment_for_tests(&conversation, false_key)
        .await
        .unwrap();
    let forged = next_file(&mut bob).await;
    for _ in 0..2 {
        let refused = bob.client.fetch_attachment(forged.id).await.unwrap_err();
        assert!(refused.to_string().contains("other contents"), "{refused}");
    }
    // The true copies are untouched.
    let saved = outside.path().join("first.bin");
    bob.client.save_attachment(first.id, &saved).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), data);
}
