//! Block sealing and opening, layout V1 against V2, both cipher suites.
//!
//! "1 MiB request" is 256 blocks of 4 KiB spread over the rayon pool, as
//! `CryptFile` does when cores are free; "4 KiB block" is one block on the
//! calling thread. "open, new session" opens blocks sealed by another
//! cipher of the same file, as a read after a remount does (V2: their
//! epoch is not the current one and comes from the recent-epoch cache).
//! "open, many epochs" is the worst case of a file rewritten over many
//! sessions: for V2 every block from another epoch, more than the cache
//! holds, so every open derives its key; for V1, which has one key
//! whatever the sessions, the same as "open, new session".
//!
//! Run: `cargo bench --bench blocks -- --measurement-time 3 --warm-up-time 1`
//!
//! On a shared machine, other processes move wall-clock figures by more
//! than the difference between the layouts. `KMSFS_BENCH_PAIRED=ROUNDS
//! cargo bench --bench blocks` instead alternates V1 and V2 of each case in
//! short slices, ROUNDS times, and prints the median ratio of their times
//! per case: both layouts then see the same load.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kmsfs::crypto::{seal_header, BlockCipher, Dek};
use kmsfs::format::{BlockLayout, CipherSuite, Header, KeyRef, WrappedDek};
use rayon::prelude::*;

const REQUEST: usize = 1 << 20;
const BLOCK: usize = 4096;
/// Blocks per task, as `CryptFile` seals a request.
const SEAL_TASK_BLOCKS: usize = 8;

const SUITES: [CipherSuite; 2] = [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305];
const LAYOUTS: [BlockLayout; 2] = [BlockLayout::V1, BlockLayout::V2];

#[derive(Clone, Copy)]
enum Op {
    SealRequest,
    OpenRequest,
    OpenRequestNewSession,
    OpenRequestManyEpochs,
    SealBlock,
    OpenBlock,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::SealRequest,
        Op::OpenRequest,
        Op::OpenRequestNewSession,
        Op::OpenRequestManyEpochs,
        Op::SealBlock,
        Op::OpenBlock,
    ];

    fn group(self) -> &'static str {
        match self {
            Op::SealBlock | Op::OpenBlock => "4 KiB block",
            _ => "1 MiB request",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::SealRequest | Op::SealBlock => "seal",
            Op::OpenRequest | Op::OpenBlock => "open",
            Op::OpenRequestNewSession => "open, new session",
            Op::OpenRequestManyEpochs => "open, many epochs",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Op::SealBlock | Op::OpenBlock => BLOCK,
            _ => REQUEST,
        }
    }
}

/// One file's ciphers and buffers, for one suite and layout.
struct Workload {
    cipher: BlockCipher,
    /// A second cipher of the same file, as the next session builds it.
    next_session: BlockCipher,
    sealed: Vec<u8>,
    /// The request sealed under one epoch per block (V2); as `sealed` (V1).
    many_epochs: Vec<u8>,
    out: Vec<u8>,
}

impl Workload {
    fn new(suite: CipherSuite, layout: BlockLayout) -> Self {
        let wrap = WrappedDek {
            key_ref: KeyRef {
                provider: "local".into(),
                key_id: "bench".into(),
                key_version: "1".into(),
            },
            blob: vec![0; 60],
        };
        let header = match layout {
            BlockLayout::V1 => Header::v1(suite, 12, [1; 16], wrap),
            BlockLayout::V2 => Header::v2(suite, 12, [1; 16], vec![wrap]),
        }
        .unwrap();
        let dek = Dek::from_slice(&[7; 32]).unwrap();
        let cipher = seal_header(&header, &dek).unwrap().1;
        let next_session = seal_header(&header, &dek).unwrap().1;
        let g = cipher.geometry();
        let mut sealed = vec![0u8; g.ciphertext_size(REQUEST as u64) as usize];
        seal_request(&cipher, &mut sealed);
        let mut many_epochs = sealed.clone();
        if layout == BlockLayout::V2 {
            for (i, s) in many_epochs.chunks_mut(g.sealed_block_size()).enumerate() {
                let nonce = [i as u8; 12];
                cipher.seal_in_place_with_epoch_and_nonce(i as u64, 1000 + i as u64, &nonce, s);
            }
        }
        Self {
            cipher,
            next_session,
            sealed,
            many_epochs,
            out: vec![0u8; REQUEST],
        }
    }

