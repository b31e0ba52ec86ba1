//! A FUSE filesystem for power-loss tests. It passes every operation through to a backing
//! directory, except file data: what a process writes (or truncates) stays in this process's
//! memory, readable through the mount, until the file is fsynced (`fsync` or `fdatasync`);
//! only then does it reach the backing file. [`PowerFs::cut`] is the power going out: every
//! write not yet synced is gone, as a disk cache would lose it.
//!
//! Killing a process keeps the kernel's page cache, so a kill alone never shows a missing
//! fsync; data written through this mount is never in the page cache (direct I/O), so it does.
//!
//! Metadata (creating, renaming and deleting files and directories) is applied at once: the
//! model is strict about file data, not about directory fsyncs. The harness's own files (each
//! node's `node.log`, `cluster.json`) are written through, so a failed test still has its logs.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// A data change not yet synced, in the order it was made.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    /// Path relative to the backing directory.
    path: PathBuf,
    pending: Vec<Op>,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
}

/// What a power cut dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    pub files: u64,
    pub bytes: u64,
}

struct Fs {
    backing: PathBuf,
    state: Arc<Mutex<State>>,
    syncs: Arc<AtomicU64>,
}

/// A mounted power-loss filesystem; unmounted on drop.
pub struct PowerFs {
    pub mountpoint: PathBuf,
    backing: PathBuf,
    state: Arc<Mutex<State>>,
    syncs: Arc<AtomicU64>,
    session: Option<fuser::BackgroundSession>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

/// Answers an operation that returns nothing but success or an error.
fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

const TTL: Duration = Duration::ZERO;

impl PowerFs {
    /// Mounts a filesystem over `backing` at `mountpoint` (both directories must exist; this
    /// needs root, as the fault tests do).
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<PowerFs> {
        let state = Arc::new(Mutex::new(State { next_ino: 2, ..State::default() }));
        {
            let mut s = lock(&state);
            s.inodes.insert(1, Inode { path: PathBuf::new(), pending: Vec::new() });
            s.by_path.insert(PathBuf::new(), 1);
        }
        let syncs = Arc::new(AtomicU64::new(0));
        let fs = Fs { backing: backing.to_path_buf(), state: state.clone(), syncs: syncs.clone() };
        let mut cfg = Config::default();
        cfg.mount_options = vec![fuser::MountOption::FSName("ringkv-powerfs".into()), fuser::MountOption::RW];
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
        Ok(PowerFs { mountpoint: mountpoint.to_path_buf(), backing: backing.to_path_buf(), state, syncs, session: Some(session) })
    }

    /// The power goes: every write not synced is dropped. (Stop the processes using the mount
    /// first, so none writes across the cut.)
    pub fn cut(&self) -> Cut {
        let mut s = lock(&self.state);
        let mut cut = Cut::default();
        for i in s.inodes.values_mut() {
            if !i.pending.is_empty() {
                cut.files += 1;
                cut.bytes += i.pending.iter().map(|o| if let Op::Write(_, d) = o { d.len() as u64 } else { 0 }).sum::<u64>();
                i.pending.clear();
            }
        }
        cut
    }

    /// Writes back everything not synced yet, as the kernel's periodic writeback would have
    /// long before a power loss (e.g. the files of a cluster's first start).
    pub fn settle(&self) -> std::io::Result<()> {
        let inos: Vec<u64> = lock(&self.state).inodes.keys().copied().collect();
        for ino in inos {
            sync_inode(&self.backing, &self.state, ino).map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
        }
        Ok(())
    }

