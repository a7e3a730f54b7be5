//! One process per rank, started by a cluster launcher: which rank this process is, how many
//! there are, which GPU of its host it takes and where rank 0 listens, read from the variables
//! the launcher sets.
//!
//! | launcher | rank, world, local rank | rank 0's address |
//! |---|---|---|
//! | torchrun | `RANK`, `WORLD_SIZE`, `LOCAL_RANK` | `MASTER_ADDR`, `MASTER_PORT` |
//! | Slurm `srun` | `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` | `MASTER_ADDR`, else the first host of `SLURM_JOB_NODELIST` |
//! | Open MPI `mpirun` | `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK` | `MASTER_ADDR` |
//! | MPICH / Intel MPI (PMI) | `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID` | `MASTER_ADDR` |
//!
//! `MASTER_PORT` defaults to 29500 where the launcher does not set it (as torchrun's default).
//! Under torchrun, whose agent already listens at `MASTER_PORT` (its own store, marked by
//! `TORCHELASTIC_USE_AGENT_STORE`), rank 0 listens at `MASTER_PORT + 1`; `SINGLORA_MASTER_PORT`
//! chooses the port outright.

use crate::error::{Error, Result};

/// torchrun's default port.
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place in a launched group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank among those on this host: the GPU this process takes.
    pub local_rank: usize,
    /// Rank 0's host and port.
    pub master: (String, u16),
    /// Which launcher's variables these came from, for messages.
    pub launcher: &'static str,
}

/// The launch described by the environment (`var` reads a variable); None for a plain
/// process (no launcher's variables, or a world of one).
pub fn detect(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    // (launcher, rank, world, local rank)
    const SCHEMES: [(&str, &str, &str, &str); 4] = [
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        (
            "Open MPI",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ),
        ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ];
    let Some(&(launcher, rank_var, world_var, local_var)) = SCHEMES
        .iter()
        .find(|(_, rank, world, _)| var(rank).is_some() && var(world).is_some())
    else {
        return Ok(None);
    };
    let number =
        |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::msg(format!("{launcher}: {name}={v:?} is not a whole number"))
                }),
            }
        };
    let rank = number(rank_var)?.unwrap_or_default();
    let world = number(world_var)?.unwrap_or_default();
    if world == 0 || rank >= world {
        return Err(Error::msg(format!(
            "{launcher}: {rank_var}={rank} does not fit {world_var}={world}"
        )));
    }
    if world == 1 {
        return Ok(None);
    }
    let local_rank = number(local_var)?.unwrap_or(0);
    let host = match var("MASTER_ADDR") {
        Some(h) if !h.trim().is_empty() => h.trim().to_string(),
        _ if launcher == "Slurm" => {
            let list = var("SLURM_JOB_NODELIST")
                .or_else(|| var("SLURM_NODELIST"))
                .ok_or_else(|| {
                    Error::msg("Slurm: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
                })?;
            first_host(&list).ok_or_else(|| {
                Error::msg(format!("Slurm: SLURM_JOB_NODELIST={list:?} names no host"))
            })?
        }
        _ => {
            return Err(Error::msg(format!(
                "{launcher} started {world} processes but MASTER_ADDR is not set: export the \
                 host of rank 0 (and MASTER_PORT, default {DEFAULT_PORT}) to every process"
            )))
        }
    };
    let port_of = |name: &str, p: String| -> Result<u16> {
        p.trim()
            .parse()
            .map_err(|_| Error::msg(format!("{name}={p:?} is not a port number")))
    };
    // torchrun's agent holds MASTER_PORT itself (its store, which PyTorch's workers share):
    // the rendezvous takes the port above it there, unless SINGLORA_MASTER_PORT says
    let agent_store =
        var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let port = match (var("SINGLORA_MASTER_PORT"), var("MASTER_PORT")) {
        (Some(p), _) => port_of("SINGLORA_MASTER_PORT", p)?,
        (None, None) => DEFAULT_PORT,
        (None, Some(p)) if agent_store => port_of("MASTER_PORT", p)?.checked_add(1).ok_or_else(|| {
            Error::msg("MASTER_PORT=65535 leaves no port above it for singlora's rendezvous under torchrun: set SINGLORA_MASTER_PORT")
        })?,
        (None, Some(p)) => port_of("MASTER_PORT", p)?,
    };
    Ok(Some(Launch {
        rank,
        world,
        local_rank,
        master: (host, port),
        launcher,
    }))
}

/// [`detect`] on this process's environment.
pub fn from_env() -> Result<Option<Launch>> {
    detect(&|name| std::env::var(name).ok())
}

/// The first host of a Slurm node list: `gpu[01-03,07],cpu1` → `gpu01`, `node7,node8` →
/// `node7`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // the first entry ends at a comma outside brackets
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match entry.split_once('[') {
        None => entry.to_string(),
        Some((prefix, rest)) => {
            let range = rest.strip_suffix(']')?;
            let first = range.split(',').next()?;
            let start = first.split('-').next()?;
            format!("{prefix}{start}")
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        detect(&|k| m.get(k).cloned())
    }

    #[test]
    fn reads_each_launcher() {
        let l = with(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.master, l.launcher),
            (3, 16, 3, ("10.0.0.1".into(), 1234), "torchrun")
        );
        let l = with(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.local_rank, l.master),
            (9, 1, ("gpu07".into(), 29500))
        );
        let l = with(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("MASTER_ADDR", "head"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.launcher), (1, 2, "Open MPI"));
        let l = with(&[("PMI_RANK", "0"), ("PMI_SIZE", "4"), ("MASTER_ADDR", "h")])
            .unwrap()
            .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (0, 4, 0));
        // torchrun's variables win over Slurm's when srun starts torchrun
        let l = with(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "a"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.launcher), (5, "torchrun"));
    }

    #[test]
    fn ports_under_torchrun_and_by_choice() {
        let base = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")];
        let port = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            with(&v).unwrap().unwrap().master.1
        };
        assert_eq!(port(&[]), 29500);
        assert_eq!(port(&[("MASTER_PORT", "4000")]), 4000);
        assert_eq!(
            port(&[
                ("MASTER_PORT", "4000"),
                ("TORCHELASTIC_USE_AGENT_STORE", "True")
            ]),
            4001
        );
        assert_eq!(
            port(&[
                ("MASTER_PORT", "4000"),
                ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                ("SINGLORA_MASTER_PORT", "5000")
            ]),
            5000
        );
    }

    #[test]
    fn a_plain_process_or_a_world_of_one_is_no_launch() {
        assert_eq!(with(&[]).unwrap(), None);
        assert_eq!(with(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            with(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
            None
        );
    }

    #[test]
    fn bad_variables_are_named() {
        let e = with(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "a")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=4") && e.contains("WORLD_SIZE=4"), "{e}");
        let e = with(&[("RANK", "x"), ("WORLD_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = with(&[("RANK", "1"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = with(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "99999"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }

    #[test]
    fn slurm_node_lists() {
        for (list, first) in [
            ("gpu[01-03,07],cpu1", "gpu01"),
            ("node7,node8", "node7"),
            ("a-b[3-4]", "a-b3"),
            ("single", "single"),
            ("n[5,9-10]", "n5"),
        ] {
            assert_eq!(first_host(list).as_deref(), Some(first), "{list}");
        }
        assert_eq!(first_host(""), None);
    }
}
