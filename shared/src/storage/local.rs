//! Local-disk storage: plain files. Writes create missing parent folders on demand only, so
//! the hot path is one `open+write+close` per crop (no stat, no fsync, no rename).

use std::path::Path;

use async_trait::async_trait;

use super::{Location, ObjectStore, StorageError};

/// Files on the local file system.
pub struct LocalStore;

fn path(loc: &Location) -> Result<&Path, StorageError> {
    match loc {
        Location::Local(p) => Ok(p),
        other => Err(StorageError::Invalid { uri: other.to_string(), reason: "not a local path".into() }),
    }
}

fn write_file(loc: &Location, data: &[u8]) -> Result<(), StorageError> {
    let p = path(loc)?;
    match std::fs::write(p, data) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| StorageError::io(loc, e))?;
            }
            std::fs::write(p, data).map_err(|e| StorageError::io(loc, e))
        }
        other => other.map_err(|e| StorageError::io(loc, e)),
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let p = path(loc)?.to_path_buf();
        let loc = loc.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let f = std::fs::File::open(&p).map_err(|e| StorageError::io(&loc, e))?;
            let meta = f.metadata().map_err(|e| StorageError::io(&loc, e))?;
            if meta.is_dir() {
                return Err(StorageError::Invalid { uri: loc.to_string(), reason: "is a directory".into() });
            }
            if meta.len() > max_bytes {
                return Err(StorageError::TooLarge { uri: loc.to_string(), size: meta.len(), limit: max_bytes });
            }
            let mut buf = Vec::with_capacity(meta.len() as usize);
            // take() guards against a file that grows while we read it.
            f.take(max_bytes + 1).read_to_end(&mut buf).map_err(|e| StorageError::io(&loc, e))?;
            if buf.len() as u64 > max_bytes {
                return Err(StorageError::TooLarge { uri: loc.to_string(), size: buf.len() as u64, limit: max_bytes });
            }
            Ok(buf)
        })
        .await
        .map_err(|e| StorageError::Unavailable { uri: "local".into(), reason: e.to_string() })?
    }

    async fn put(&self, loc: &Location, data: Vec<u8>) -> Result<(), StorageError> {
        self.put_many(vec![(loc.clone(), data)]).await.map(|_| ())
    }

    async fn put_many(&self, items: Vec<(Location, Vec<u8>)>) -> Result<u64, StorageError> {
        // One hop to the blocking pool for the whole batch: on a 2-core machine the thread
        // wake-ups of one hop per file cost more than the writes themselves.
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            for (loc, data) in &items {
                write_file(loc, data)?;
                total += data.len() as u64;
            }
            Ok(total)
        })
        .await
        .map_err(|e| StorageError::Unavailable { uri: "local".into(), reason: e.to_string() })?
    }

    async fn list(&self, prefix: &Location) -> Result<Vec<String>, StorageError> {
        let root = path(prefix)?.to_path_buf();
        let loc = prefix.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StorageError::io(&loc, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| StorageError::io(&loc, e))?;
                    let p = entry.path();
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(&root) {
                        out.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| StorageError::Unavailable { uri: "local".into(), reason: e.to_string() })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore;
        let base = Location::Local(dir.path().join("out"));
        s.put(&base.join("t1").join("000.jpg"), b"abc".to_vec()).await.unwrap();
        s.put(&base.join("t1").join("001.jpg"), b"de".to_vec()).await.unwrap();
        assert_eq!(s.get(&base.join("t1").join("000.jpg"), 10).await.unwrap(), b"abc");
        assert_eq!(s.list(&base).await.unwrap(), vec!["t1/000.jpg", "t1/001.jpg"]);
        let e = s.get(&base.join("t1").join("000.jpg"), 2).await.unwrap_err();
        assert!(matches!(e, StorageError::TooLarge { size: 3, limit: 2, .. }));
        let e = s.get(&base.join("nope"), 10).await.unwrap_err();
        assert!(matches!(e, StorageError::NotFound { .. }));
        assert_eq!(e.failure(), crate::Failure::Permanent);
    }
}