    fn run(&mut self, op: Op) {
        let sbs = self.cipher.geometry().sealed_block_size();
        match op {
            Op::SealRequest => seal_request(&self.cipher, &mut self.sealed),
            Op::OpenRequest => open_request(&self.cipher, &self.sealed, &mut self.out),
            Op::OpenRequestNewSession => {
                open_request(&self.next_session, &self.sealed, &mut self.out)
            }
            Op::OpenRequestManyEpochs => {
                open_request(&self.next_session, &self.many_epochs, &mut self.out)
            }
            Op::SealBlock => self.cipher.seal_in_place(0, &mut self.sealed[..sbs]),
            Op::OpenBlock => self
                .cipher
                .open(0, &self.sealed[..sbs], &mut self.out[..BLOCK])
                .unwrap(),
        }
    }
}

fn seal_request(c: &BlockCipher, sealed: &mut [u8]) {
    let sbs = c.geometry().sealed_block_size();
    sealed
        .par_chunks_mut(sbs * SEAL_TASK_BLOCKS)
        .enumerate()
        .for_each(|(t, run)| c.seal_blocks((t * SEAL_TASK_BLOCKS) as u64, run));
}

fn open_request(c: &BlockCipher, sealed: &[u8], out: &mut [u8]) {
    let g = c.geometry();
    sealed
        .par_chunks(g.sealed_block_size())
        .zip(out.par_chunks_mut(g.block_size()))
        .enumerate()
        .for_each(|(i, (s, o))| c.open(i as u64, s, o).unwrap());
}

fn criterion_benches() {
    let mut c = Criterion::default().configure_from_args();
    for suite in SUITES {
        let mut workloads = LAYOUTS.map(|layout| (layout, Workload::new(suite, layout)));
        for op in Op::ALL {
            let mut group = c.benchmark_group(op.group());
            group.throughput(Throughput::Bytes(op.bytes() as u64));
            for (layout, w) in &mut workloads {
                let id = BenchmarkId::new(op.name(), format!("{}/{layout:?}", suite.name()));
                group.bench_function(id, |b| b.iter(|| w.run(op)));
            }
            group.finish();
        }
    }
    c.final_summary();
}

/// Time of `n` runs of `op`.
fn time(w: &mut Workload, op: Op, n: u32) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        w.run(op);
    }
    start.elapsed()
}

fn paired(rounds: usize) {
    println!("V2/V1: median ratio of times (quartiles) over {rounds} alternating rounds");
    for suite in SUITES {
        let [mut v1, mut v2] = LAYOUTS.map(|layout| Workload::new(suite, layout));
        for op in Op::ALL {
            // Slices of about 5 ms, so load changes little within a pair.
            let per_run = time(&mut v1, op, 20) / 20;
            let n = (Duration::from_millis(5).as_nanos() / per_run.as_nanos().max(1)).max(1);
            let n = n as u32;
            let (mut ratios, mut t1, mut t2) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                let (a, b) = if round % 2 == 0 {
                    let a = time(&mut v1, op, n);
                    (a, time(&mut v2, op, n))
                } else {
                    let b = time(&mut v2, op, n);
                    (time(&mut v1, op, n), b)
                };
                ratios.push(b.as_secs_f64() / a.as_secs_f64());
                t1.push(a.as_secs_f64() / n as f64);
                t2.push(b.as_secs_f64() / n as f64);
            }
            let q = |v: &mut Vec<f64>, p: usize| {
                v.sort_by(f64::total_cmp);
                v[(v.len() - 1) * p / 4]
            };
            let mib_s = |secs: f64| op.bytes() as f64 / secs / (1 << 20) as f64;
            println!(
                "{:<14} {:<18} {:<18} V1 {:>7.0} MiB/s  V2 {:>7.0} MiB/s  V2/V1 {:.3} ({:.3}-{:.3})",
                op.group(),
                op.name(),
                suite.name(),
                mib_s(q(&mut t1, 2)),
                mib_s(q(&mut t2, 2)),
                q(&mut ratios, 2),
                q(&mut ratios, 1),
                q(&mut ratios, 3),
            );
        }
    }
}

fn main() {
    match std::env::var("KMSFS_BENCH_PAIRED") {
        Ok(rounds) => paired(rounds.parse().expect("KMSFS_BENCH_PAIRED=ROUNDS")),
        Err(_) => criterion_benches(),
    }
}
