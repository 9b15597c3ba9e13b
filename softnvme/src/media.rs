//! RAM-backed namespaces: sparse, so a namespace can claim terabytes and store only what
//! was written.

use std::collections::HashMap;

/// One namespace of the software controller.
#[derive(Debug, Clone)]
pub struct SoftNs {
    /// Namespace ID.
    pub nsid: u32,
    /// log2 of the block size (9 = 512, 12 = 4096).
    pub lbads: u8,
    /// Size in blocks.
    pub blocks: u64,
    data: HashMap<u64, Box<[u8]>>,
}

impl SoftNs {
    /// An all-zero namespace.
    pub fn new(nsid: u32, lbads: u8, blocks: u64) -> SoftNs {
        SoftNs {
            nsid,
            lbads,
            blocks,
            data: HashMap::new(),
        }
    }
    /// Block size in bytes.
    pub fn block_bytes(&self) -> usize {
        1 << self.lbads
    }
    /// Reads blocks `lba..lba+n` into `out` (n * block bytes).
    pub fn read(&self, lba: u64, out: &mut [u8]) {
        let bs = self.block_bytes();
        for (i, chunk) in out.chunks_mut(bs).enumerate() {
            match self.data.get(&(lba + i as u64)) {
                Some(b) => chunk.copy_from_slice(b),
                None => chunk.fill(0),
            }
        }
    }
    /// Writes `src` (n * block bytes) at `lba`.
    pub fn write(&mut self, lba: u64, src: &[u8]) {
        let bs = self.block_bytes();
        for (i, chunk) in src.chunks(bs).enumerate() {
            match self.data.get_mut(&(lba + i as u64)) {
                Some(b) => b.copy_from_slice(chunk),
                None => {
                    self.data
                        .insert(lba + i as u64, chunk.to_vec().into_boxed_slice());
                }
            }
        }
    }
}
