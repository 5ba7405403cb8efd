//! The device's local store: one SQLCipher database holding the identity
//! key, contacts, conversations, messages and openmls's group state.
//!
//! **Invariant:** nothing about the user is written to disk outside this
//! encrypted file, except `kdf.json` (salt and Argon2id parameters).

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::secret::{ATTEMPTS_FILE, Attempts, KDF_FILE, KdfFile, KdfParams, Passphrase};

const LOCK_FILE: &str = "lock";

pub(crate) const STORE_FILE: &str = "device.db";

const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_secure_phone.sql")),
    (3, include_str!("../migrations/0003_derived_membership.sql")),
    (4, include_str!("../migrations/0004_key_confirmation.sql")),
    (5, include_str!("../migrations/0005_group_info.sql")),
    (6, include_str!("../migrations/0006_rejoins.sql")),
    (7, include_str!("../migrations/0007_shown_key.sql")),
    (8, include_str!("../migrations/0008_sent_at.sql")),
    (9, include_str!("../migrations/0009_device_log.sql")),
    (10, include_str!("../migrations/0010_linked_device.sql")),
    (11, include_str!("../migrations/0011_pending_receipts.sql")),
    (12, include_str!("../migrations/0012_pending_declines.sql")),
    (13, include_str!("../migrations/0013_send_tokens.sql")),
    (14, include_str!("../migrations/0014_attachments.sql")),
    (15, include_str!("../migrations/0015_voice_notes.sql")),
];

/// The version a store is at once every migration has run.
pub(crate) const VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub(crate) fn store_path(home: &Path) -> PathBuf {
    home.join(STORE_FILE)
}

/// Whether `home` holds a device: its store and the key file that opens it
/// (without which what is left is the debris of an erasure).
pub fn exists(home: &Path) -> bool {
    store_path(home).exists() && home.join(KDF_FILE).exists()
}

fn apply_key(connection: &Connection, key: &[u8; 32]) -> Result<()> {
    // The raw-key form: SQLCipher uses these 32 bytes directly.
    let statement = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex::encode(key)));
    connection.execute_batch(&statement)?;
    // SQLCipher logs a failed key check to stderr, which would show the
    // person at the terminal its internals on every wrong passphrase. Its
    // first `PRAGMA key` in a process sets the level to WARN unless a log
    // was configured, so this must come after the key (and before the first
    // page is read).
    connection.execute_batch("PRAGMA cipher_log_level = NONE; PRAGMA cipher_log = off;")?;
    Ok(())
}

fn configure(connection: &mut Connection) -> Result<()> {
    // secure_delete overwrites deleted content; WAL keeps writes atomic.
    connection.execute_batch(
        "PRAGMA secure_delete = ON;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    let applied: u32 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
        let tx = connection.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    umbra_mls::init_storage(connection)?;
    Ok(())
}

/// Creates a new encrypted store in `home`.
pub(crate) fn create(
    home: &Path,
    passphrase: &Passphrase,
    params: KdfParams,
) -> Result<Connection> {
    std::fs::create_dir_all(home).map_err(|e| ClientError::Store(e.to_string()))?;
    clear_leftovers(home)?;
    if exists(home) {
        return Err(ClientError::AlreadyActivated(home.display().to_string()));
    }
    restrict_permissions(home);
    let kdf = KdfFile::new(params)?;
    let key = kdf.derive(passphrase)?;
    kdf.write(home)?;
    let mut connection = Connection::open(store_path(home))?;
    apply_key(&connection, &key)?;
    configure(&mut connection)?;
    Ok(connection)
}

/// What a passphrase opened.
pub(crate) enum Unlocked {
    Open(Connection),
    /// The device is destroyed: its key file is gone, so nothing opens it
    /// any more; [`shred`] overwrites the rest later (see
    /// [`crate::Client::finish_erasure`]). It was the duress passphrase (with
    /// the sealed revocation it opened, if any, so the caller can tell the
    /// server) or one wrong passphrase too many (no revocation).
    Erased(Option<Vec<u8>>),
}

/// Holds the device's lock file: one unlock at a time, so that parallel
/// attempts cannot share one count.
fn lock(home: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.join(LOCK_FILE))
        .map_err(|e| ClientError::Store(e.to_string()))?;
    file.lock().map_err(|e| ClientError::Store(e.to_string()))?;
    Ok(file)
}

