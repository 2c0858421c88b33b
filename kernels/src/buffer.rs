//! Large anonymous buffers for data streamed from memory: packed weights and
//! the read-bandwidth array.

use crate::KernelError;

/// Anonymous memory: page-aligned (so every 64-byte load is aligned),
/// zeroed, and on Linux advised to use transparent huge pages before the
/// first write. Streaming gigabytes through 4 KiB pages costs a TLB miss
/// every 4 KiB, and with THP's common `enabled = madvise` setting only
/// advised memory gets huge pages.
pub(crate) struct Buffer {
    map: memmap2::MmapMut,
    len: usize,
}

impl Buffer {
    pub(crate) fn zeroed(len: usize) -> Result<Buffer, KernelError> {
        let alloc = |e: std::io::Error| KernelError::Alloc {
            bytes: len,
            reason: e.to_string(),
        };
        // A zero-length map is an error; one page stands in for an empty buffer.
        let map = memmap2::MmapMut::map_anon(len.max(1)).map_err(alloc)?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without huge pages the buffer works the same, slower.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Buffer { map, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}
