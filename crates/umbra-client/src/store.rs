//! The device's local store: one SQLCipher database holding the identity
//! key, contacts, conversations, messages and openmls's group state.
//!
//! **Invariant:** nothing about the user is written to disk outside this
//! encrypted file, except `kdf.json` (salt and Argon2id parameters).

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::secret::{KDF_FILE, KdfFile, KdfParams, Passphrase};

pub(crate) const STORE_FILE: &str = "device.db";

const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_secure_phone.sql")),
];

pub(crate) fn store_path(home: &Path) -> PathBuf {
    home.join(STORE_FILE)
}

/// Whether `home` holds a device.
pub fn exists(home: &Path) -> bool {
    store_path(home).exists()
}

fn apply_key(connection: &Connection, key: &[u8; 32]) -> Result<()> {
    // The raw-key form: SQLCipher uses these 32 bytes directly.
    let statement = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex::encode(key)));
    connection.execute_batch(&statement)?;
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

/// Opens the store in `home` with `passphrase`.
pub(crate) fn open(home: &Path, passphrase: &Passphrase) -> Result<Connection> {
    let kdf = KdfFile::read(home)?;
    let (Some(kdf), true) = (kdf, exists(home)) else {
        return Err(ClientError::NotActivated(home.display().to_string()));
    };
    let key = kdf.derive(passphrase)?;
    let mut connection = Connection::open(store_path(home))?;
    apply_key(&connection, &key)?;
    // With the wrong key SQLCipher cannot read the first page.
    if connection
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })
        .is_err()
    {
        return Err(ClientError::WrongPassphrase);
    }
    configure(&mut connection)?;
    Ok(connection)
}

/// Files that make up a device, the key-derivation file first: removing it
/// alone makes the store unreadable (crypto-shredding), and it goes first so
/// that an interrupted wipe still leaves nothing that opens.
fn device_files(home: &Path) -> Vec<PathBuf> {
    [
        KDF_FILE,
        STORE_FILE,
        "device.db-wal",
        "device.db-shm",
        "device.db-journal",
    ]
    .iter()
    .map(|name| home.join(name))
    .collect()
}

/// Destroys the device in `home`: each file is overwritten with random bytes,
/// flushed to disk and removed. Afterwards `home` looks like a fresh install.
pub(crate) fn shred(home: &Path) -> Result<()> {
    let mut first_error = None;
    for path in device_files(home) {
        if let Err(error) = overwrite_and_remove(&path)
            && first_error.is_none()
        {
            first_error = Some(ClientError::Store(format!(
                "wiping {}: {error}",
                path.display()
            )));
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn overwrite_and_remove(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        let mut noise = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(noise.len() as u64) as usize;
            getrandom::getrandom(&mut noise[..n]).map_err(std::io::Error::other)?;
            file.write_all(&noise[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
    }
    std::fs::remove_file(path)
}

#[cfg(unix)]
fn restrict_permissions(home: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict_permissions(_home: &Path) {}
