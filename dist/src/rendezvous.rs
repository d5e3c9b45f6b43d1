//! A TCP rendezvous of the processes of a torchrun-style launch, without CUDA.
//!
//! torchrun (or any launcher) only sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` and starts the processes
//! ([`TorchrunEnv`]). kiln's NCCL collective needs one opaque blob (NCCL's unique id)
//! from rank 0 on every rank, and barriers that time out (NCCL has none); both go
//! through a star of TCP connections to rank 0 ([`TcpGroup`]):
//!
//! - rank 0 listens on `MASTER_PORT` on every interface of `MASTER_ADDR`'s address
//!   family (as torch's TCPStore does: a host name often resolves to a loopback address
//!   on its own host), the other ranks connect to `MASTER_ADDR:MASTER_PORT`, retrying
//!   until the deadline (`ddp_timeout`), and introduce themselves (rank, world size,
//!   channel);
//! - [`TcpGroup::connect`] opens several independent channels at once, so that two
//!   threads (training, background checkpoint writer) each have their own;
//! - every operation is a gather of one frame per rank at rank 0 and a reply from rank
//!   0 to every rank, each bounded by the timeout: a rank that died closes its
//!   connections (a clear error at once), one that hangs is reported after the timeout.
//!
//! Frames are `[op: u8][len: u64 LE][bytes]`; the op byte catches ranks that call
//! different collectives at the same time.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The variables of a torchrun-style launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchrunEnv {
    /// `RANK`: this process, `0..world_size`.
    pub rank: usize,
    /// `WORLD_SIZE`: processes in the run.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process on its node (its GPU is `cuda:<local_rank>`).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: processes on this node.
    pub local_world_size: usize,
    /// `MASTER_ADDR`: the host of rank 0.
    pub master_addr: String,
    /// `MASTER_PORT`: the port rank 0 listens on.
    pub master_port: u16,
}

impl TorchrunEnv {
    /// Reads the variables from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `var` (the environment, or a map in tests). Every
    /// variable is required; a missing or invalid one is a one-line error.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| -> Result<String> {
            match var(k) {
                Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                _ => Err(Error::Launch(format!(
                    "torchrun launch: {k} is not set (a launcher must set RANK, WORLD_SIZE, \
                     LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
                ))),
            }
        };
        let number = |k: &str| -> Result<usize> {
            let v = get(k)?;
            v.parse::<usize>().map_err(|_| {
                Error::Launch(format!(
                    "torchrun launch: {k}={v:?} is not a non-negative integer"
                ))
            })
        };
        let rank = number("RANK")?;
        let world_size = number("WORLD_SIZE")?;
        let local_rank = number("LOCAL_RANK")?;
        let local_world_size = number("LOCAL_WORLD_SIZE")?;
        let master_addr = get("MASTER_ADDR")?;
        let port = get("MASTER_PORT")?;
        let master_port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                Error::Launch(format!(
                    "torchrun launch: MASTER_PORT={port:?} is not a port number (1 to 65535)"
                ))
            })?;
        if world_size == 0 || world_size > i32::MAX as usize {
            return Err(Error::Launch(format!(
                "torchrun launch: WORLD_SIZE={world_size} is not a number of processes"
            )));
        }
        if rank >= world_size {
            return Err(Error::Launch(format!(
                "torchrun launch: RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        if local_world_size == 0 || local_world_size > world_size {
            return Err(Error::Launch(format!(
                "torchrun launch: LOCAL_WORLD_SIZE={local_world_size} is not between 1 and \
                 WORLD_SIZE={world_size}"
            )));
        }
        if local_rank >= local_world_size {
            return Err(Error::Launch(format!(
                "torchrun launch: LOCAL_RANK={local_rank} is not below \
                 LOCAL_WORLD_SIZE={local_world_size}"
            )));
        }
        Ok(TorchrunEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        })
    }

    /// The addresses `MASTER_ADDR:MASTER_PORT` resolves to.
    fn master_addrs(&self) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::Launch(format!(
                    "torchrun launch: MASTER_ADDR={:?} does not resolve: {e}",
                    self.master_addr
                ))
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Launch(format!(
                "torchrun launch: MASTER_ADDR={:?} resolves to no address",
                self.master_addr
            )));
        }
        Ok(addrs)
    }
}

