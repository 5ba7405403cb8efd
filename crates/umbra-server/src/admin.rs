//! Operator commands that work on the data directory directly, whether or
//! not the server is running (SQLite's WAL lets both use the database).

use std::path::Path;

use umbra_proto::{ActivationCode, ActivationString, BlobId, DistributorCredential};
use umbra_store::CodeHash;

use crate::{Config, ServerError, connect_store, open_store, tls};

/// Draws `count` one-time activation codes, each granting `days` of
/// subscription, stores their hashes and returns the activation strings to
/// hand out (the only place the codes themselves ever appear).
pub async fn issue_codes(
    data_dir: &Path,
    config: &Config,
    days: u32,
    count: usize,
    now: u64,
) -> Result<Vec<ActivationString>, ServerError> {
    let pin = tls::fingerprint(&data_dir.join(&config.cert))?;
    let mut codes = Vec::with_capacity(count);
    for _ in 0..count {
        codes.push(random_code()?);
    }
    let store = connect_store(data_dir, config).await?;
    let hashes: Vec<CodeHash> = codes.iter().map(CodeHash::of).collect();
    store.issue_codes(&hashes, days, now).await?;
    Ok(codes
        .into_iter()
        .map(|code| ActivationString {
            address: config.public_address.clone(),
            pin,
            code,
        })
        .collect())
}

/// 16 characters from a 31-letter alphabet: about 79 bits of randomness.
fn random_code() -> Result<ActivationCode, ServerError> {
    let error = |reason: String| ServerError::Io {
        context: "drawing an activation code".into(),
        source: std::io::Error::other(reason),
    };
    let text = crate::random_string(ActivationCode::LEN).map_err(|e| error(e.to_string()))?;
    ActivationCode::parse(&text).map_err(|e| error(e.to_string()))
}

