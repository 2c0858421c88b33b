//! What running a model will cost in memory, checked before loading so a laptop gets an error
//! instead of a swap storm.

use crate::llama::{KvType, LlamaModel};

#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// Tensor bytes in the file (mapped, paged in as used).
    pub weights: u64,
    pub kv_cache: u64,
    /// Activation buffers of one batch, and the logits.
    pub buffers: u64,
    /// Packed copies of weights the map must still serve (a tied output head); see
    /// [`LlamaModel::repack_extra_bytes`]. 0 without repacking.
    pub repacked_extra: u64,
}

impl MemoryEstimate {
    /// `repack`: whether the weights will be repacked ([`LlamaModel::repack`]).
    pub fn for_model(
        model: &LlamaModel,
        n_ctx: usize,
        kv: KvType,
        batch: usize,
        repack: bool,
    ) -> Self {
        let c = &model.config;
        let weights = model.file.tensors().iter().map(|t| t.n_bytes).sum::<u64>();
        let per_token = 4 * (4 * c.n_embd + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.n_ff) as u64;
        let buffers = per_token * batch as u64 + 4 * c.vocab_size as u64 * batch as u64;
        MemoryEstimate {
            weights,
            kv_cache: model.kv_cache_bytes(n_ctx, kv),
            buffers,
            repacked_extra: if repack {
                model.repack_extra_bytes()
            } else {
                0
            },
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.buffers + self.repacked_extra
    }

    /// The part that must be resident (anonymous memory the kernel cannot page back to the
    /// file): KV cache, buffers, packed copies (about the weights' size when repacking) and the
    /// weights themselves when read instead of mapped.
    pub fn anonymous(&self, repack: bool, no_mmap: bool) -> u64 {
        let copies = u64::from(repack) + u64::from(no_mmap);
        self.kv_cache
            .saturating_add(self.buffers)
            .saturating_add(self.weights.saturating_mul(copies))
    }
}

/// All the memory this process could ever get: RAM plus swap, lowered to the cgroup v2 limit
/// (plus its swap limit) when one is set. An allocation beyond it cannot succeed: with
/// overcommit it "succeeds" and the process is killed when the pages are touched, so it is
/// refused up front whatever `--force` says. None where it cannot be read.
pub fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let kb = |name: &str| -> Option<u64> {
                let line = text.lines().find(|l| l.starts_with(name))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            };
            let total = kb("MemTotal:")?;
            let swap = kb("SwapTotal:").unwrap_or(0);
            total.checked_add(swap)?.checked_mul(1024)
        });
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup = read("memory.max").map(|m| m.saturating_add(read("memory.swap.max").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Memory this process can still use, in bytes: MemAvailable from /proc/meminfo, lowered to
/// the cgroup v2 limit's headroom when one is set (containers see the host's MemAvailable).
/// None where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kb.checked_mul(1024)
        });
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    // "max" (no limit) fails to parse and leaves only MemAvailable.
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Bytes in human units (GiB/MiB/KiB), for messages.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if b >= size {
            return format!("{:.2} {name}", b as f64 / size as f64);
        }
    }
    format!("{b} B")
}