/// Unlocks the store in `home` with `passphrase`. Every attempt is counted
/// on disk before it is tried (an attempt that cannot be counted is not
/// tried), costs the same Argon2id work and tries the store. The duress
/// passphrase shreds the device, and so does the wrong passphrase `max`
/// times in a row.
pub(crate) fn open(home: &Path, passphrase: &Passphrase) -> Result<Unlocked> {
    clear_leftovers(home)?;
    let kdf = KdfFile::read(home)?;
    let (Some(kdf), true) = (kdf, exists(home)) else {
        return Err(ClientError::NotActivated(home.display().to_string()));
    };
    let _lock = lock(home)?;
    let mut attempts = Attempts::read(home)?;
    attempts.failed = attempts.failed.saturating_add(1);
    attempts.write(home)?;
    let key = kdf.derive(passphrase)?;
    let duress = kdf.is_duress(&key);
    let mut connection = Connection::open(store_path(home))?;
    apply_key(&connection, &key)?;
    // With the wrong key SQLCipher cannot read the first page.
    let readable = connection
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })
        .is_ok();
    if readable {
        attempts.failed = 0;
        attempts.write(home)?;
        configure(&mut connection)?;
        return Ok(Unlocked::Open(connection));
    }
    drop(connection);
    // Only the key file goes before answering: its size is fixed, so the
    // answer takes as long for a large store as for an empty one and as
    // long as a wrong passphrase's; the store itself, tens of MB perhaps,
    // is overwritten after the caller has been answered.
    if duress {
        let revocation = kdf.unseal(&key);
        destroy_key(home);
        return Ok(Unlocked::Erased(revocation));
    }
    if attempts.failed >= attempts.max {
        tracing::warn!("too many wrong passphrases: wiping the device");
        destroy_key(home);
        return Ok(Unlocked::Erased(None));
    }
    Err(ClientError::WrongPassphrase)
}

/// Destroys the device's key-derivation file: without its salt no
/// passphrase opens the store, so from here on the device is gone. Never
/// fails, whatever was done to the files: an error here would tell the
/// person watching that this was no ordinary wrong passphrase. If the key
/// file cannot be removed (made immutable, say), the store itself is
/// shredded at once instead, the answer's timing notwithstanding.
fn destroy_key(home: &Path) {
    for name in ["kdf.json.new", KDF_FILE] {
        let path = home.join(name);
        let _ = overwrite(&path);
        let _ = remove(&path);
    }
    if !matches!(present(&home.join(KDF_FILE)), Ok(false)) {
        tracing::warn!("the key file survived its erasure; shredding the store now");
        let _ = shred(home);
    }
}

/// Whether `path` exists (as a file, a directory or a link, dangling or
/// not); an error unless that is known.
fn present(path: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Overwrites and removes what is left of a device whose key file is gone
/// (an erasure whose second half was interrupted); a no-op for a device
/// that still has its key file, or for an empty `home`. Only a key file
/// known to be absent counts: one that cannot be looked at (an I/O error,
/// a dangling link to removed media) leaves everything as it is.
pub(crate) fn clear_leftovers(home: &Path) -> Result<()> {
    let missing = |e: std::io::Error| ClientError::Store(format!("{KDF_FILE}: {e}"));
    if present(&home.join(KDF_FILE)).map_err(missing)? {
        return Ok(());
    }
    if device_files(home)
        .iter()
        .any(|path| present(path).unwrap_or(true))
    {
        shred(home)?;
    }
    Ok(())
}

/// Checks `passphrase` against the store without touching the failure
/// count (for confirming settings changes on an unlocked device).
pub(crate) fn derive_checked(
    home: &Path,
    passphrase: &Passphrase,
) -> Result<(KdfFile, Zeroizing<[u8; 32]>)> {
    let kdf = KdfFile::read(home)?
        .ok_or_else(|| ClientError::NotActivated(home.display().to_string()))?;
    let key = kdf.derive(passphrase)?;
    let connection = Connection::open(store_path(home))?;
    apply_key(&connection, &key)?;
    connection
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })
        .map_err(|_| ClientError::WrongPassphrase)?;
    Ok((kdf, key))
}

