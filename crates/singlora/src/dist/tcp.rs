//! A group of processes joined over TCP, for ranks on the CPU (and to hand NCCL its group id):
//! rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank connects and says who it is
//! (rank, world size); when all have arrived rank 0 tells each to start. An all-reduce sends
//! each rank's values to rank 0, which sums them in rank order (so every rank, and the
//! threaded group, gets bit-identical sums) and sends the sum back.
//!
//! Nothing waits for ever: the rendezvous ends after `timeout` naming the ranks that never
//! arrived, and a reduction whose peer stops (its socket closes) or stalls past
//! `SINGLORA_DIST_TIMEOUT` seconds fails naming that rank. The default, 6 hours, is long
//! because the other ranks wait in their next reduction while rank 0 alone evaluates.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::launch::Launch;
use super::Collective;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"SGLR";
const VERSION: u32 = 1;

/// The stall after which a reduction gives up on a peer.
fn op_timeout() -> Duration {
    let s = std::env::var("SINGLORA_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(6 * 3600);
    Duration::from_secs(s.max(1))
}

fn send_u32(s: &mut TcpStream, v: u32) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn recv_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn send_bytes(s: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    s.write_all(&(b.len() as u64).to_le_bytes())?;
    s.write_all(b)
}

fn recv_bytes(s: &mut TcpStream, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n) as usize;
    if n > limit {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a message of {n} bytes, more than the {limit} expected"),
        ));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// One rank of a group of processes.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the connections to ranks 1.. in rank order; the others: the one to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

impl TcpGroup {
    /// Joins the group `launch` describes, waiting at most `timeout` for all ranks.
    pub fn join(launch: &Launch, timeout: Duration) -> Result<Self> {
        let links = if launch.rank == 0 {
            Self::gather(launch, timeout)?
        } else {
            vec![Self::connect(launch, timeout)?]
        };
        for l in &links {
            l.set_read_timeout(Some(op_timeout()))
                .and_then(|_| l.set_write_timeout(Some(op_timeout())))
                .and_then(|_| l.set_nodelay(true))
                .map_err(|e| Error::msg(format!("rank {}: socket setup: {e}", launch.rank)))?;
        }
        Ok(Self {
            rank: launch.rank,
            world: launch.world,
            links: Mutex::new(links),
        })
    }