const HELLO: &[u8; 8] = b"kilnrdv1";
/// Operation codes of frames.
const OP_BLOB: u8 = 1;
const OP_GATHER: u8 = 2;
const OP_BARRIER: u8 = 3;
const OP_REPLY: u8 = 4;
const OP_ABORT: u8 = 5;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_BLOB => "a broadcast",
        OP_GATHER => "a gather",
        OP_BARRIER => "a barrier",
        OP_REPLY => "a reply",
        OP_ABORT => "an abort",
        _ => "an unknown operation",
    }
}

/// The connections of one channel: rank 0 holds one per other rank (index `r - 1`),
/// every other rank one to rank 0.
#[derive(Debug)]
enum Links {
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

/// One channel of the rendezvous: collective operations over TCP among the ranks of a
/// launch, every one bounded by the timeout. Each method is collective (all ranks call
/// it, in the same order); calls on one channel are serialised, two channels are
/// independent.
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

/// Why an I/O operation with a peer failed, in words.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "no answer in time".into(),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => "its connection closed (the process ended)".into(),
        _ => e.to_string(),
    }
}

impl TcpGroup {
    /// Meets the other ranks of `env` and opens `channels` independent channels (at
    /// least one). Rank 0 waits for every other rank, the others retry connecting, all
    /// until `timeout` has passed.
    pub fn connect(env: &TorchrunEnv, timeout: Duration, channels: usize) -> Result<Vec<Self>> {
        let channels = channels.max(1);
        let deadline = Instant::now() + timeout;
        let addrs = env.master_addrs()?;
        let links = if env.world_size == 1 {
            (0..channels).map(|_| Links::Root(Vec::new())).collect()
        } else if env.rank == 0 {
            Self::accept_all(env, &addrs, timeout, deadline, channels)?
        } else {
            let mut links = Vec::with_capacity(channels);
            for channel in 0..channels {
                links.push(Links::Leaf(Self::connect_one(
                    env, &addrs, timeout, deadline, channel,
                )?));
            }
            links
        };
        Ok(links
            .into_iter()
            .map(|links| TcpGroup {
                rank: env.rank,
                world: env.world_size,
                timeout,
                links: Mutex::new(links),
            })
            .collect())
    }