/// Files that make up a device, the key-derivation file first: removing it
/// alone makes the store unreadable (crypto-shredding), and it goes first so
/// that an interrupted wipe still leaves nothing that opens.
fn device_files(home: &Path) -> Vec<PathBuf> {
    [
        KDF_FILE,
        "kdf.json.new",
        STORE_FILE,
        "device.db-wal",
        "device.db-shm",
        "device.db-journal",
        ATTEMPTS_FILE,
        "attempts.json.new",
        LOCK_FILE,
    ]
    .iter()
    .map(|name| home.join(name))
    // Attachments' sealed files (their keys are in the store, but their
    // names, sizes and times would still say what the device held).
    .chain(
        std::fs::read_dir(home.join(FILES_DIR))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path()),
    )
    .collect()
}

/// Where attachments' sealed files are kept, under the device directory.
pub(crate) const FILES_DIR: &str = "files";

/// Destroys the device in `home`: each file is overwritten with random
/// bytes, flushed and removed, the key-derivation file first (without its
/// salt no passphrase opens anything, so an interrupted wipe still leaves
/// nothing that opens). Afterwards `home` looks like a fresh install.
pub(crate) fn shred(home: &Path) -> Result<()> {
    let mut first_error = None;
    for path in device_files(home) {
        if let Err(error) = overwrite(&path).and_then(|()| remove(&path))
            && first_error.is_none()
        {
            first_error = Some(ClientError::Store(format!(
                "wiping {}: {error}",
                path.display()
            )));
        }
    }
    match std::fs::remove_dir(home.join(FILES_DIR)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound && first_error.is_none() => {
            first_error = Some(ClientError::Store(format!("wiping files: {error}")));
        }
        _ => {}
    }
    first_error.map_or(Ok(()), Err)
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn open_for_overwrite(path: &Path) -> std::io::Result<Option<(std::fs::File, u64)>> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => {
            let len = file.metadata()?.len();
            Ok(Some((file, len)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn overwrite(path: &Path) -> std::io::Result<()> {
    match open_for_overwrite(path)? {
        Some((mut file, len)) => fill_with_noise(&mut file, len),
        None => Ok(()),
    }
}

pub(crate) fn fill_with_noise(file: &mut std::fs::File, len: u64) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut noise = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(noise.len() as u64) as usize;
        getrandom::getrandom(&mut noise[..n]).map_err(std::io::Error::other)?;
        file.write_all(&noise[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

#[cfg(unix)]
fn restrict_permissions(home: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict_permissions(_home: &Path) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;

    fn median(samples: &mut [Duration]) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }

    /// A device with a duress passphrase, under cheap test parameters.
    fn device_with_duress(real: &Passphrase, duress: &Passphrase) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        drop(create(dir.path(), real, KdfParams::insecure_for_tests()).unwrap());
        let mut kdf = KdfFile::read(dir.path()).unwrap().unwrap();
        let key = kdf.derive(duress).unwrap();
        kdf.set_duress(&key, b"{}").unwrap();
        kdf.write(dir.path()).unwrap();
        dir
    }

    /// The one who holds the device makes its key file immutable, hoping
    /// that a duress unlock then fails loudly and leaves the store openable.
    #[test]
    fn a_key_file_that_cannot_be_removed_still_erases_the_store() {
        let (real, duress) = (Passphrase::new("the real one"), Passphrase::new("duress"));
        let dir = device_with_duress(&real, &duress);
        let key_file = dir.path().join(KDF_FILE);
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&key_file)
                .status()
                .is_ok_and(|status| status.success())
        };
        if !chattr("+i") {
            eprintln!("skipped: chattr +i is not available here");
            return;
        }
        let opened = open(dir.path(), &duress);
        let reopened = open(dir.path(), &real);
        chattr("-i");
        assert!(
            matches!(opened, Ok(Unlocked::Erased(Some(_)))),
            "answered as a wrong passphrase"
        );
        assert!(
            matches!(reopened, Err(ClientError::NotActivated(_))),
            "the store is gone"
        );
    }

    /// A key file that cannot be looked at (a link to media that was
    /// removed) is not an erased device: nothing is shredded.
    #[test]
    fn a_key_file_out_of_sight_is_not_taken_for_an_erasure() {
        let real = Passphrase::new("the real one");
        let dir = device_with_duress(&real, &Passphrase::new("duress"));
        let key_file = dir.path().join(KDF_FILE);
        let away = tempfile::tempdir().unwrap();
        std::fs::rename(&key_file, away.path().join(KDF_FILE)).unwrap();
        std::os::unix::fs::symlink("/nonexistent/media/kdf.json", &key_file).unwrap();
        assert!(matches!(
            open(dir.path(), &real),
            Err(ClientError::NotActivated(_))
        ));
        assert!(store_path(dir.path()).exists(), "the store is untouched");
        std::fs::remove_file(&key_file).unwrap();
        std::fs::rename(away.path().join(KDF_FILE), &key_file).unwrap();
        assert!(matches!(open(dir.path(), &real), Ok(Unlocked::Open(_))));
    }

    /// A duress unlock must not be told apart from a normal one by timing.
    /// Both derive the key with the same Argon2id work and try the store;
    /// the duress path then shreds the key file only (the rest is
    /// overwritten after answering, see `Client::finish_erasure`). Measured with the same Argon2id
    /// cost on both paths, over repeated unlocks.
    #[test]
    fn a_duress_unlock_takes_as_long_as_a_normal_one() {
        let params = KdfParams {
            memory_kib: 64 * 1024,
            iterations: 2,
            parallelism: 1,
        };
        let real = Passphrase::new("the real one");
        let duress = Passphrase::new("the duress one");
        let (mut normal, mut under_duress) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            let dir = tempfile::tempdir().unwrap();
            drop(create(dir.path(), &real, params).unwrap());
            let mut kdf = KdfFile::read(dir.path()).unwrap().unwrap();
            let key = kdf.derive(&duress).unwrap();
            kdf.set_duress(&key, b"{}").unwrap();
            kdf.write(dir.path()).unwrap();

            let start = Instant::now();
            let opened = open(dir.path(), &real).unwrap();
            normal.push(start.elapsed());
            assert!(matches!(opened, Unlocked::Open(_)));
            drop(opened);

            let start = Instant::now();
            let opened = open(dir.path(), &duress).unwrap();
            under_duress.push(start.elapsed());
            assert!(matches!(opened, Unlocked::Erased(Some(_))));
            // Only the key file went before answering; the next unlock
            // finds no device and clears what is left.
            assert!(!dir.path().join(KDF_FILE).exists());
            assert!(store_path(dir.path()).exists() && !exists(dir.path()));
            assert!(matches!(
                open(dir.path(), &real),
                Err(ClientError::NotActivated(_))
            ));
            assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        }
        let (normal_median, duress_median) = (median(&mut normal), median(&mut under_duress));
        let spread = normal[normal.len() - 1] - normal[0];
        eprintln!(
            "unlock: normal median {normal_median:?} (range {:?}..{:?}), duress median {duress_median:?} (range {:?}..{:?})",
            normal[0],
            normal[normal.len() - 1],
            under_duress[0],
            under_duress[under_duress.len() - 1]
        );
        let gap = normal_median.abs_diff(duress_median);
        assert!(
            gap <= spread.max(normal_median / 5),
            "duress unlock differs by {gap:?}, more than the normal spread {spread:?}"
        );
    }
}