    /// Rank 0: listens until every other rank has said hello, then tells each to start.
    fn gather(l: &Launch, timeout: Duration) -> Result<Vec<TcpStream>> {
        let (host, port) = (&l.master.0, l.master.1);
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            Error::msg(format!(
                "rank 0 cannot listen on port {port} (MASTER_PORT): {e}; another job may hold \
                 it, choose another MASTER_PORT"
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::msg(format!("rank 0: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..l.world).map(|_| None).collect();
        while peers.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(10))))
                        .map_err(|e| Error::msg(format!("rank 0: {e}")))?;
                    let hello = (|| -> std::io::Result<(Vec<u8>, u32, u32, u32)> {
                        let mut magic = [0u8; 4];
                        s.read_exact(&mut magic)?;
                        Ok((
                            magic.to_vec(),
                            recv_u32(&mut s)?,
                            recv_u32(&mut s)?,
                            recv_u32(&mut s)?,
                        ))
                    })();
                    let Ok((magic, version, rank, world)) = hello else {
                        continue; // not one of ours (a port scan, a health check)
                    };
                    if magic != MAGIC || version != VERSION {
                        continue;
                    }
                    let (rank, world) = (rank as usize, world as usize);
                    let refusal = if world != l.world {
                        Some(format!(
                            "rank {rank} (from {from}) was started for a world of {world}, rank 0 \
                             for {}: the processes disagree on WORLD_SIZE",
                            l.world
                        ))
                    } else if rank == 0 || rank >= l.world {
                        Some(format!(
                            "a process from {from} says it is rank {rank} of {world}"
                        ))
                    } else if peers[rank].is_some() {
                        Some(format!(
                            "two processes say they are rank {rank} (the second from {from})"
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = refusal {
                        let _ = s
                            .write_all(&[1])
                            .and_then(|_| send_bytes(&mut s, why.as_bytes()));
                        return Err(Error::msg(why));
                    }
                    s.write_all(&[0])
                        .map_err(|e| Error::msg(format!("rank 0: answering rank {rank}: {e}")))?;
                    peers[rank] = Some(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..l.world)
                            .filter(|&r| peers[r].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        return Err(Error::msg(format!(
                            "rank(s) {} of {} never arrived at {host}:{port} within {} s ({}); \
                             were they started, with the same MASTER_ADDR and MASTER_PORT?",
                            missing.join(", "),
                            l.world,
                            timeout.as_secs(),
                            l.launcher
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::msg(format!("rank 0: accepting a rank: {e}"))),
            }
        }
        let mut links: Vec<TcpStream> = peers.into_iter().skip(1).flatten().collect();
        for (i, s) in links.iter_mut().enumerate() {
            s.write_all(&[0])
                .map_err(|e| Error::msg(format!("rank 0: starting rank {}: {e}", i + 1)))?;
        }
        Ok(links)
    }

    /// Another rank: reaches rank 0 (retrying until `timeout`), says hello, waits for the start.
    fn connect(l: &Launch, timeout: Duration) -> Result<TcpStream> {
        let (host, port) = (&l.master.0, l.master.1);
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            let tried = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
                .and_then(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_secs(5))
                        .map_err(|e| e.to_string())
                });
            match tried {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::msg(format!(
                        "rank {} could not reach rank 0 at {host}:{port} within {} s: {e}",
                        l.rank,
                        timeout.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let lost = |e: std::io::Error| {
            Error::msg(format!(
                "rank {}: rank 0 at {host}:{port} ended the rendezvous ({e}): see rank 0's error",
                l.rank
            ))
        };
        s.write_all(MAGIC)
            .and_then(|_| send_u32(&mut s, VERSION))
            .and_then(|_| send_u32(&mut s, l.rank as u32))
            .and_then(|_| send_u32(&mut s, l.world as u32))
            .map_err(lost)?;
        s.set_read_timeout(Some(timeout + Duration::from_secs(10)))
            .map_err(lost)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(lost)?;
        if status[0] != 0 {
            let why = recv_bytes(&mut s, 4096).map_err(lost)?;
            return Err(Error::msg(String::from_utf8_lossy(&why).into_owned()));
        }
        // the start: sent once every rank has arrived
        s.read_exact(&mut status).map_err(lost)?;
        Ok(s)
    }

    /// `bytes` from rank 0 to every rank (rank 0 passes Some, the others None).
    pub fn broadcast(&self, bytes: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut links = self.links.lock().unwrap();
        if self.rank == 0 {
            let b = bytes.ok_or_else(|| Error::msg("broadcast: rank 0 has nothing to send"))?;
            for (i, s) in links.iter_mut().enumerate() {
                send_bytes(s, b).map_err(|e| self.lost(i + 1, e))?;
            }
            Ok(b.to_vec())
        } else {
            recv_bytes(&mut links[0], 1 << 20).map_err(|e| self.lost(0, e))
        }
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> Error {
        let what = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "waited {} s (SINGLORA_DIST_TIMEOUT) without a word",
                op_timeout().as_secs()
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                "its connection closed: the process stopped".to_string()
            }
            _ => e.to_string(),
        };
        Error::msg(format!("rank {}: rank {peer} is gone ({what})", self.rank))
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Rank 0 adds what the others send, in rank order, and sends the sum back.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        super::through_host(t, |mine| self.sum_over_links(mine))
    }
}

impl TcpGroup {
    fn sum_over_links(&self, mine: Vec<f32>) -> Result<Vec<f32>> {
        let n = mine.len();
        let mut links = self.links.lock().unwrap();
        Ok(if self.rank == 0 {
            let mut sum = vec![0f32; n];
            super::add_rank(&mut sum, &mine, 0)?;
            for (i, s) in links.iter_mut().enumerate() {
                let b = recv_bytes(s, 4 * n + 4).map_err(|e| self.lost(i + 1, e))?;
                super::add_rank(&mut sum, &bytes_f32(&b), i + 1)?;
            }
            let b = f32_bytes(&sum);
            for (i, s) in links.iter_mut().enumerate() {
                send_bytes(s, &b).map_err(|e| self.lost(i + 1, e))?;
            }
            sum
        } else {
            let s = &mut links[0];
            send_bytes(s, &f32_bytes(&mine)).map_err(|e| self.lost(0, e))?;
            let b = recv_bytes(s, 4 * n + 4).map_err(|e| self.lost(0, e))?;
            if b.len() != 4 * n {
                return Err(Error::msg(format!(
                    "all-reduce: rank 0 sent {} values, rank {} has {n}",
                    b.len() / 4,
                    self.rank
                )));
            }
            bytes_f32(&b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            master: ("127.0.0.1".into(), port),
            launcher: "test",
        }
    }

    /// A free port: bound, read, released.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn three_ranks_sum_in_rank_order() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let g = TcpGroup::join(&launch(r, 3, port), Duration::from_secs(20)).unwrap();
                    let t =
                        Tensor::new(&[r as f32 + 0.25, 1e8, -(r as f32)], &Device::Cpu).unwrap();
                    let s = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                    let id = g.broadcast((r == 0).then_some(&b"group id"[..])).unwrap();
                    (s, id)
                })
            })
            .collect();
        let want = vec![((0.25f32 + 1.25) + 2.25), (1e8f32 + 1e8) + 1e8, -3.0];
        for h in handles {
            let (s, id) = h.join().unwrap();
            assert_eq!(s, want);
            assert_eq!(id, b"group id");
        }
    }

    #[test]
    fn a_missing_rank_is_named_and_nothing_hangs() {
        let port = free_port();
        let r1 = std::thread::spawn(move || {
            TcpGroup::join(&launch(1, 3, port), Duration::from_secs(3)).err()
        });
        let e = TcpGroup::join(&launch(0, 3, port), Duration::from_secs(2))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 2 of 3 never arrived"), "{e}");
        let e1 = r1.join().unwrap().unwrap().to_string();
        assert!(e1.contains("rank 1") && e1.contains("rank 0"), "{e1}");
        // nobody listening at all
        let e = TcpGroup::join(&launch(1, 2, free_port()), Duration::from_millis(500))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("could not reach rank 0"), "{e}");
    }

    #[test]
    fn a_wrong_world_size_and_a_busy_port_are_refused() {
        let port = free_port();
        let r1 = std::thread::spawn(move || {
            TcpGroup::join(&launch(1, 3, port), Duration::from_secs(5)).err()
        });
        let e = TcpGroup::join(&launch(0, 2, port), Duration::from_secs(5))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("disagree on WORLD_SIZE"), "{e}");
        let e1 = r1.join().unwrap().unwrap().to_string();
        assert!(e1.contains("WORLD_SIZE"), "{e1}");
        let held = TcpListener::bind("0.0.0.0:0").unwrap();
        let busy = held.local_addr().unwrap().port();
        let e = TcpGroup::join(&launch(0, 2, busy), Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot listen on port") && e.contains("MASTER_PORT"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_that_stops_ends_the_reduction_with_its_name() {
        let port = free_port();
        let r1 = std::thread::spawn(move || {
            let g = TcpGroup::join(&launch(1, 2, port), Duration::from_secs(10)).unwrap();
            drop(g); // the process stops before the reduction
        });
        let g = TcpGroup::join(&launch(0, 2, port), Duration::from_secs(10)).unwrap();
        r1.join().unwrap();
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let e = g.all_reduce_sum(&t).unwrap_err().to_string();
        assert!(e.contains("rank 1 is gone") && e.contains("stopped"), "{e}");
    }
}