    fn accept_all(
        env: &TorchrunEnv,
        addrs: &[SocketAddr],
        timeout: Duration,
        deadline: Instant,
        channels: usize,
    ) -> Result<Vec<Links>> {
        let any: IpAddr = if addrs.iter().any(SocketAddr::is_ipv4) {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let bind = SocketAddr::new(any, env.master_port);
        let listener = TcpListener::bind(bind).map_err(|e| {
            Error::Rendezvous(format!(
                "rank 0: cannot listen on port {} (MASTER_PORT): {e}",
                env.master_port
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Rendezvous(format!("rank 0: rendezvous socket: {e}")))?;
        let others = env.world_size - 1;
        let mut slots: Vec<Vec<Option<TcpStream>>> = (0..channels)
            .map(|_| (0..others).map(|_| None).collect())
            .collect();
        let mut missing = others * channels;
        while missing > 0 {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    // A stranger (a port scan, a stale process) is dropped, not fatal.
                    let Ok((rank, world, channel)) = read_hello(&mut stream, deadline) else {
                        continue;
                    };
                    if world != env.world_size {
                        return Err(Error::Rendezvous(format!(
                            "rank 0: rank {rank} (from {peer}) says WORLD_SIZE={world}, here \
                             WORLD_SIZE={}",
                            env.world_size
                        )));
                    }
                    let slot = rank
                        .checked_sub(1)
                        .filter(|&i| i < others && channel < channels)
                        .map(|i| &mut slots[channel][i]);
                    match slot {
                        Some(slot @ None) => {
                            *slot = Some(stream);
                            missing -= 1;
                        }
                        Some(Some(_)) => {
                            return Err(Error::Rendezvous(format!(
                                "rank 0: two processes (one from {peer}) say they are rank \
                                 {rank}: RANK must differ on every process"
                            )));
                        }
                        None => {
                            return Err(Error::Rendezvous(format!(
                                "rank 0: a process from {peer} says it is rank {rank} \
                                 (channel {channel}) of {world}"
                            )));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let absent: Vec<String> = (1..env.world_size)
                            .filter(|&r| slots.iter().any(|c| c[r - 1].is_none()))
                            .map(|r| r.to_string())
                            .collect();
                        return Err(Error::Rendezvous(format!(
                            "rank 0: ranks {} did not connect to port {} within {} s \
                             (ddp_timeout): did they start, with this MASTER_ADDR/MASTER_PORT?",
                            absent.join(", "),
                            env.master_port,
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Rendezvous(format!(
                        "rank 0: accepting connections on port {}: {e}",
                        env.master_port
                    )));
                }
            }
        }
        slots
            .into_iter()
            .map(|c| {
                c.into_iter()
                    .map(|s| {
                        let s = s.ok_or_else(|| {
                            Error::Rendezvous("rank 0: rendezvous lost a connection".into())
                        })?;
                        prepare(&s).map_err(|e| {
                            Error::Rendezvous(format!("rank 0: rendezvous socket: {e}"))
                        })?;
                        Ok(s)
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Links::Root)
            })
            .collect()
    }

    fn connect_one(
        env: &TorchrunEnv,
        addrs: &[SocketAddr],
        timeout: Duration,
        deadline: Instant,
        channel: usize,
    ) -> Result<TcpStream> {
        let mut last = String::from("no attempt");
        loop {
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(addr, left) {
                    Ok(mut stream) => {
                        let hello = (|| {
                            prepare(&stream)?;
                            let mut msg = HELLO.to_vec();
                            for v in [env.rank, env.world_size, channel] {
                                msg.extend_from_slice(&(v as u64).to_le_bytes());
                            }
                            stream.set_write_timeout(Some(clamp(left)))?;
                            stream.write_all(&msg)?;
                            stream.flush()
                        })();
                        match hello {
                            Ok(()) => return Ok(stream),
                            Err(e) => last = e.to_string(),
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Rendezvous(format!(
                    "rank {}: could not connect to rank 0 at {}:{} within {} s (ddp_timeout): \
                     {last}",
                    env.rank,
                    env.master_addr,
                    env.master_port,
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        // A panic while holding the lock leaves the streams as they were; use them.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, what: &str, peer: usize, e: &std::io::Error) -> Error {
        Error::Rendezvous(format!(
            "rank {} of {}: {what}: rank {peer}: {} (ddp_timeout {} s)",
            self.rank,
            self.world,
            io_reason(e),
            self.timeout.as_secs()
        ))
    }

    /// Gathers one frame per rank at rank 0 and replies with `reply(frames)` (rank 0's
    /// own frame first); every rank returns the reply.
    fn exchange(
        &self,
        op: u8,
        mine: &[u8],
        reply: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        let what = op_name(op);
        let mut links = self.links();
        match &mut *links {
            Links::Root(peers) => {
                let mut frames = Vec::with_capacity(self.world);
                frames.push(mine.to_vec());
                for (i, s) in peers.iter_mut().enumerate() {
                    let (got, bytes) =
                        read_frame(s, deadline).map_err(|e| self.error(what, i + 1, &e))?;
                    if got != op {
                        return Err(Error::Rendezvous(format!(
                            "rank 0 of {}: rank {} is in {} while rank 0 is in {what}: the \
                             ranks diverged",
                            self.world,
                            i + 1,
                            op_name(got)
                        )));
                    }
                    frames.push(bytes);
                }
                let out = reply(frames)?;
                for (i, s) in peers.iter_mut().enumerate() {
                    write_frame(s, OP_REPLY, &out, deadline)
                        .map_err(|e| self.error(what, i + 1, &e))?;
                }
                Ok(out)
            }
            Links::Leaf(s) => {
                write_frame(s, op, mine, deadline).map_err(|e| self.error(what, 0, &e))?;
                let (got, bytes) = read_frame(s, deadline).map_err(|e| self.error(what, 0, &e))?;
                if got != OP_REPLY {
                    return Err(Error::Rendezvous(format!(
                        "rank {} of {}: unexpected {} from rank 0 in {what}",
                        self.rank,
                        self.world,
                        op_name(got)
                    )));
                }
                Ok(bytes)
            }
        }
    }

    /// Rank 0's `blob` on every rank (the others' argument is ignored).
    pub fn broadcast_from_root(&self, blob: &[u8]) -> Result<Vec<u8>> {
        self.exchange(OP_BLOB, if self.rank == 0 { blob } else { &[] }, |mut f| {
            Ok(std::mem::take(&mut f[0]))
        })
    }

    /// Every rank's bytes, by rank (lengths may differ).
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.exchange(OP_GATHER, mine, |frames| {
            let mut out = Vec::new();
            for f in &frames {
                out.extend_from_slice(&(f.len() as u64).to_le_bytes());
                out.extend_from_slice(f);
            }
            Ok(out)
        })?;
        let mut parts = Vec::with_capacity(self.world);
        let mut rest = all.as_slice();
        while !rest.is_empty() {
            let bad = || Error::Rendezvous(format!("rank {}: a malformed gather reply", self.rank));
            let (len, tail) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
            let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad())?;
            if len > tail.len() {
                return Err(bad());
            }
            parts.push(tail[..len].to_vec());
            rest = &tail[len..];
        }
        if parts.len() != self.world {
            return Err(Error::Rendezvous(format!(
                "rank {}: a gather reply with {} parts for {} ranks",
                self.rank,
                parts.len(),
                self.world
            )));
        }
        Ok(parts)
    }

    /// Sums `values` element-wise over all ranks, in place, in rank order (the same
    /// result, bit for bit, on every rank).
    pub fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let mine: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(&mine)?;
        let mut sum = vec![0f64; values.len()];
        for (r, part) in all.iter().enumerate() {
            if part.len() != mine.len() {
                return Err(Error::Rendezvous(format!(
                    "rank {}: rank {r} all-reduced {} values, this rank {}",
                    self.rank,
                    part.len() / 8,
                    values.len()
                )));
            }
            for (s, c) in sum.iter_mut().zip(part.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *s += f64::from_le_bytes(b);
            }
        }
        values.copy_from_slice(&sum);
        Ok(())
    }

    /// Waits until every rank has called it, or fails after the timeout naming the rank
    /// that did not arrive.
    pub fn barrier(&self) -> Result<()> {
        self.exchange(OP_BARRIER, &[], |_| Ok(Vec::new()))
            .map(|_| ())
    }
}

/// A channel of the rendezvous kept for one message: "rank r ends the run with exit
/// status c" (as `MPI_Abort`). A watcher thread on every rank waits for it (rank 0
/// relays it to every other rank); a connection that merely closes is not an abort.
#[derive(Debug)]
pub struct AbortLine {
    rank: usize,
    links: Mutex<Links>,
}

fn abort_frame(from: usize, code: i32) -> Vec<u8> {
    let mut f = vec![OP_ABORT];
    f.extend_from_slice(&12u64.to_le_bytes());
    f.extend_from_slice(&(from as u64).to_le_bytes());
    f.extend_from_slice(&code.to_le_bytes());
    f
}

/// `(from, code)` of a whole abort frame.
fn parse_abort(f: &[u8]) -> Option<(usize, i32)> {
    if f.len() != 21 || f[0] != OP_ABORT {
        return None;
    }
    let mut from = [0u8; 8];
    from.copy_from_slice(&f[9..17]);
    let mut code = [0u8; 4];
    code.copy_from_slice(&f[17..21]);
    Some((
        usize::try_from(u64::from_le_bytes(from)).unwrap_or(usize::MAX),
        i32::from_le_bytes(code),
    ))
}

impl AbortLine {
    /// Uses `group`'s channel for aborts only (no other operation may use it).
    pub fn new(group: TcpGroup) -> Self {
        let rank = group.rank;
        AbortLine {
            rank,
            links: Mutex::new(group.links.into_inner().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Starts the watcher thread: `on_abort(from, code)` runs on it when a rank aborts
    /// (after rank 0 relayed the message to the others).
    pub fn watch(&self, on_abort: impl FnOnce(usize, i32) + Send + 'static) -> Result<()> {
        let clone_err = |e: std::io::Error| Error::Rendezvous(format!("abort watcher: {e}"));
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match &*links {
            Links::Leaf(s) => {
                let mut s = s.try_clone().map_err(clone_err)?;
                std::thread::Builder::new()
                    .name("kiln-abort-watch".into())
                    .spawn(move || {
                        let mut f = [0u8; 21];
                        if s.set_read_timeout(None).is_ok()
                            && s.read_exact(&mut f).is_ok()
                            && let Some((from, code)) = parse_abort(&f)
                        {
                            on_abort(from, code);
                        }
                    })
                    .map_err(clone_err)?;
            }
            Links::Root(peers) => {
                if peers.is_empty() {
                    return Ok(());
                }
                let mut readers = Vec::with_capacity(peers.len());
                let mut writers = Vec::with_capacity(peers.len());
                for p in peers {
                    let r = p.try_clone().map_err(clone_err)?;
                    // Shared with `abort`'s writes: frames are tiny, into an empty buffer.
                    r.set_nonblocking(true).map_err(clone_err)?;
                    readers.push((r, Vec::new(), true));
                    writers.push(p.try_clone().map_err(clone_err)?);
                }
                std::thread::Builder::new()
                    .name("kiln-abort-watch".into())
                    .spawn(move || {
                        let mut buf = [0u8; 64];
                        while readers.iter().any(|r| r.2) {
                            for (i, (r, got, open)) in readers.iter_mut().enumerate() {
                                if !*open {
                                    continue;
                                }
                                match r.read(&mut buf) {
                                    Ok(0) => *open = false,
                                    Ok(n) => got.extend_from_slice(&buf[..n]),
                                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                                    Err(_) => *open = false,
                                }
                                if got.len() >= 21 {
                                    if let Some((from, code)) = parse_abort(&got[..21]) {
                                        let frame = abort_frame(from, code);
                                        for (j, w) in writers.iter_mut().enumerate() {
                                            if j != i {
                                                let _ = w.write_all(&frame);
                                            }
                                        }
                                        on_abort(from, code);
                                        return;
                                    }
                                    *open = false;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    })
                    .map_err(clone_err)?;
            }
        }
        Ok(())
    }

    /// Tells every other rank to end with `code` (best effort: a rank that is gone
    /// already is skipped).
    pub fn abort(&self, code: i32) {
        let frame = abort_frame(self.rank, code);
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let streams: Vec<&mut TcpStream> = match &mut *links {
            Links::Leaf(s) => vec![s],
            Links::Root(peers) => peers.iter_mut().collect(),
        };
        for s in streams {
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(&frame);
            let _ = s.flush();
        }
    }
}

/// Blocking mode, no Nagle delay (frames are small and answered at once).
fn prepare(s: &TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)
}

/// A socket timeout for what is left of a deadline (zero would mean "none").
fn clamp(left: Duration) -> Duration {
    left.max(Duration::from_millis(1))
}

fn left_until(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(clamp(left))
}

fn read_hello(s: &mut TcpStream, deadline: Instant) -> std::io::Result<(usize, usize, usize)> {
    prepare(s)?;
    s.set_read_timeout(Some(left_until(deadline)?.min(Duration::from_secs(10))))?;
    let mut buf = [0u8; 32];
    s.read_exact(&mut buf)?;
    if &buf[..8] != HELLO {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "not a kiln rank",
        ));
    }
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[8 + 8 * i..16 + 8 * i]);
        usize::try_from(u64::from_le_bytes(b)).unwrap_or(usize::MAX)
    };
    Ok((field(0), field(1), field(2)))
}

fn write_frame(s: &mut TcpStream, op: u8, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    s.set_write_timeout(Some(left_until(deadline)?))?;
    let mut head = [0u8; 9];
    head[0] = op;
    head[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(bytes)?;
    s.flush()
}

/// Reads into `buf`, renewing the socket timeout so the whole read ends by `deadline`.
fn read_until(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        s.set_read_timeout(Some(left_until(deadline)?))?;
        match s.read(&mut buf[done..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_frame(s: &mut TcpStream, deadline: Instant) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    read_until(s, &mut head, deadline)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "frame too large"))?;
    // Grow as bytes arrive instead of trusting the length with one allocation.
    let mut bytes = Vec::with_capacity(len.min(1 << 20));
    let mut chunk = vec![0u8; len.min(1 << 20)];
    while bytes.len() < len {
        let n = (len - bytes.len()).min(chunk.len());
        read_until(s, &mut chunk[..n], deadline)?;
        bytes.extend_from_slice(&chunk[..n]);
    }
    Ok((head[0], bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn env(rank: usize, world: usize, port: u16) -> TorchrunEnv {
        TorchrunEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    /// Runs `f(group channels)` on `world` threads, one per rank; returns their results
    /// by rank.
    fn run<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(usize, Vec<TcpGroup>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let groups = TcpGroup::connect(&env(r, world, port), timeout, 2).unwrap();
                    f(r, groups)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn exchanges_a_blob_gathers_and_reduces() {
        let out = run(4, Duration::from_secs(20), |r, groups| {
            let g = &groups[0];
            let id = g
                .broadcast_from_root(if r == 0 { b"the nccl id" } else { b"" })
                .unwrap();
            let all = g.all_gather(&vec![r as u8; r]).unwrap();
            let mut v = [r as f64, 1.0, 0.5];
            g.all_reduce_f64(&mut v).unwrap();
            for _ in 0..3 {
                groups[1].barrier().unwrap();
            }
            (id, all, v)
        });
        for (id, all, v) in out {
            assert_eq!(id, b"the nccl id");
            assert_eq!(all, [vec![], vec![1], vec![2, 2], vec![3, 3, 3]]);
            assert_eq!(v, [6.0, 4.0, 2.0]);
        }
    }

    #[test]
    fn two_channels_are_independent() {
        // A barrier on channel 1 while channel 0 is busy with a gather on other threads.
        let out = run(3, Duration::from_secs(20), |r, mut groups| {
            let save = groups.pop().unwrap();
            let train = groups.pop().unwrap();
            let t = std::thread::spawn(move || save.barrier());
            let big = vec![r as u8; 3 << 20];
            let all = train.all_gather(&big).unwrap();
            t.join().unwrap().unwrap();
            all.iter().map(Vec::len).sum::<usize>()
        });
        assert_eq!(out, [9 << 20; 3]);
    }

    #[test]
    fn one_process_needs_no_network() {
        let g = TcpGroup::connect(&env(0, 1, 1), Duration::from_secs(1), 1).unwrap();
        assert_eq!(g[0].broadcast_from_root(b"x").unwrap(), b"x");
        g[0].barrier().unwrap();
    }

    #[test]
    fn a_barrier_without_one_rank_times_out() {
        let timeout = Duration::from_millis(1500);
        let start = Instant::now();
        let out = run(3, timeout, move |r, groups| {
            if r == 2 {
                // Connected, alive, but never arrives (and keeps its connections open).
                std::thread::sleep(Duration::from_secs(4));
                return None;
            }
            Some(groups[1].barrier().map_err(|e| e.to_string()))
        });
        let took = start.elapsed();
        let e0 = out[0].clone().unwrap().unwrap_err();
        assert!(
            e0.contains("rank 0 of 3: a barrier: rank 2: no answer in time"),
            "{e0}"
        );
        assert!(!e0.contains('\n'));
        // Rank 1 waits for rank 0's reply, which never comes either.
        let e1 = out[1].clone().unwrap().unwrap_err();
        assert!(e1.contains("rank 1 of 3: a barrier: rank 0"), "{e1}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn a_rank_that_exits_fails_the_barrier_at_once() {
        let start = Instant::now();
        let out = run(2, Duration::from_secs(30), |r, groups| {
            if r == 1 {
                drop(groups);
                return None;
            }
            Some(groups[0].barrier().map_err(|e| e.to_string()))
        });
        let e = out[0].clone().unwrap().unwrap_err();
        assert!(e.contains("rank 1: its connection closed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn an_abort_reaches_every_rank() {
        // Rank 2 aborts with status 7: ranks 0, 1 and 3 hear it (rank 0 relays it).
        let out = run(4, Duration::from_secs(20), |r, mut groups| {
            let line = AbortLine::new(groups.pop().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            line.watch(move |from, code| tx.send((from, code)).unwrap())
                .unwrap();
            // Everyone watches before rank 2 aborts.
            groups[0].barrier().unwrap();
            if r == 2 {
                line.abort(7);
                return None;
            }
            Some(rx.recv_timeout(Duration::from_secs(10)).unwrap())
        });
        assert_eq!(out, [Some((2, 7)), Some((2, 7)), None, Some((2, 7))]);
        // Rank 0 aborting reaches everyone too; a rank that just ends aborts nobody.
        let out = run(3, Duration::from_secs(20), |r, mut groups| {
            let line = AbortLine::new(groups.pop().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            line.watch(move |from, code| tx.send((from, code)).unwrap())
                .unwrap();
            groups[0].barrier().unwrap();
            match r {
                0 => {
                    line.abort(3);
                    None
                }
                _ => Some(rx.recv_timeout(Duration::from_secs(10)).unwrap()),
            }
        });
        assert_eq!(out, [None, Some((0, 3)), Some((0, 3))]);
        let out = run(2, Duration::from_secs(20), |r, mut groups| {
            let line = AbortLine::new(groups.pop().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            line.watch(move |from, code| tx.send((from, code)).unwrap())
                .unwrap();
            groups[0].barrier().unwrap();
            if r == 1 {
                drop(line);
                return None;
            }
            Some(rx.recv_timeout(Duration::from_millis(500)).is_err())
        });
        assert_eq!(out, [Some(true), None]);
    }

    #[test]
    fn a_missing_rank_fails_the_rendezvous() {
        let port = free_port();
        let e = TcpGroup::connect(&env(0, 3, port), Duration::from_millis(300), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks 1, 2 did not connect"), "{e}");
        let e = TcpGroup::connect(&env(1, 3, free_port()), Duration::from_millis(300), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1: could not connect to rank 0 at 127.0.0.1:"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn diverged_ranks_are_reported() {
        let out = run(2, Duration::from_secs(5), |r, groups| {
            if r == 0 {
                groups[0].barrier().map(|_| ()).map_err(|e| e.to_string())
            } else {
                groups[0]
                    .all_gather(b"x")
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        });
        let e = out[0].clone().unwrap_err();
        assert!(
            e.contains("rank 1 is in a gather while rank 0 is in a barrier"),
            "{e}"
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Result<TorchrunEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TorchrunEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables() {
        let good = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ];
        let e = vars(&good).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29500));
        let with = |k: &str, v: &str| {
            let mut g = good.to_vec();
            g.retain(|(n, _)| *n != k);
            if !v.is_empty() {
                g.push((k, v));
            }
            vars(&g).unwrap_err().to_string()
        };
        let cases = [
            ("MASTER_PORT", "", "MASTER_PORT is not set"),
            (
                "MASTER_PORT",
                "http",
                "MASTER_PORT=\"http\" is not a port number",
            ),
            ("MASTER_PORT", "0", "MASTER_PORT=\"0\" is not a port number"),
            (
                "MASTER_PORT",
                "70000",
                "MASTER_PORT=\"70000\" is not a port number",
            ),
            ("MASTER_ADDR", "", "MASTER_ADDR is not set"),
            ("RANK", "-1", "RANK=\"-1\" is not a non-negative integer"),
            ("RANK", "4", "RANK=4 is not below WORLD_SIZE=4"),
            (
                "WORLD_SIZE",
                "0",
                "WORLD_SIZE=0 is not a number of processes",
            ),
            (
                "LOCAL_RANK",
                "2",
                "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
            ),
            ("LOCAL_WORLD_SIZE", "", "LOCAL_WORLD_SIZE is not set"),
            (
                "LOCAL_WORLD_SIZE",
                "5",
                "LOCAL_WORLD_SIZE=5 is not between 1 and WORLD_SIZE=4",
            ),
        ];
        for (k, v, want) in cases {
            let e = with(k, v);
            assert!(e.contains(want), "{k}={v}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // An address that does not resolve is a one-line error at connect time.
        let mut bad = vars(&good).unwrap();
        bad.master_addr = "no such host.invalid".into();
        let e = TcpGroup::connect(&bad, Duration::from_millis(100), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MASTER_ADDR=\"no such host.invalid\" does not resolve"),
            "{e}"
        );
    }
}