/// Renders text as a QR code made of Unicode half blocks, for a terminal.
pub fn qr_text(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

/// Draws renewal codes (days added to an existing line) issued by the
/// operator, valid on any line.
pub async fn issue_renewal_codes(
    data_dir: &Path,
    config: &Config,
    days: u32,
    count: usize,
    now: u64,
) -> Result<Vec<ActivationCode>, ServerError> {
    let mut codes = Vec::with_capacity(count);
    for _ in 0..count {
        codes.push(random_code()?);
    }
    let store = connect_store(data_dir, config).await?;
    let hashes: Vec<CodeHash> = codes.iter().map(CodeHash::of).collect();
    store.issue_renewal_codes(&hashes, days, now).await?;
    Ok(codes)
}

/// Creates a distributor with a fresh key and returns the credential to
/// hand it (the only place its secret key ever appears).
pub async fn add_distributor(
    data_dir: &Path,
    config: &Config,
    name: &str,
    quota: u32,
    now: u64,
) -> Result<DistributorCredential, ServerError> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(|e| ServerError::Io {
        context: "drawing a distributor key".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let public_key = umbra_mls::DeviceSigner::from_secret(&secret).identity_key();
    let store = connect_store(data_dir, config).await?;
    let id = store
        .add_distributor(name, &public_key, quota, now)
        .await?
        .ok_or_else(|| ServerError::Io {
            context: format!("adding distributor {name:?}"),
            source: std::io::Error::other("the name is taken"),
        })?;
    Ok(DistributorCredential {
        address: config.public_address.clone(),
        pin: tls::fingerprint(&data_dir.join(&config.cert))?,
        id,
        secret,
    })
}

/// Every distributor, with its remaining quota.
pub async fn distributors(
    data_dir: &Path,
    config: &Config,
) -> Result<Vec<umbra_store::Distributor>, ServerError> {
    Ok(connect_store(data_dir, config)
        .await?
        .distributors()
        .await?)
}

/// Ends the lines whose subscription lapsed more than the grace period ago
/// (what the server's sweeper does every minute). Returns them.
pub async fn purge_lapsed_lines(
    data_dir: &Path,
    config: &Config,
    now: u64,
) -> Result<Vec<umbra_proto::AccountId>, ServerError> {
    let store = connect_store(data_dir, config).await?;
    let ended = store
        .revoke_lapsed(
            now.saturating_sub(config.subscription_grace.as_secs()),
            now,
            now.saturating_add(config.mailbox_ttl.as_secs()),
        )
        .await?;
    Ok(ended.into_iter().map(|(line, _)| line).collect())
}

/// What a backup holds besides the database: the configuration, the TLS
/// certificate and key and the anchor that issued them, where `dir` holds
/// it (devices pin the anchor: a server restored without it would be
/// refused by every device, and without its key could not rotate), and
/// the key behind public delivery IDs (without it, IDs devices recorded as
/// applied would change). Paths relative to the data directory.
fn backed_up_files(config: &Config, dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = vec![
        std::path::PathBuf::from(crate::config::CONFIG_FILE),
        config.cert.clone(),
        config.key.clone(),
        std::path::PathBuf::from(crate::delivery_ids::KEY_FILE),
    ];
    let (anchor, anchor_key) = tls::anchor_paths(&config.cert);
    files.extend(
        [anchor, anchor_key]
            .into_iter()
            .filter(|f| dir.join(f).exists()),
    );
    files
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { context, source }
}

/// Copies `files` (relative paths) from one directory to another, creating
/// it and their folders readable by their owner only, each file written
/// under a temporary name, flushed to disk, then renamed into place.
fn copy_files(from: &Path, to: &Path, files: &[std::path::PathBuf]) -> Result<(), ServerError> {
    crate::create_private_dir(to).map_err(io_error(format!("creating {}", to.display())))?;
    for file in files {
        copy_file(from, to, file)?;
    }
    sync_tree(to, files)
}

/// Copies blob files as [`copy_files`] does, leaving out any deleted
/// meanwhile (its recipients fetched it while the backup ran): returns
/// those copied.
fn copy_blob_files(
    from: &Path,
    to: &Path,
    files: Vec<std::path::PathBuf>,
) -> Result<Vec<std::path::PathBuf>, ServerError> {
    let mut copied = Vec::with_capacity(files.len());
    for file in files {
        match copy_file(from, to, &file) {
            Ok(()) => copied.push(file),
            Err(ServerError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && !from.join(&file).exists() => {}
            Err(error) => return Err(error),
        }
    }
    sync_tree(to, &copied)?;
    Ok(copied)
}

/// Copies one file under a temporary name, flushes it, renames it.
fn copy_file(from: &Path, to: &Path, file: &Path) -> Result<(), ServerError> {
    let (source, target) = (from.join(file), to.join(file));
    if let Some(parent) = target.parent() {
        crate::create_private_dir(parent)
            .map_err(io_error(format!("creating {}", parent.display())))?;
    }
    let mut partial = target.clone().into_os_string();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    if let Err(error) = std::fs::copy(&source, &partial) {
        let _ = std::fs::remove_file(&partial);
        return Err(io_error(format!("copying {}", source.display()))(error));
    }
    sync_file(&partial)?;
    std::fs::rename(&partial, &target).map_err(io_error(format!("writing {}", target.display())))
}

/// Flushes a file to disk.
fn sync_file(path: &Path) -> Result<(), ServerError> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(io_error(format!("flushing {}", path.display())))
}

/// Flushes the directories under `root` that hold `files`, and `root`, so
/// that the names survive a power loss too.
fn sync_tree(root: &Path, files: &[std::path::PathBuf]) -> Result<(), ServerError> {
    let mut dirs: Vec<std::path::PathBuf> = files
        .iter()
        .filter_map(|file| root.join(file).parent().map(Path::to_path_buf))
        .collect();
    dirs.push(root.to_path_buf());
    dirs.sort();
    dirs.dedup();
    dirs.iter().try_for_each(|dir| sync_file(dir))
}

/// Only plain relative paths inside the data directory are copied: an
/// absolute one, or one that climbs out with `..`, is the operator's to
/// copy (it could even be the very file being written).
fn inside(files: &[std::path::PathBuf]) -> Result<(), ServerError> {
    use std::path::Component;
    match files.iter().find(|file| {
        !file
            .components()
            .all(|part| matches!(part, Component::Normal(_)))
    }) {
        Some(outside) => Err(ServerError::Io {
            context: format!("copying {}", outside.display()),
            source: std::io::Error::other(
                "only paths inside the data directory are backed up and restored; copy it yourself",
            ),
        }),
        None => Ok(()),
    }
}

fn refuse_existing(what: &str, dir: &Path, reason: &str) -> ServerError {
    ServerError::Io {
        context: format!("{what} {}", dir.display()),
        source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, reason.to_owned()),
    }
}

/// Copies a running (or stopped) server's data directory to `destination`,
/// a directory that must not exist yet, created readable by its owner
/// only: a consistent copy of the database taken while the server goes on
/// (`SqliteStore::backup`), and the files it cannot run without, each
/// flushed to disk. The copy holds the TLS private key: keep it as the data
/// directory is kept. Returns what was copied, relative to `destination`.
pub fn backup(
    data_dir: &Path,
    config: &Config,
    destination: &Path,
) -> Result<Vec<std::path::PathBuf>, ServerError> {
    if destination.exists() {
        return Err(refuse_existing(
            "backing up into",
            destination,
            "it exists already; name a new directory",
        ));
    }
    if config.postgres_url().is_some() {
        return Err(ServerError::Store(umbra_store::StoreError::Backend(
            "the database is PostgreSQL: back it up with PostgreSQL's own tools (pg_dump, or \
             pg_basebackup with WAL archiving; see docs/operations.md), and copy the data \
             directory's umbra-server.toml, tls/ and delivery-ids.key beside it"
                .into(),
        )));
    }
    let mut files = backed_up_files(config, data_dir);
    files.push(config.database.clone());
    inside(&files)?;
    files.pop();
    copy_files(data_dir, destination, &files)?;
    let database = destination.join(&config.database);
    umbra_store::sqlite::SqliteStore::backup(&data_dir.join(&config.database), &database)?;
    sync_file(&database)?;
    files.push(config.database.clone());
    // The bytes of the blobs the copy holds rows of, copied after it: a
    // blob's file only grows until it is deleted, so each is at least as
    // long as its row says. A file deleted meanwhile is left out: its
    // recipients fetched it (a device still wanting it is told it is
    // gone), and the restored server treats its row as a blob whose bytes
    // it lost.
    let blobs = blobs_dir(config);
    let blob_files: Vec<std::path::PathBuf> =
        umbra_store::sqlite::SqliteStore::blob_ids(&database)?
            .iter()
            .map(|id| blobs.join(id.to_hex()))
            .collect();
    files.extend(copy_blob_files(data_dir, destination, blob_files)?);
    sync_tree(destination, &files)?;
    Ok(files)
}

/// Where the embedded store keeps blob files, relative to the data
/// directory: `blobs/` beside the database.
fn blobs_dir(config: &Config) -> std::path::PathBuf {
    config
        .database
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join("blobs")
}

/// Makes `data_dir`, which must be empty or not exist, a copy of the backup
/// at `backup` (made by [`backup`]); the server is then started on it as
/// usual. Returns what was restored.
pub fn restore(backup: &Path, data_dir: &Path) -> Result<Vec<std::path::PathBuf>, ServerError> {
    let config = Config::load(backup)?;
    let occupied = std::fs::read_dir(data_dir)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(refuse_existing(
            "restoring into",
            data_dir,
            "it is not empty; stop its server, move the whole directory away, and restore into \
             an empty or new one",
        ));
    }
    let mut files = backed_up_files(&config, backup);
    files.push(config.database.clone());
    let blobs = blobs_dir(&config);
    if let Ok(entries) = std::fs::read_dir(backup.join(&blobs)) {
        for entry in entries {
            let entry = entry.map_err(io_error(format!("reading {}", blobs.display())))?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| BlobId::from_hex(n).is_ok()) {
                files.push(blobs.join(name));
            }
        }
    }
    inside(&files)?;
    copy_files(backup, data_dir, &files)?;
    // Opening it applies any migration a newer server needs.
    drop(open_store(data_dir, &Config::load(data_dir)?)?);
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_file_deleted_while_the_backup_runs_is_left_out() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(from.path().join("blobs")).unwrap();
        std::fs::write(from.path().join("blobs/aa"), b"kept").unwrap();
        let files = vec![
            std::path::PathBuf::from("blobs/aa"),
            std::path::PathBuf::from("blobs/bb"),
        ];
        let target = to.path().join("backup");
        let copied = copy_blob_files(from.path(), &target, files).unwrap();
        assert_eq!(copied, vec![std::path::PathBuf::from("blobs/aa")]);
        assert_eq!(std::fs::read(target.join("blobs/aa")).unwrap(), b"kept");
        assert!(!target.join("blobs/bb.partial").exists());
    }
}