    /// File syncs served so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

fn time_of(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

/// The file's size with the unsynced changes applied.
fn logical_len(backing_len: u64, pending: &[Op]) -> u64 {
    pending.iter().fold(backing_len, |len, op| match op {
        Op::Write(off, d) => len.max(off + d.len() as u64),
        Op::SetLen(l) => *l,
    })
}

impl Fs {
    fn full(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.state).inodes.get(&ino.0).map(|i| i.path.clone()).ok_or(Errno::ENOENT)
    }

    fn ino_for(&self, rel: &Path) -> u64 {
        let mut s = lock(&self.state);
        if let Some(i) = s.by_path.get(rel) {
            return *i;
        }
        let ino = s.next_ino;
        s.next_ino += 1;
        s.inodes.insert(ino, Inode { path: rel.to_path_buf(), pending: Vec::new() });
        s.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    fn attr(&self, ino: u64, rel: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(self.full(rel)).map_err(errno)?;
        let kind = FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile);
        let size = if kind == FileType::RegularFile {
            lock(&self.state).inodes.get(&ino).map(|i| logical_len(m.len(), &i.pending)).unwrap_or(m.len())
        } else {
            m.len()
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time_of(m.atime(), m.atime_nsec()),
            mtime: time_of(m.mtime(), m.mtime_nsec()),
            ctime: time_of(m.ctime(), m.ctime_nsec()),
            crtime: time_of(m.ctime(), m.ctime_nsec()),
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<(u64, FileAttr), Errno> {
        let rel = self.path_of(parent)?.join(name);
        std::fs::symlink_metadata(self.full(&rel)).map_err(errno)?;
        let ino = self.ino_for(&rel);
        Ok((ino, self.attr(ino, &rel)?))
    }

    fn forget_path(&self, rel: &Path) {
        let mut s = lock(&self.state);
        if let Some(ino) = s.by_path.remove(rel) {
            s.inodes.remove(&ino);
        }
    }

    fn sync(&self, ino: INodeNo) -> Result<(), Errno> {
        sync_inode(&self.backing, &self.state, ino.0)?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Files the harness writes (each node's `node.log`, the cluster file) go straight to the
/// backing directory. (Not every `.log`: RocksDB's write-ahead logs are `NNNNNN.log`.)
fn written_through(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "node.log" || n == "cluster.json")
}

/// Applies the unsynced changes of `ino` to its backing file and syncs it.
fn sync_inode(backing: &Path, state: &Mutex<State>, ino: u64) -> Result<(), Errno> {
    let (rel, ops) = {
        let mut s = lock(state);
        let i = s.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        (i.path.clone(), std::mem::take(&mut i.pending))
    };
    if ops.is_empty() {
        return Ok(());
    }
    let f = OpenOptions::new().write(true).open(backing.join(&rel)).map_err(errno)?;
    for op in &ops {
        match op {
            Op::Write(off, d) => f.write_all_at(d, *off).map_err(errno)?,
            Op::SetLen(l) => f.set_len(*l).map_err(errno)?,
        }
    }
    f.sync_all().map_err(errno)?;
    Ok(())
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name) {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path_of(ino).and_then(|p| self.attr(ino.0, &p)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let rel = self.path_of(ino)?;
            if let Some(mode) = mode {
                std::fs::set_permissions(self.full(&rel), std::fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
            }
            if let Some(len) = size {
                if let Some(i) = lock(&self.state).inodes.get_mut(&ino.0) {
                    i.pending.push(Op::SetLen(len));
                }
            }
            self.attr(ino.0, &rel)
        })();
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let r = (|| {
            let rel = self.path_of(parent)?.join(name);
            std::fs::create_dir(self.full(&rel)).map_err(errno)?;
            std::fs::set_permissions(self.full(&rel), std::fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
            self.entry(parent, name)
        })();
        match r {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let rel = self.path_of(parent)?.join(name);
            std::fs::remove_file(self.full(&rel)).map_err(errno)?;
            self.forget_path(&rel);
            Ok(())
        })();
        empty(reply, r)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let rel = self.path_of(parent)?.join(name);
            std::fs::remove_dir(self.full(&rel)).map_err(errno)?;
            self.forget_path(&rel);
            Ok(())
        })();
        empty(reply, r)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let from = self.path_of(parent)?.join(name);
            let to = self.path_of(newparent)?.join(newname);
            std::fs::rename(self.full(&from), self.full(&to)).map_err(errno)?;
            // The replaced file is gone; the moved inode (and anything under it) has new paths.
            self.forget_path(&to);
            let mut s = lock(&self.state);
            let moved: Vec<(PathBuf, u64)> = s.by_path.iter().filter(|(p, _)| p.starts_with(&from)).map(|(p, i)| (p.clone(), *i)).collect();
            for (old, ino) in moved {
                let new = match old.strip_prefix(&from) {
                    Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                    _ => to.clone(),
                };
                s.by_path.remove(&old);
                s.by_path.insert(new.clone(), ino);
                if let Some(i) = s.inodes.get_mut(&ino) {
                    i.path = new;
                }
            }
            Ok(())
        })();
        empty(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let rel = self.path_of(ino)?;
            std::fs::symlink_metadata(self.full(&rel)).map_err(errno)?;
            if flags.0 & libc::O_TRUNC != 0 {
                if let Some(i) = lock(&self.state).inodes.get_mut(&ino.0) {
                    i.pending.push(Op::SetLen(0));
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, flags: i32, reply: ReplyCreate) {
        let r = (|| {
            let rel = self.path_of(parent)?.join(name);
            let full = self.full(&rel);
            let existed = full.exists();
            if existed && flags & libc::O_EXCL != 0 {
                return Err(Errno::EEXIST);
            }
            if !existed {
                File::create(&full).map_err(errno)?;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
            }
            let ino = self.ino_for(&rel);
            if existed && flags & libc::O_TRUNC != 0 {
                if let Some(i) = lock(&self.state).inodes.get_mut(&ino) {
                    i.pending.push(Op::SetLen(0));
                }
            }
            self.attr(ino, &rel)
        })();
        match r {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = (|| {
            // Under the lock, so no write slips in between and the changes need no copy.
            let s = lock(&self.state);
            let i = s.inodes.get(&ino.0).ok_or(Errno::ENOENT)?;
            let (rel, pending) = (&i.path, &i.pending);
            let f = File::open(self.full(rel)).map_err(errno)?;
            let backing_len = f.metadata().map_err(errno)?.len();
            let len = logical_len(backing_len, pending);
            let end = len.min(offset + size as u64);
            if offset >= end {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; (end - offset) as usize];
            // The synced bytes, then each unsynced change over them, in order.
            let have = backing_len.saturating_sub(offset).min(buf.len() as u64) as usize;
            if have > 0 {
                f.read_exact_at(&mut buf[..have], offset).map_err(errno)?;
            }
            let mut cur_len = backing_len;
            for op in pending {
                match op {
                    Op::Write(off, d) => {
                        let (lo, hi) = ((*off).max(offset), (off + d.len() as u64).min(end));
                        if lo < hi {
                            buf[(lo - offset) as usize..(hi - offset) as usize]
                                .copy_from_slice(&d[(lo - off) as usize..(hi - off) as usize]);
                        }
                        cur_len = cur_len.max(off + d.len() as u64);
                    }
                    Op::SetLen(l) => {
                        // Shrinking drops the bytes past the end; growing again reads zeros.
                        if *l < cur_len && *l < end {
                            let from = (*l).max(offset);
                            buf[(from - offset) as usize..].fill(0);
                        }
                        cur_len = *l;
                    }
                }
            }
            Ok(buf)
        })();
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = lock(&self.state);
        let Some(i) = s.inodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if written_through(&i.path) && i.pending.is_empty() {
            let path = self.backing.join(&i.path);
            drop(s);
            return match OpenOptions::new().write(true).open(path).and_then(|f| f.write_all_at(data, offset)) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(e)),
            };
        }
        i.pending.push(Op::Write(offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.sync(ino))
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = (|| {
            let rel = self.path_of(ino)?;
            let mut names: BTreeMap<std::ffi::OsString, FileType> = BTreeMap::new();
            for e in std::fs::read_dir(self.full(&rel)).map_err(errno)? {
                let e = e.map_err(errno)?;
                let kind = e.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
                names.insert(e.file_name(), kind);
            }
            Ok((rel, names))
        })();
        let (rel, names) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut all: Vec<(u64, FileType, std::ffi::OsString)> =
            vec![(ino.0, FileType::Directory, ".".into()), (ino.0, FileType::Directory, "..".into())];
        for (name, kind) in names {
            let child = self.ino_for(&rel.join(&name));
            all.push((child, kind, name));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes are applied at once (see the module comment).
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        // Preallocation that keeps the size changes nothing visible; one that grows the file
        // is an unsynced size change.
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            let mut s = lock(&self.state);
            if let Some(i) = s.inodes.get_mut(&ino.0) {
                let backing_len = std::fs::metadata(self.backing.join(&i.path)).map(|m| m.len()).unwrap_or(0);
                let len = logical_len(backing_len, &i.pending);
                if offset + length > len {
                    i.pending.push(Op::SetLen(offset + length));
                }
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Unsynced data is readable until the cut and gone after it; synced data stays.
    #[test]
    fn unsynced_writes_are_dropped_by_a_cut_and_synced_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
        std::fs::create_dir_all(&backing).expect("dir");
        std::fs::create_dir_all(&mnt).expect("dir");
        let fs = PowerFs::mount(&backing, &mnt).expect("mount");
        std::fs::create_dir(mnt.join("d")).expect("mkdir");
        let mut synced = File::create(mnt.join("d/synced")).expect("create");
        synced.write_all(b"durable").expect("write");
        synced.sync_data().expect("fdatasync");
        synced.write_all(b" and lost").expect("write");
        let mut lost = File::create(mnt.join("d/lost.tmp")).expect("create");
        lost.write_all(b"never synced").expect("write");
        drop(lost);
        std::fs::rename(mnt.join("d/lost.tmp"), mnt.join("d/lost")).expect("rename");
        let read = |name: &str| {
            let mut s = String::new();
            File::open(mnt.join(name)).expect("open").read_to_string(&mut s).expect("read");
            s
        };
        assert_eq!(read("d/synced"), "durable and lost");
        assert_eq!(read("d/lost"), "never synced");
        assert_eq!(std::fs::metadata(mnt.join("d/lost")).expect("stat").len(), 12);
        assert!(fs.syncs() >= 1);
        drop(synced);
        let cut = fs.cut();
        assert_eq!(cut, Cut { files: 2, bytes: 21 });
        assert_eq!(read("d/synced"), "durable");
        assert_eq!(read("d/lost"), "", "the renamed file exists, its data is gone");
        drop(fs);
        assert_eq!(std::fs::read_to_string(backing.join("d/synced")).expect("backing"), "durable");
    }
}
